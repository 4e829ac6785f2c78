// lomo kernels: gradient accumulation buffers (lomo_accum_enable), one pass per call:
//
//   acc ← round_acc( ((keep ? acc : 0) + (g ? g : 0)) · factor / divisor )
//
// (divisor N: the average of a gradient the library summed over N ranks, as the CPU backend's
// convert::divide_in_place; 1 otherwise, which changes no bit)
// in f32 arithmetic (the sum rounded once, then the product), stored in the buffer's dtype by
// round-to-nearest-even: the CPU backend's src/backend/cpu/accum.rs, bit for bit. Non-finite
// values propagate (the step's passes then find them). `g` NULL: the buffer alone (a parameter
// completed without a gradient of the last micro-batch). Grid-stride loop over elements.
#include "common.cuh"

struct AccumArgs {
  void* acc;
  const void* g;  // NULL: no gradient
  u64 n;
  float factor;  // 1, or 1/k when a mean over k micro-batches completes the buffer
  u32 keep;      // add to the buffer's contents (0: it holds nothing of this step yet)
  float divisor;  // 1, or the group size N when a gradient summed over N ranks is averaged
  u32 pad;
};

template <typename A, typename G>
LOMO_DEV void accum_body(const AccumArgs& x) {
  A* acc = static_cast<A*>(x.acc);
  const G* g = static_cast<const G*>(x.g);
  const bool keep = x.keep != 0;
  const u64 tid = (u64)blockIdx.x * blockDim.x + threadIdx.x;
  const u64 stride = (u64)gridDim.x * blockDim.x;
  for (u64 i = tid; i < x.n; i += stride) {
    float v;
    if (g != nullptr) {
      v = keep ? to_f32(acc[i]) + to_f32(g[i]) : to_f32(g[i]);
    } else {
      v = keep ? to_f32(acc[i]) : 0.0f;
    }
    store_f32(&acc[i], (v * x.factor) / x.divisor, false, 0u);
  }
}

#define LOMO_ACCUM(name, A, G) LOMO_KERNEL(name, AccumArgs, (accum_body<A, G>(a)))
LOMO_FOR_DTYPE_PAIRS(LOMO_ACCUM, accum_add)
