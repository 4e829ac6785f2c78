// lomo kernels: shared header (no CUDA headers needed; compiles under NVRTC and, with LOMO_EMU,
// as plain C++20 on the host through kernels/emu/cuda_emu.hpp).
//
// Contents: element types and their f32 load/store (f32, f16, bf16; round-to-nearest-even or
// stochastic rounding), Philox4x32-10 (the stream defined in src/backend/cpu/philox.rs), the
// gradient transform x = clamp(g·inv_scale, −v, v)·coef, warp and block reductions, the
// "last block finishes" ticket, and the device-side records shared with the Rust side
// (src/backend/cuda/abi.rs mirrors every struct here field by field).
//
// Numerics: kernels are compiled with --fmad=false; every fused multiply-add the CPU backend
// performs (f32::mul_add) is an explicit fmaf here, so both backends round the same way.
#pragma once

#if defined(LOMO_EMU)
#include "emu/cuda_emu.hpp"
#else
// Dynamic shared memory (the emulation provides its own definition).
#define LOMO_DYN_SMEM(type, name)                              \
  extern __shared__ __align__(16) unsigned char lomo_dyn_smem[]; \
  type* name = reinterpret_cast<type*>(lomo_dyn_smem)
#endif

#define LOMO_DEV static __device__ __forceinline__

typedef unsigned long long u64;
typedef unsigned int u32;

#define LOMO_THREADS 256
#define LOMO_WARPS (LOMO_THREADS / 32)

// ---------------------------------------------------------------------------------------------
// Records shared with the host (mirrored in src/backend/cuda/abi.rs).

// One per optimizer: the per-step scalars and the device-side loss scaler. Nothing here is read
// back by the host except through lomo_step_info_get / lomo_loss_scale.
struct LomoStep {
  float lr;               // learning rate of the current UPDATE phase (set by step_begin)
  float inv_scale;        // (float)(1 / scale)
  float coef;             // global-norm clip coefficient for the UPDATE phase (1 when off)
  u32 skip;               // a NORM-phase overflow turns the UPDATE phase into a no-op
  float beta;             // AdaLomo: β2t = 1 − t^decay_rate of the UPDATE phase (f64 → f32)
  float omb;              // AdaLomo: 1 − β2t
  u64 steps;              // applied UPDATE phases (AdaLomo's t is steps + 1)
  u64 skipped_total;
  double scale;           // the loss scaler's scale
  u32 cur_hysteresis;
  u32 has_norm;           // the current step had a NORM phase
  u64 cur_iter;
  long long last_overflow_iter;
  // Diagnostics of the last phase / step (lomo_step_info).
  float info_grad_norm;
  float info_clip_coef;
  float info_loss_scale;
  float info_next_loss_scale;
  u32 info_overflow;
  u32 info_skipped;
  u32 info_nonfinite;
  float scale_f32;        // the loss scale as f32 (lomo_cuda_loss_scale_ptr points here)
  u64 info_step;
};

// LomoTensor::flags: a replica whose Σg² another rank counts (LOMO_SHARD_NORM_DUPLICATE).
#define LOMO_TENSOR_NORM_DUPLICATE 1u

// One per registered tensor.
struct LomoTensor {
  double sum_sq;          // NORM: Σ(g·inv_scale)² (0 when non-finite)
  double psq;             // AdaLomo: Σp² used for RMS(p) in this step
  double psq_carried;     // AdaLomo: Σp² of the values written by the last apply
  double row_sum;         // AdaLomo: Σ row_new (factored)
  u32 bad;                // a non-finite gradient element was seen in this phase
  u32 ticket;             // "last block" counter, back to 0 after every kernel
  u32 carried_valid;      // psq_carried holds a value
  float row_mean;         // AdaLomo: mean(row_new)
  float decay;            // AdaLomo: p ← fma(u, neg_lr, p·decay)
  float neg_lr;
  float inv_clip;         // 1 / max(1, RMS(u) / clip_threshold)
  u32 flags;              // LOMO_TENSOR_NORM_DUPLICATE: its Σg² is counted on another rank
};

// ---------------------------------------------------------------------------------------------
// Element types. Storage wrappers keep f16/bf16 distinct for templates.

struct lomo_h16 { unsigned short b; };
struct lomo_b16 { unsigned short b; };

