// lomo kernels: AdaLomo (reference/semantics.md §3.3; src/backend/cpu/adalomo.rs is the spec).
//
//   x = clamp(g · inv_scale, −v, v) · coef,   U = x² + ε1,   β = 1 − t^d  (f64 → f32)
//   factored ([R, C] view of rank ≥ 2):
//     row_i ← fma(mean_j U_ij, 1−β, row_i·β)      col_j ← fma(mean_i U_ij, 1−β, col_j·β)
//     r_i = 1/sqrt(row_i / mean(row)),  c_j = 1/sqrt(col_j),  u_ij = (r_i·c_j)·x_ij
//     Σu² = mean(row) · Σ_j D_j / col_j  with  D_j = Σ_i x²_ij / row_i   (no extra pass over g)
//   vector (rank ≤ 1):  v ← fma(U, 1−β, v·β),  u = (1/sqrt(v))·x,  Σu² directly
//   û = u / max(1, RMS(u)/τ);   p ← round( fma(û, −η_eff, p·decay) ),  η_eff = η·max(ε2, RMS(p))
//
// Factored, three launches: stats (pass A: reads g, and p for Σp² unless carried; blocks own
// whole rows, keep per-column Σ U and D_j in shared memory — or their own global slab when the
// row is too long — and publish per-block partials), finalize (sums the partials per column in
// block order, commits row/column state, forms Σu² and the step scalars in its last block), apply
// (pass C). Vector, two launches: stats (finishing with the scalars) and apply. Nothing is
// committed when the gradient has a non-finite element (LomoTensor::bad) or the step is skipped.
#include "common.cuh"
// Finalize (adalomo_finalize, and the pieces' kernels) is in adalomo_finalize.cu, compiled
// appended to this file as one program.

#define ADA_CARRY 1u  // use Σp² carried from the last apply when valid; carry the written Σp²
#define ADA_SMEM 2u   // stats keeps the column accumulators in dynamic shared memory
// A piece of columns (LOMO_LAYOUT_COLS; src/backend/cpu/ada_cols.rs is the spec), two rounds:
// ADA_COLS1, stats writes [b_i = Σ_{j∈J} U_ij (R) ‖ Σp² ‖ nf] into the piece record (all-reduced,
// R + 2 values); ADA_COLS2, stats runs again with the new rows from the reduced b_i / C (D_j
// with the true rows; p not read) and finalize leaves Σ_{j∈J} D_j / col_j in the record's last
// value (all-reduced, 1 value) and the new state in workspaces instead of committing it and
// forming the scalars, which adalomo_cols_finish then does.
#define ADA_COLS1 4u
#define ADA_COLS2 8u

struct AdaArgs {
  void* p;
  const void* g;
  u64 rows;          // factored: R; vector: numel
  u64 cols;          // factored: C; vector: 1
  float* state_a;    // factored: row state [R]; vector: v [numel]
  float* state_b;    // factored: column state [C]
  float* ws_a;       // factored: new rows [R]; vector: new v [numel]
  float* ws_r;       // factored: r_i [R]
  float* ws_c;       // factored: c_j [C]
  float* col_part;   // factored: [stats blocks][2][C]
  double* partials;  // 2 × stats blocks
  LomoStep* step;
  LomoTensor* t;
  double lr_mult;
  double weight_decay;
  double eps2;
  double clip_threshold;
  float eps1;
  float clip_value;
  u64 seed;
  u32 param_id;
  u32 rounding;
  u32 flags;
  u32 stats_blocks;  // finalize: the grid of the stats launch
  // A piece of rows of a tensor held by several ranks (notes/distributed.md §3), else null: its
  // record, all-reduced between the statistics and finalize — factored [Σ_i U_ij (C) ‖ D_j (C) ‖
  // Σrow ‖ Σp² ‖ nf], vector [Σu² ‖ Σp² ‖ nf].
  double* piece;
  u64 global_rows;  // rows of the global [R, C] view (vector: global numel)
  u64 elem_offset;  // global index of the piece's element 0 (stochastic rounding)
  u64 row_stride;   // global index distance between rows: C of the global view (factored)
};

