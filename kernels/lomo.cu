// lomo kernels: the LOMO update, one pass over p and g (reference/semantics.md §2.4):
//
//   x = clamp(g · inv_scale, −v, v) · coef
//   p ← round( fma(x, −lr, p · (1 − lr·wd)) )      lr = step.lr · group multiplier (f64 → f32)
//
// inv_scale, coef, lr, skip and the step counter (stochastic rounding) are read from the device
// LomoStep. A non-finite gradient element is never written: without a clean NORM phase the
// pre-check (norm.cu, check_only) has set LomoTensor::bad and the whole tensor is left alone;
// after a clean NORM phase each element is checked before its write. 16-byte vectors when both
// buffers are aligned, scalar tail, grid-stride loop.
#include "common.cuh"

struct LomoArgs {
  void* p;
  const void* g;
  u64 n;
  LomoStep* step;
  LomoTensor* t;
  double lr_mult;
  double weight_decay;
  float clip_value;  // +inf when off
  u32 param_id;
  u64 seed;
  u32 prechecked;  // a clean NORM phase checked every gradient (no pre-check launch)
  u32 rounding;    // 0 nearest, 1 stochastic
  const double* piece;  // a piece without a NORM phase: the reduced non-finite count
  u64 elem_offset;      // global index of element 0 (stochastic rounding of a piece)
  // A piece of columns (LOMO_LAYOUT_COLS): its columns per row, and the global columns C, which
  // separate its rows in the global tensor (element i is global (i / cols)·C + elem_offset +
  // i mod cols); row_stride 0 otherwise (element i is global elem_offset + i).
  u64 cols;
  u64 row_stride;
};

template <typename P, typename G>
LOMO_DEV float lomo_elem(P* p, G g, const Xform& xf, float decay, float neg_lr, bool sr, u32 w,
                         u32* bad) {
  if (bad_bits(g)) {
    *bad = 1;
    return 0.0f;
  }
  float x = xform(xf, to_f32(g));
  float v = fmaf(x, neg_lr, to_f32(*p) * decay);
  const P old = *p;
  store_f32(p, v, sr, w);
  if (bad_bits(*p)) {  // the new value overflows P: keep the old one, report (bit 2)
    *p = old;
    *bad |= 2u;
  }
  return v;
}

template <typename P, typename G>
LOMO_DEV void lomo_body(const LomoArgs& a, const Grid grid) {
  __shared__ u32 su[LOMO_WARPS];
  const LomoStep* st = a.step;
  if (st->skip) return;
  if (!a.prechecked && (a.t->bad & 1u)) return;  // bit 1: the pre-check's non-finite gradient
  if (!a.prechecked && a.piece && a.piece[0] != 0.0) {  // another rank's piece was not finite
    if (grid.bid == 0 && threadIdx.x == 0) atomicOr(&a.t->bad, 1u);
    return;
  }
  const double lr = (double)st->lr * a.lr_mult;
  const float decay = (float)(1.0 - lr * a.weight_decay);
  const float neg_lr = (float)(-lr);
  const Xform xf = {st->inv_scale, a.clip_value, st->coef};
  const RoundCtx rc = {a.rounding == 1, a.seed, (u32)(st->steps + 1), a.param_id};
  P* p = static_cast<P*>(a.p);
  const G* g = static_cast<const G*>(a.g);
  const int V = VecWidth<P, G>::value;
  const u64 tid = (u64)grid.bid * blockDim.x + threadIdx.x;
  const u64 stride = (u64)grid.n * blockDim.x;
  u32 bad = 0;
  u64 done = 0;
  const bool colp = a.row_stride != 0;
  if (!colp && vec_ok<P, G, V>(p, g)) {
    const u64 nv = a.n / V;
    for (u64 i = tid; i < nv; i += stride) {
      P pv[V];
      G gv[V];
      u32 w[V];
      load_vec<P, V>(p, i * V, pv);
      load_vec<G, V>(g, i * V, gv);
      random_words<V>(rc, a.elem_offset + i * V, w);
      for (int k = 0; k < V; ++k) lomo_elem(&pv[k], gv[k], xf, decay, neg_lr, rc.sr, w[k], &bad);
      store_vec<P, V>(p, i * V, pv);
    }
    done = nv * V;
  }
  for (u64 i = done + tid; i < a.n; i += stride) {
    const u64 gi = colp ? (i / a.cols) * a.row_stride + a.elem_offset + i % a.cols
                        : a.elem_offset + i;
    u32 w = rc.sr ? random_word(rc, gi) : 0u;
    lomo_elem(&p[i], g[i], xf, decay, neg_lr, rc.sr, w, &bad);
  }
  const u32 any = block_or(bad, su);
  if (any && threadIdx.x == 0) atomicOr(&a.t->bad, any);
}

// One tensor of a multi-tensor LOMO launch (its own grid; whole tensors only).
struct LomoDesc {
  void* p;
  const void* g;
  u64 n;
  LomoTensor* t;
  double lr_mult;
  double weight_decay;
  u32 param_id;
  u32 grid;
  u32 block0;
  u32 pad;
};

// Up to LOMO_MULTI small tensors of one dtype pair in one launch, each exactly as its own launch.
struct LomoMultiArgs {
  LomoStep* step;
  u64 seed;
  float clip_value;
  u32 prechecked;
  u32 rounding;
  u32 n_tensors;
  LomoDesc d[LOMO_MULTI];
};

template <typename P, typename G>
LOMO_DEV void lomo_multi_body(const LomoMultiArgs& m) {
  Grid grid;
  const LomoDesc& d = multi_desc(m.d, m.n_tensors, &grid);
  const LomoArgs a = {d.p,      d.g,          d.n,        m.step,     d.t,          d.lr_mult,
                      d.weight_decay, m.clip_value, d.param_id, m.seed, m.prechecked, m.rounding,
                      nullptr,  0ull,         0ull,       0ull};
  lomo_body<P, G>(a, grid);
}

#define LOMO_UPDATE(name, P, G) LOMO_KERNEL(name, LomoArgs, (lomo_body<P, G>(a, launch_grid())))
#define LOMO_MULTI_UPDATE(name, P, G) LOMO_KERNEL(name, LomoMultiArgs, (lomo_multi_body<P, G>(a)))
LOMO_FOR_DTYPE_PAIRS(LOMO_UPDATE, lomo_update)
LOMO_FOR_DTYPE_PAIRS(LOMO_MULTI_UPDATE, lomo_multi)