LOMO_DEV u32 f2u(float v) { return __float_as_uint(v); }
LOMO_DEV float u2f(u32 u) { return __uint_as_float(u); }
LOMO_DEV float lomo_nan() { return __uint_as_float(0x7fc00000u); }

LOMO_DEV float h16_to_f32(unsigned short h) {
  u32 sign = (u32)(h & 0x8000u) << 16;
  u32 exp = (h >> 10) & 0x1fu;
  u32 man = h & 0x3ffu;
  if (exp == 0) {
    float m = (float)man * 5.9604644775390625e-8f;  // man · 2^-24, exact
    return u2f(f2u(m) | sign);
  }
  if (exp == 31) return u2f(sign | 0x7f800000u | (man << 13));
  return u2f(sign | ((exp + 112u) << 23) | (man << 13));
}

// f32 → f16, round to nearest even (the `half` crate's algorithm; NaN stays a quiet NaN).
LOMO_DEV unsigned short f32_to_h16_rne(float v) {
  u32 x = f2u(v);
  u32 sign = x & 0x80000000u, exp = x & 0x7f800000u, man = x & 0x007fffffu;
  u32 hsign = sign >> 16;
  if (exp == 0x7f800000u) {
    u32 nan_bit = man == 0 ? 0u : 0x0200u;
    return (unsigned short)(hsign | 0x7c00u | nan_bit | (man >> 13));
  }
  int hexp = (int)(exp >> 23) - 127 + 15;
  if (hexp >= 0x1f) return (unsigned short)(hsign | 0x7c00u);
  if (hexp <= 0) {
    if (14 - hexp > 24) return (unsigned short)hsign;
    u32 m = man | 0x00800000u;
    u32 hman = m >> (14 - hexp);
    u32 round_bit = 1u << (13 - hexp);
    if ((m & round_bit) != 0 && (m & (3u * round_bit - 1u)) != 0) hman += 1;
    return (unsigned short)(hsign | hman);
  }
  u32 out = hsign | ((u32)hexp << 10) | (man >> 13);
  if ((man & 0x1000u) != 0 && (man & (3u * 0x1000u - 1u)) != 0) out += 1;
  return (unsigned short)out;
}

// f32 → f16, stochastic: one of the two neighbours, with probability proportional to closeness,
// from 24 random bits (src/backend/cpu/convert.rs f32_to_f16_sr).
LOMO_DEV unsigned short f32_to_h16_sr(float v, u32 r) {
  unsigned short nearb = f32_to_h16_rne(v);
  float nf = h16_to_f32(nearb);
  u32 vb = f2u(v);
  if ((vb & 0x7f800000u) == 0x7f800000u || nf == v) return nearb;
  float a = fabsf(v);
  u32 mag = nearb & 0x7fffu, sign = nearb & 0x8000u;
  bool nf_inf = (f2u(nf) & 0x7fffffffu) == 0x7f800000u;
  u32 lo_bits, hi_bits;
  if (nf_inf || fabsf(nf) > a) { lo_bits = mag - 1; hi_bits = mag; }
  else { lo_bits = mag; hi_bits = mag + 1; }
  float lo = h16_to_f32((unsigned short)lo_bits);
  float hi = hi_bits >= 0x7c00u ? 65536.0f : h16_to_f32((unsigned short)hi_bits);
  float frac = (a - lo) / (hi - lo);
  float u = (float)(r >> 8) * (1.0f / 16777216.0f);
  u32 bits = u < frac ? hi_bits : lo_bits;
  return (unsigned short)(sign | bits);
}

LOMO_DEV float b16_to_f32(unsigned short b) { return u2f((u32)b << 16); }