LOMO_DEV bool ada_need_psq(const AdaArgs& a) {
  return !((a.flags & ADA_CARRY) && a.t->carried_valid);
}

struct alignas(16) lomo_f4 { float v[4]; };

// acc_c[c] += s_c + ε1 and acc_d[c] += s_c · inv for the V columns [c0, c0 + V): as 16-byte
// words when `wide` (V is a multiple of 4 and both rows are 16-byte aligned), so that a warp's
// shared-memory accesses fall on distinct banks; element by element otherwise.
template <int V>
LOMO_DEV void acc_add(float* acc_c, float* acc_d, u64 c0, const float s[V], float eps1, float inv,
                      bool wide) {
  if (wide && V % 4 == 0) {
    lomo_f4* pc = reinterpret_cast<lomo_f4*>(acc_c + c0);
    lomo_f4* pd = reinterpret_cast<lomo_f4*>(acc_d + c0);
#pragma unroll
    for (int w = 0; w < V / 4; ++w) {
      lomo_f4 c = pc[w], d = pd[w];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        c.v[k] += s[4 * w + k] + eps1;
        d.v[k] += s[4 * w + k] * inv;
      }
      pc[w] = c;
      pd[w] = d;
    }
  } else {
    for (int k = 0; k < V; ++k) {
      acc_c[c0 + k] += s[k] + eps1;
      acc_d[c0 + k] += s[k] * inv;
    }
  }
}

// One segment of a row (vector path): thread t's columns c0 = s0 + (r·blockDim + t)·V, r < NR.
LOMO_DEV u64 seg_col(u64 s0, int r, int V) {
  return s0 + ((u64)r * blockDim.x + threadIdx.x) * (u64)V;
}

// Issues the loads of one segment of g (and of p when `need_psq`); nothing is used yet.
template <typename P, typename G, int V, int NR>
LOMO_DEV void seg_load(const G* g, const P* p, u64 base, u64 s0, u64 cols, bool need_psq,
                       G gv[NR][V], P pv[NR][V]) {
#pragma unroll
  for (int r = 0; r < NR; ++r) {
    const u64 c0 = seg_col(s0, r, V);
    if (c0 < cols) {
      load_vec<G, V>(g, base + c0, gv[r]);
      if (need_psq) load_vec<P, V>(p, base + c0, pv[r]);
    }
  }
}

// Pass A's first sweep over one loaded segment: x into `xs`, Σ(x² + ε1), Σp² and the flag.
template <typename P, typename G, int V, int NR>
LOMO_DEV void seg_stats(const G gv[NR][V], const P pv[NR][V], u64 s0, u64 cols, bool need_psq,
                        const Xform& xf, float eps1, float xs[NR][V], float* racc, float* pacc,
                        u32* bad) {
#pragma unroll
  for (int r = 0; r < NR; ++r) {
    if (seg_col(s0, r, V) < cols) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        *bad |= bad_bits(gv[r][k]) ? 1u : 0u;
        const float x = xform(xf, to_f32(gv[r][k]));
        xs[r][k] = x;
        *racc += x * x + eps1;
      }
      if (need_psq) {
#pragma unroll
        for (int k = 0; k < V; ++k) *pacc += to_f32(pv[r][k]) * to_f32(pv[r][k]);
      }
    }
  }
}

