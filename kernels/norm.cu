// lomo kernels: the NORM-phase pass (reference/semantics.md §1.2, §2.4 a), also used as the
// non-finite pre-check of LOMO's UPDATE phase when no NORM phase ran.
//
//   sum_sq = Σ_i (g_i · inv_scale)²        bad = ∃ i: g_i is ±inf or NaN
//
// One launch per tensor: every block accumulates its grid-stride share in f32 per thread, reduces
// in f64, and publishes one partial; the last block (ticket) sums the partials in block order into
// LomoTensor::sum_sq (0 when bad). Deterministic for a given grid. With check_only only the flag
// is formed (and, for a piece of a tensor, written to the piece's record as the f64 count that
// the ranks all-reduce before the update reads it). inv_scale comes from the device LomoStep, so no host value is needed per step.
#include "common.cuh"

struct NormArgs {
  const void* g;
  u64 n;
  LomoStep* step;
  LomoTensor* t;
  double* partials;  // one slot per block
  u32 check_only;
  u32 pad;
  double* piece;  // check_only on a piece of a tensor: its record, [non-finite (0 or 1)]
};

template <typename G>
LOMO_DEV void norm_body(const NormArgs& a, const Grid grid) {
  __shared__ double sd[LOMO_WARPS];
  __shared__ u32 su[LOMO_WARPS];
  __shared__ u32 last;
  const G* g = static_cast<const G*>(a.g);
  const float inv = a.step->inv_scale;
  const bool sum = a.check_only == 0;
  const int V = 16 / (int)sizeof(G);
  const u64 tid = (u64)grid.bid * blockDim.x + threadIdx.x;
  const u64 stride = (u64)grid.n * blockDim.x;
  float acc = 0.0f;
  u32 bad = 0;
  u64 done = 0;
  if ((u64)g % 16 == 0) {
    const u64 nv = a.n / V;
    // Four vectors in flight per thread (loads first), visited in the same order as one by one.
    const int U = 4;
    u64 i = tid;
    for (; i + (U - 1) * stride < nv; i += U * stride) {
      G e[U][V];
#pragma unroll
      for (int u = 0; u < U; ++u) load_vec<G, V>(g, (i + u * stride) * V, e[u]);
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int k = 0; k < V; ++k) {
          bad |= bad_bits(e[u][k]) ? 1u : 0u;
          float v = to_f32(e[u][k]) * inv;
          if (sum) acc += v * v;
        }
      }
    }
    for (; i < nv; i += stride) {
      G e[V];
      load_vec<G, V>(g, i * V, e);
      for (int k = 0; k < V; ++k) {
        bad |= bad_bits(e[k]) ? 1u : 0u;
        float v = to_f32(e[k]) * inv;
        if (sum) acc += v * v;
      }
    }
    done = nv * V;
  }
  for (u64 i = done + tid; i < a.n; i += stride) {
    bad |= bad_bits(g[i]) ? 1u : 0u;
    float v = to_f32(g[i]) * inv;
    if (sum) acc += v * v;
  }
  double total = block_sum((double)acc, sd);
  u32 any_bad = block_or(bad, su);
  if (threadIdx.x == 0) {
    a.partials[grid.bid] = total;
    if (any_bad) atomicOr(&a.t->bad, 1u);
  }
  if (last_block(&a.t->ticket, &last, grid.n)) {
    double s = block_sum_array(a.partials, grid.n, sd);
    if (threadIdx.x == 0) {
      const u32 bad = load_fresh(&a.t->bad);
      a.t->sum_sq = (sum && bad == 0) ? s : 0.0;
      if (a.piece) a.piece[0] = (bad & 1u) ? 1.0 : 0.0;
    }
  }
}

// One tensor of a multi-tensor NORM launch (its own grid and partials).
struct NormDesc {
  const void* g;
  u64 n;
  LomoTensor* t;
  double* partials;
  u32 grid;
  u32 block0;
};

// Up to LOMO_MULTI small gradients of one dtype in one launch, each exactly as its own launch.
struct NormMultiArgs {
  LomoStep* step;
  u32 n_tensors;
  u32 check_only;
  NormDesc d[LOMO_MULTI];
};

template <typename G>
LOMO_DEV void norm_multi_body(const NormMultiArgs& m) {
  Grid grid;
  const NormDesc& d = multi_desc(m.d, m.n_tensors, &grid);
  const NormArgs a = {d.g, d.n, m.step, d.t, d.partials, m.check_only, 0u, nullptr};
  norm_body<G>(a, grid);
}

LOMO_KERNEL(norm_sumsq_f32, NormArgs, norm_body<float>(a, launch_grid()))
LOMO_KERNEL(norm_sumsq_f16, NormArgs, norm_body<lomo_h16>(a, launch_grid()))
LOMO_KERNEL(norm_sumsq_bf16, NormArgs, norm_body<lomo_b16>(a, launch_grid()))
LOMO_KERNEL(norm_multi_f32, NormMultiArgs, norm_multi_body<float>(a))
LOMO_KERNEL(norm_multi_f16, NormMultiArgs, norm_multi_body<lomo_h16>(a))
LOMO_KERNEL(norm_multi_bf16, NormMultiArgs, norm_multi_body<lomo_b16>(a))