LOMO_DEV unsigned short f32_to_b16_rne(float v) {
  u32 u = f2u(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
  return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

LOMO_DEV unsigned short f32_to_b16_sr(float v, u32 r) {
  u32 u = f2u(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
  if ((u & 0x7fffffffu) == 0x7f800000u) return (unsigned short)(u >> 16);
  return (unsigned short)((u + (r & 0xffffu)) >> 16);
}

// Loads / finiteness / stores per storage type.
LOMO_DEV float to_f32(float v) { return v; }
LOMO_DEV float to_f32(lomo_h16 v) { return h16_to_f32(v.b); }
LOMO_DEV float to_f32(lomo_b16 v) { return b16_to_f32(v.b); }

LOMO_DEV bool bad_bits(float v) { return (f2u(v) & 0x7f800000u) == 0x7f800000u; }
LOMO_DEV bool bad_bits(lomo_h16 v) { return (v.b & 0x7c00u) == 0x7c00u; }
LOMO_DEV bool bad_bits(lomo_b16 v) { return (v.b & 0x7f80u) == 0x7f80u; }

// `r` is the element's Philox word; used only with stochastic rounding.
LOMO_DEV void store_f32(float* p, float v, bool sr, u32 r) { (void)sr; (void)r; *p = v; }
LOMO_DEV void store_f32(lomo_h16* p, float v, bool sr, u32 r) {
  p->b = sr ? f32_to_h16_sr(v, r) : f32_to_h16_rne(v);
}
LOMO_DEV void store_f32(lomo_b16* p, float v, bool sr, u32 r) {
  p->b = sr ? f32_to_b16_sr(v, r) : f32_to_b16_rne(v);
}

// ---------------------------------------------------------------------------------------------
// 16-byte (or 8-byte) vector access: VEC elements per thread per iteration.

struct alignas(16) lomo_v16 { u32 w[4]; };
struct alignas(8) lomo_v8 { u32 w[2]; };

// Elements per vector step: 4 when either operand is f32 (16 B of f32), 8 when both are 16-bit
// (16 B each).
template <typename P, typename G> struct VecWidth {
  static const int value = (sizeof(P) == 2 && sizeof(G) == 2) ? 8 : 4;
};

// V elements of T as 16-byte words (V·sizeof(T) is 8, 16 or 32 bytes).
template <typename T, int V> union VecBits {
  static const int W16 = (int)(V * sizeof(T)) / 16;
  lomo_v16 w16[W16 > 0 ? W16 : 1];
  lomo_v8 w8;
  T e[V];
};

template <typename T, int V>
LOMO_DEV void load_vec(const T* base, u64 i, T out[V]) {
  VecBits<T, V> u;
  if (V * sizeof(T) == 8) {
    u.w8 = *reinterpret_cast<const lomo_v8*>(base + i);
  } else {
    const lomo_v16* src = reinterpret_cast<const lomo_v16*>(base + i);
    for (int k = 0; k < VecBits<T, V>::W16; ++k) u.w16[k] = src[k];
  }
  for (int k = 0; k < V; ++k) out[k] = u.e[k];
}

template <typename T, int V>
LOMO_DEV void store_vec(T* base, u64 i, const T in[V]) {
  VecBits<T, V> u;
  for (int k = 0; k < V; ++k) u.e[k] = in[k];
  if (V * sizeof(T) == 8) {
    *reinterpret_cast<lomo_v8*>(base + i) = u.w8;
  } else {
    lomo_v16* dst = reinterpret_cast<lomo_v16*>(base + i);
    for (int k = 0; k < VecBits<T, V>::W16; ++k) dst[k] = u.w16[k];
  }
}

// Whether both buffers allow V-element vector access starting at element 0.
template <typename P, typename G, int V>
LOMO_DEV bool vec_ok(const void* p, const void* g) {
  return ((u64)p % (V * sizeof(P))) == 0 && ((u64)g % (V * sizeof(G))) == 0;
}

// ---------------------------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al., SC'11) and the per-element word of src/backend/cpu/philox.rs:
// word e % 4 of philox(counter = [e/4 lo, e/4 hi, step, param_id], key = [seed lo, seed hi]).

struct Philox4 { u32 v[4]; };

LOMO_DEV Philox4 philox4x32_10(u32 c0, u32 c1, u32 c2, u32 c3, u32 k0, u32 k1) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) { k0 += 0x9E3779B9u; k1 += 0xBB67AE85u; }
    u64 p0 = (u64)0xD2511F53u * c0;
    u64 p1 = (u64)0xCD9E8D57u * c2;
    u32 hi0 = (u32)(p0 >> 32), lo0 = (u32)p0, hi1 = (u32)(p1 >> 32), lo1 = (u32)p1;
    u32 n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
  }
  Philox4 r;
  r.v[0] = c0; r.v[1] = c1; r.v[2] = c2; r.v[3] = c3;
  return r;
}

struct RoundCtx {
  bool sr;
  u64 seed;
  u32 step;
  u32 param_id;
};