// Column ownership: thread t owns columns [c0, c0 + V) with c0 = s0 + (r·blockDim + t)·V for
// every segment s0 (a multiple of blockDim·V·NR) and r < NR (vector path), or c ≡ t mod blockDim
// (scalar path), for both sweeps of every row; per thread, columns are visited in increasing
// order. The vector path issues all NR loads of a segment before using them and keeps the
// segment's x values in registers for the second sweep. Rows of one segment (at most
// blockDim·V·NR columns) are read once, and the next row's loads (and its old row state) are
// issued before the current row is reduced, so a block has a row in flight while it reduces and
// accumulates; longer rows re-read each segment (from cache) for the second sweep.
template <typename P, typename G>
LOMO_DEV void ada_stats_rows(const AdaArgs& a) {
  __shared__ float sf[LOMO_WARPS];
  __shared__ double sd[LOMO_WARPS];
  __shared__ u32 su[LOMO_WARPS];
  __shared__ u32 last;
  const LomoStep* st = a.step;
  if (st->skip) return;
  const float beta = st->beta, omb = st->omb;
  const Xform xf = {st->inv_scale, a.clip_value, st->coef};
  const bool cols1 = (a.flags & ADA_COLS1) != 0, cols2 = (a.flags & ADA_COLS2) != 0;
  if (cols2 && a.piece[a.rows + 1] != 0.0) {  // some rank's piece was not finite
    if (blockIdx.x == 0 && threadIdx.x == 0) atomicOr(&a.t->bad, 1u);
    return;
  }
  const bool need_psq = !cols2 && ada_need_psq(a);
  const P* p = static_cast<const P*>(a.p);
  const G* g = static_cast<const G*>(a.g);
  const u64 cols = a.cols;
  float* acc_c;
  if (a.flags & ADA_SMEM) {
    LOMO_DYN_SMEM(float, sm);
    acc_c = sm;
  } else {
    acc_c = a.col_part + (u64)blockIdx.x * 2 * cols;
  }
  float* acc_d = acc_c + cols;
  const bool wide = (u64)acc_c % 16 == 0 && cols % 4 == 0;
  for (u64 j = threadIdx.x; j < 2 * cols; j += blockDim.x) acc_c[j] = 0.0f;
  __syncthreads();
  const int V = VecWidth<P, G>::value;
  const int NR = 16 / V;  // vectors per thread and segment: 16 cached values
  const u64 seg = (u64)blockDim.x * V * NR;
  const bool vec = vec_ok<P, G, V>(p, g) && cols % V == 0;
  const bool one_seg = vec && cols <= seg;
  u32 bad = 0;
  double psq = 0.0, row_total = 0.0;
  G gn[NR][V];  // one-segment rows: the next row's loads, in flight
  P pn[NR][V];
  float old_next = 0.0f;
  if (one_seg && blockIdx.x < a.rows) {
    seg_load<P, G, V, NR>(g, p, (u64)blockIdx.x * cols, 0, cols, need_psq, gn, pn);
    old_next = a.state_a[blockIdx.x];
  }
  for (u64 row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const u64 base = row * cols;
    float racc = 0.0f, pacc = 0.0f;
    float xs[NR][V];
    const float old = one_seg ? old_next : a.state_a[row];
    if (one_seg) {
      // This row's loads (issued one row ago) are consumed, then the next row's are issued.
      seg_stats<P, G, V, NR>(gn, pn, 0, cols, need_psq, xf, a.eps1, xs, &racc, &pacc, &bad);
      const u64 next = row + gridDim.x;
      if (next < a.rows) {
        seg_load<P, G, V, NR>(g, p, next * cols, 0, cols, need_psq, gn, pn);
        old_next = a.state_a[next];
      }
    } else if (vec) {
      for (u64 s0 = 0; s0 < cols; s0 += seg) {
        G gv[NR][V];
        P pv[NR][V];
        seg_load<P, G, V, NR>(g, p, base, s0, cols, need_psq, gv, pv);
        seg_stats<P, G, V, NR>(gv, pv, s0, cols, need_psq, xf, a.eps1, xs, &racc, &pacc, &bad);
      }
    } else {
      for (u64 c = threadIdx.x; c < cols; c += blockDim.x) {
        bad |= bad_bits(g[base + c]) ? 1u : 0u;
        float x = xform(xf, to_f32(g[base + c]));
        racc += x * x + a.eps1;
        if (need_psq) pacc += to_f32(p[base + c]) * to_f32(p[base + c]);
      }
    }
    psq += (double)pacc;
    const float sum = block_sum(racc, sf);
    if (cols1 && threadIdx.x == 0) a.piece[row] = (double)sum;
    const float mean =
        cols2 ? (float)(a.piece[row] / (double)a.row_stride) : div_rn(sum, (float)cols);
    const float rn = fmaf(mean, omb, old * beta);
    if (threadIdx.x == 0) {
      a.ws_a[row] = rn;
      row_total += (double)rn;
    }
    const float inv = div_rn(1.0f, rn);
    if (vec) {
      for (u64 s0 = 0; s0 < cols; s0 += seg) {
        if (!one_seg) {  // xs holds the last segment: load this one again
#pragma unroll
          for (int r = 0; r < NR; ++r) {
            const u64 c0 = seg_col(s0, r, V);
            if (c0 < cols) {
              G gv[V];
              load_vec<G, V>(g, base + c0, gv);
#pragma unroll
              for (int k = 0; k < V; ++k) xs[r][k] = xform(xf, to_f32(gv[k]));
            }
          }
        }
#pragma unroll
        for (int r = 0; r < NR; ++r) {
          const u64 c0 = seg_col(s0, r, V);
          if (c0 < cols) {
            float sq[V];
#pragma unroll
            for (int k = 0; k < V; ++k) sq[k] = xs[r][k] * xs[r][k];
            acc_add<V>(acc_c, acc_d, c0, sq, a.eps1, inv, wide);
          }
        }
      }
    } else {
      for (u64 c = threadIdx.x; c < cols; c += blockDim.x) {
        float x = xform(xf, to_f32(g[base + c]));
        float s = x * x;
        acc_c[c] += s + a.eps1;
        acc_d[c] += s * inv;
      }
    }
  }
  __syncthreads();
  if (a.flags & ADA_SMEM) {
    float* slab = a.col_part + (u64)blockIdx.x * 2 * cols;
    for (u64 j = threadIdx.x; j < 2 * cols; j += blockDim.x) slab[j] = acc_c[j];
  }
  const double psq_b = block_sum(psq, sd);
  const u32 bad_b = block_or(bad, su);
  if (threadIdx.x == 0) {
    a.partials[blockIdx.x] = row_total;
    a.partials[gridDim.x + blockIdx.x] = psq_b;
    if (bad_b) atomicOr(&a.t->bad, 1u);
  }
  if (last_block(&a.t->ticket, &last)) {
    const double rs = block_sum_array(a.partials, gridDim.x, sd);
    const double ps = block_sum_array(a.partials + gridDim.x, gridDim.x, sd);
    if (threadIdx.x == 0) {
      a.t->row_sum = rs;
      if (!cols2) a.t->psq = need_psq ? ps : a.t->psq_carried;
      // Finite gradients whose f32 statistics overflow (|g/S| >~ 1.8e19 squares to inf) or
      // parameters whose RMS does: refused like a non-finite gradient, before finalize commits
      // any state (as the CPU backend). A piece of columns checks its true rows in round 2 and
      // the global Σp² in adalomo_cols_finish; round 1 hands its flag to the other ranks.
      if ((!cols1 && a.rows > 0 && bad_bits((float)(rs / (double)a.rows))) ||
          (!cols2 && bad_bits((float)sqrt(a.t->psq))))
        atomicOr(&a.t->bad, 1u);
      if (cols1) {
        a.piece[a.rows] = a.t->psq;
        a.piece[a.rows + 1] = (load_fresh(&a.t->bad) & 1u) ? 1.0 : 0.0;
      }
    }
  }
}

// Scalars that overflowed f32 (lr · RMS(p), Σu²) refuse the tensor's apply like a non-finite
// gradient: it would write NaN or nothing at all.
LOMO_DEV void ada_check_scalars(LomoTensor* t) {
  if (bad_bits(t->decay) || bad_bits(t->neg_lr) || bad_bits(t->inv_clip)) atomicOr(&t->bad, 1u);
}

// Σp² of the written values (carry) in each block's partial; the last block publishes it.
LOMO_DEV void ada_carry_finish(const AdaArgs& a, double psq, double* sd, u32* last) {
  if (!(a.flags & ADA_CARRY)) return;
  const double b = block_sum(psq, sd);
  if (threadIdx.x == 0) a.partials[blockIdx.x] = b;
  if (last_block(&a.t->ticket, last)) {
    const double s = block_sum_array(a.partials, gridDim.x, sd);
    if (threadIdx.x == 0) {
      a.t->psq_carried = s;
      a.t->carried_valid = 1;
    }
  }
}

template <typename P, typename G>
LOMO_DEV float ada_write(P* p, G g, float scale, const Xform& xf, const LomoTensor* t, bool sr,
                         u32 w, u32* ovf) {
  const float x = xform(xf, to_f32(g));
  const float u = (scale * x) * t->inv_clip;
  const P old = *p;
  store_f32(p, fmaf(u, t->neg_lr, to_f32(*p) * t->decay), sr, w);
  if (bad_bits(*p)) {  // the new value overflows P: keep the old one (reported by the caller)
    *p = old;
    *ovf = 1u;
  }
  const float back = to_f32(*p);
  return back * back;
}