LOMO_DEV Philox4 philox_block(const RoundCtx& rc, u64 q) {
  return philox4x32_10((u32)q, (u32)(q >> 32), rc.step, rc.param_id, (u32)rc.seed,
                       (u32)(rc.seed >> 32));
}

LOMO_DEV u32 random_word(const RoundCtx& rc, u64 e) {
  return philox_block(rc, e >> 2).v[e & 3];
}

// Words for V consecutive elements starting at e0: one Philox call per 4 when e0 is a multiple
// of 4 (a piece of a tensor may start anywhere: then element by element, the same words).
template <int V>
LOMO_DEV void random_words(const RoundCtx& rc, u64 e0, u32 out[V]) {
  if (!rc.sr) {
    for (int k = 0; k < V; ++k) out[k] = 0;
    return;
  }
  if (e0 & 3u) {
    for (int k = 0; k < V; ++k) out[k] = random_word(rc, e0 + k);
    return;
  }
  for (int k = 0; k < V; k += 4) {
    Philox4 w = philox_block(rc, (e0 + k) >> 2);
    for (int j = 0; j < 4; ++j) out[k + j] = w.v[j];
  }
}

// ---------------------------------------------------------------------------------------------
// a / b, correctly rounded (= IEEE a / b) for finite a and |b| in [2^-125, 2^125], without the
// subroutine call of the full-range IEEE division (whose calling convention made ptxas spill in
// the AdaLomo row loop). q0 = __fdividef(a, b) is within a few f32 ulps; two Newton corrections
// in f64 (the first residual is exact) bring it within 2^-52 relative, and an f32 quotient is
// never closer than 2^-49 to a rounding midpoint, so the final f64 → f32 rounding is exact.
LOMO_DEV float div_rn(float a, float b) {
  const float q0 = __fdividef(a, b);
  if (bad_bits(q0)) return q0;
  const double x = (double)a, y = (double)b, r = (double)__fdividef(1.0f, b);
  double q = (double)q0;
  q = fma(fma(-q, y, x), r, q);
  q = fma(fma(-q, y, x), r, q);
  return (float)q;
}

// ---------------------------------------------------------------------------------------------
// The gradient transform (src/backend/mod.rs GradXform::apply).

struct Xform {
  float inv_scale;
  float clip_value;  // +inf when value clipping is off
  float coef;
};

LOMO_DEV float xform(const Xform& xf, float g) {
  float s = g * xf.inv_scale;
  s = fminf(fmaxf(s, -xf.clip_value), xf.clip_value);
  return s * xf.coef;
}

// ---------------------------------------------------------------------------------------------
// Reductions (fixed order: deterministic for a given launch geometry).

template <typename T>
LOMO_DEV T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

LOMO_DEV u32 warp_or(u32 v) {
  for (int o = 16; o > 0; o >>= 1) v |= __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Block-wide sum, returned to every thread. `scratch` holds LOMO_WARPS values. Every thread of
// the block must call it.
template <typename T>
LOMO_DEV T block_sum(T v, T* scratch) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = scratch[0];
  for (int w = 1; w < LOMO_WARPS; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

LOMO_DEV u32 block_or(u32 v, u32* scratch) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_or(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  u32 total = 0;
  for (int w = 0; w < LOMO_WARPS; ++w) total |= scratch[w];
  __syncthreads();
  return total;
}

// The blocks of one tensor's pass: this block's index among them and their number — the launch's
// own grid, or a tensor's share of a multi-tensor launch (kernels *_multi: each tensor keeps the
// grid of its own launch, so its results are bit for bit those of that launch).
struct Grid {
  u32 bid;
  u32 n;
};

LOMO_DEV Grid launch_grid() { return Grid{blockIdx.x, gridDim.x}; }

// Multi-tensor launches (apex's multi_tensor_apply, by value in the argument struct): at most
// this many tensors, each with its own grid of at most LOMO_MULTI_GRID blocks.
#define LOMO_MULTI 24
#define LOMO_MULTI_GRID 4

// The tensor of a multi-tensor launch that block blockIdx.x works on: descriptors are in launch
// order, tensor i owning blocks [block0_i, block0_i + grid_i).
template <typename D>
LOMO_DEV const D& multi_desc(const D* d, u32 n_tensors, Grid* g) {
  u32 i = 0;
  while (i + 1 < n_tensors && blockIdx.x >= d[i + 1].block0) ++i;
  *g = Grid{blockIdx.x - d[i].block0, d[i].grid};
  return d[i];
}

// "Last block finishes": after each block published its partial, the block that takes the last
// of `n_blocks` tickets sees every partial (threadfence before the ticket) and resets the counter.
LOMO_DEV bool last_block(u32* ticket, u32* flag_smem, u32 n_blocks) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    u32 t = atomicAdd(ticket, 1u);
    *flag_smem = (t == n_blocks - 1) ? 1u : 0u;
  }
  __syncthreads();
  bool last = *flag_smem != 0;
  if (last) {
    __threadfence();
    if (threadIdx.x == 0) *ticket = 0;
  }
  return last;
}