// Bit 2 of LomoTensor::bad: some new value overflowed its dtype and kept its old value. Bit 1
// (a non-finite gradient) is the only one the kernels of the same step skip on.
LOMO_DEV void ada_report_overflow(const AdaArgs& a, u32 ovf, u32* su) {
  if (block_or(ovf, su) && threadIdx.x == 0) atomicOr(&a.t->bad, 2u);
}

template <typename P, typename G>
LOMO_DEV void ada_apply_rows(const AdaArgs& a) {
  __shared__ double sd[LOMO_WARPS];
  __shared__ u32 su[LOMO_WARPS];
  __shared__ u32 last;
  const LomoStep* st = a.step;
  if (st->skip || (a.t->bad & 1u)) return;
  u32 ovf = 0;
  const Xform xf = {st->inv_scale, a.clip_value, st->coef};
  const RoundCtx rc = {a.rounding == 1, a.seed, (u32)(st->steps + 1), a.param_id};
  P* p = static_cast<P*>(a.p);
  const G* g = static_cast<const G*>(a.g);
  const u64 cols = a.cols;
  const int V = VecWidth<P, G>::value;
  const bool vec = vec_ok<P, G, V>(p, g) && cols % V == 0;
  double psq = 0.0;
  for (u64 row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const u64 base = row * cols;
    const float rs = a.ws_r[row];
    float acc = 0.0f;
    if (vec) {
      for (u64 c0 = (u64)threadIdx.x * V; c0 < cols; c0 += (u64)blockDim.x * V) {
        P pv[V];
        G gv[V];
        u32 w[V];
        load_vec<P, V>(p, base + c0, pv);
        load_vec<G, V>(g, base + c0, gv);
        random_words<V>(rc, a.elem_offset + row * a.row_stride + c0, w);
        for (int k = 0; k < V; ++k)
          acc += ada_write(&pv[k], gv[k], rs * a.ws_c[c0 + k], xf, a.t, rc.sr, w[k], &ovf);
        store_vec<P, V>(p, base + c0, pv);
      }
    } else {
      for (u64 c = threadIdx.x; c < cols; c += blockDim.x) {
        const u32 w = rc.sr ? random_word(rc, a.elem_offset + row * a.row_stride + c) : 0u;
        acc += ada_write(&p[base + c], g[base + c], rs * a.ws_c[c], xf, a.t, rc.sr, w, &ovf);
      }
    }
    psq += (double)acc;
  }
  ada_report_overflow(a, ovf, su);
  ada_carry_finish(a, psq, sd, &last);
}

template <typename P, typename G>
LOMO_DEV void ada_stats_vector(const AdaArgs& a) {
  __shared__ double sd[LOMO_WARPS];
  __shared__ u32 su[LOMO_WARPS];
  __shared__ u32 last;
  const LomoStep* st = a.step;
  if (st->skip) return;
  const float beta = st->beta, omb = st->omb;
  const Xform xf = {st->inv_scale, a.clip_value, st->coef};
  const bool need_psq = ada_need_psq(a);
  const P* p = static_cast<const P*>(a.p);
  const G* g = static_cast<const G*>(a.g);
  float usq = 0.0f, psq = 0.0f;
  u32 bad = 0;
  for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < a.rows;
       i += (u64)gridDim.x * blockDim.x) {
    bad |= bad_bits(g[i]) ? 1u : 0u;
    const float x = xform(xf, to_f32(g[i]));
    const float u = x * x + a.eps1;
    const float nv = fmaf(u, omb, a.state_a[i] * beta);
    bad |= bad_bits(nv) ? 1u : 0u;  // g² overflowed f32: refused before apply commits it
    a.ws_a[i] = nv;
    const float uu = (1.0f / sqrtf(nv)) * x;
    usq += uu * uu;
    if (need_psq) psq += to_f32(p[i]) * to_f32(p[i]);
  }
  const double usq_b = block_sum((double)usq, sd);
  const double psq_b = block_sum((double)psq, sd);
  const u32 bad_b = block_or(bad, su);
  if (threadIdx.x == 0) {
    a.partials[blockIdx.x] = usq_b;
    a.partials[gridDim.x + blockIdx.x] = psq_b;
    if (bad_b) atomicOr(&a.t->bad, 1u);
  }
  if (last_block(&a.t->ticket, &last)) {
    const double us = block_sum_array(a.partials, gridDim.x, sd);
    const double ps = block_sum_array(a.partials + gridDim.x, gridDim.x, sd);
    if (threadIdx.x == 0 && a.piece) {  // a piece: the record, reduced before vfinalize
      a.t->psq = need_psq ? ps : a.t->psq_carried;
      a.piece[0] = us;
      a.piece[1] = a.t->psq;
      a.piece[2] = (load_fresh(&a.t->bad) & 1u) ? 1.0 : 0.0;
    } else if (threadIdx.x == 0 && !load_fresh(&a.t->bad)) {
      a.t->psq = need_psq ? ps : a.t->psq_carried;
      const double lr = (double)st->lr * a.lr_mult;
      adalomo_scalars(lr, a.weight_decay, a.eps2, a.clip_threshold, a.t->psq, us, a.rows, a.t);
      ada_check_scalars(a.t);
    }
  }
}

template <typename P, typename G>
LOMO_DEV void ada_apply_vector(const AdaArgs& a) {
  __shared__ double sd[LOMO_WARPS];
  __shared__ u32 su[LOMO_WARPS];
  __shared__ u32 last;
  const LomoStep* st = a.step;
  if (st->skip || (a.t->bad & 1u)) return;
  u32 ovf = 0;
  const Xform xf = {st->inv_scale, a.clip_value, st->coef};
  const RoundCtx rc = {a.rounding == 1, a.seed, (u32)(st->steps + 1), a.param_id};
  P* p = static_cast<P*>(a.p);
  const G* g = static_cast<const G*>(a.g);
  float acc = 0.0f;
  for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < a.rows;
       i += (u64)gridDim.x * blockDim.x) {
    const float nv = a.ws_a[i];
    a.state_a[i] = nv;
    const u32 w = rc.sr ? random_word(rc, a.elem_offset + i) : 0u;
    acc += ada_write(&p[i], g[i], 1.0f / sqrtf(nv), xf, a.t, rc.sr, w, &ovf);
  }
  ada_report_overflow(a, ovf, su);
  ada_carry_finish(a, (double)acc, sd, &last);
}

// Two resident blocks per multiprocessor: the stats kernel is latency-bound (one row in flight
// per block), and its register-cached rows would otherwise take more than 128 registers.
#define ADA_STATS(name, P, G) LOMO_KERNEL_OCC(name, AdaArgs, 2, (ada_stats_rows<P, G>(a)))
#define ADA_APPLY(name, P, G) LOMO_KERNEL(name, AdaArgs, (ada_apply_rows<P, G>(a)))
#define ADA_VSTATS(name, P, G) LOMO_KERNEL(name, AdaArgs, (ada_stats_vector<P, G>(a)))
#define ADA_VAPPLY(name, P, G) LOMO_KERNEL(name, AdaArgs, (ada_apply_vector<P, G>(a)))
LOMO_FOR_DTYPE_PAIRS(ADA_STATS, adalomo_stats)
LOMO_FOR_DTYPE_PAIRS(ADA_APPLY, adalomo_apply)
LOMO_FOR_DTYPE_PAIRS(ADA_VSTATS, adalomo_vstats)
LOMO_FOR_DTYPE_PAIRS(ADA_VAPPLY, adalomo_vapply)