LOMO_DEV bool last_block(u32* ticket, u32* flag_smem) {
  return last_block(ticket, flag_smem, gridDim.x);
}

// A flag other blocks of the running kernel set (atomicOr, performed in L2), read by the last
// block: a volatile load, because L1 is not coherent across SMs and may still hold the line from
// an earlier read in this kernel (e.g. `carried_valid` shares the record's line with `bad`).
LOMO_DEV u32 load_fresh(const u32* p) { return *(const volatile u32*)p; }

// Sum of `n` doubles in a fixed order by one block (partials of a previous phase).
LOMO_DEV double block_sum_array(const volatile double* a, u32 n, double* scratch) {
  double acc = 0.0;
  for (u32 i = threadIdx.x; i < n; i += blockDim.x) acc += a[i];
  return block_sum(acc, scratch);
}

// AdaLomo's relative step (src/backend/scalars.rs adalomo_scalars / update_clip / param_rms).
LOMO_DEV void adalomo_scalars(double lr, double wd, double eps2, double clip_threshold,
                              double psq, double usq, u64 numel, LomoTensor* t) {
  float sqrt_n = (float)sqrt((double)numel);
  float rms = (float)sqrt(psq) / sqrt_n;
  float decay, neg_lr;
  if ((double)rms > eps2) {
    float lr_eff = (float)lr * rms;
    decay = wd > 0.0 ? 1.0f - lr_eff * (float)wd : 1.0f;
    neg_lr = -lr_eff;
  } else {
    double lr_eff = lr * eps2;
    decay = (float)(1.0 - lr_eff * wd);
    neg_lr = (float)(-lr_eff);
  }
  float urms = (float)sqrt(usq) / sqrt_n;
  float div = fmaxf(urms / (float)clip_threshold, 1.0f);
  t->decay = decay;
  t->neg_lr = neg_lr;
  t->inv_clip = 1.0f / div;
}


// ---------------------------------------------------------------------------------------------
// Kernel instantiation. Every kernel takes one argument struct by value. In the host emulation
// each instantiation also registers a launcher entry under its symbol name (kernels/emu/).

// LOMO_KERNEL_OCC also asks for `min_blocks` resident blocks per multiprocessor (a register
// budget of 65536 / (LOMO_THREADS · min_blocks) per thread).
#if defined(LOMO_EMU)
#include "emu/registry.hpp"
#define LOMO_KERNEL_OCC(name, Args, min_blocks, body)                   \
  extern "C" __global__ void name(Args a) { body; }                     \
  static emu::Registrar<Args> name##_registrar(#name, &name);
#else
#define LOMO_KERNEL_OCC(name, Args, min_blocks, body) \
  extern "C" __global__ void __launch_bounds__(LOMO_THREADS, min_blocks) name(Args a) { body; }
#endif
#define LOMO_KERNEL(name, Args, body) LOMO_KERNEL_OCC(name, Args, 1, body)

#define LOMO_FOR_DTYPE_PAIRS(M, algo_phase)                                          \
  M(algo_phase##_f32_f32, float, float) M(algo_phase##_f32_f16, float, lomo_h16)     \
  M(algo_phase##_f32_bf16, float, lomo_b16) M(algo_phase##_f16_f32, lomo_h16, float) \
  M(algo_phase##_f16_f16, lomo_h16, lomo_h16)                                        \
  M(algo_phase##_f16_bf16, lomo_h16, lomo_b16)                                       \
  M(algo_phase##_bf16_f32, lomo_b16, float)                                          \
  M(algo_phase##_bf16_f16, lomo_b16, lomo_h16)                                       \
  M(algo_phase##_bf16_bf16, lomo_b16, lomo_b16)
