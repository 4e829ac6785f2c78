// lomo kernels: AdaLomo's finalize (the second half of the AdaLomo module: NVRTC compiles it
// appended to adalomo.cu as one program, src/backend/cuda/registry.rs; the emulation includes it
// after adalomo.cu; it has no includes of its own). After the statistics of kernels/adalomo.cu:
// the column sums of the stats blocks (ada_col_sums), the column state, r_i, c_j, Σu² and the
// step scalars (adalomo_finalize); for a piece of rows held by several ranks, its partial record
// before the ranks' all-reduce (adalomo_piece_gather) and, rank ≤ 1, the scalars from the reduced
// record (adalomo_vfinalize).
// Column j's sums over the stats blocks' partials (lane l of warp w: the blocks b ≡ w mod warps,
// in block order, in f64, coalesced across the lanes), combined in warp order by warp 0 — a
// fixed order for a given grid. Every thread of the block must call it (barriers).
LOMO_DEV void ada_col_sums(const AdaArgs& a, u64 j, double sc[LOMO_WARPS][32],
                           double sdd[LOMO_WARPS][32], double* ct, double* dt) {
  const u64 cols = a.cols;
  const u32 nb = a.stats_blocks;
  const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  double c = 0.0, d = 0.0;
  if (j < cols) {
    // Batches of B blocks: every load of a batch is issued before the first is added.
    const u32 B = 8;
    u32 b = warp;
    for (; b + (B - 1) * warps < nb; b += B * warps) {
      float cv[B], dv[B];
#pragma unroll
      for (u32 q = 0; q < B; ++q) {
        const u64 o = (u64)(b + q * warps) * 2 * cols + j;
        cv[q] = a.col_part[o];
        dv[q] = a.col_part[o + cols];
      }
#pragma unroll
      for (u32 q = 0; q < B; ++q) {
        c += (double)cv[q];
        d += (double)dv[q];
      }
    }
    for (; b < nb; b += warps) {
      c += (double)a.col_part[(u64)b * 2 * cols + j];
      d += (double)a.col_part[(u64)b * 2 * cols + cols + j];
    }
  }
  sc[warp][lane] = c;
  sdd[warp][lane] = d;
  __syncthreads();
  double c_t = 0.0, d_t = 0.0;
  if (warp == 0) {
    for (u32 w = 0; w < warps; ++w) {
      c_t += sc[w][lane];
      d_t += sdd[w][lane];
    }
  }
  __syncthreads();
  *ct = c_t;
  *dt = d_t;
}

// A piece of rows, after the stats: its record (column sums as ada_col_sums forms them, Σrow,
// Σp², the non-finite flag) for the ranks' all-reduce. Grid over tiles of 32 columns.
LOMO_DEV void ada_piece_gather(const AdaArgs& a) {
  __shared__ double sc[LOMO_WARPS][32];
  __shared__ double sdd[LOMO_WARPS][32];
  if (a.step->skip) return;
  const u64 cols = a.cols;
  const u64 tiles = (cols + 31) / 32;
  for (u64 tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const u64 j = tile * 32 + (threadIdx.x & 31);
    double ct, dt;
    ada_col_sums(a, j, sc, sdd, &ct, &dt);
    if (threadIdx.x < 32 && j < cols) {
      a.piece[j] = ct;
      a.piece[cols + j] = dt;
    }
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    const bool bad = (a.t->bad & 1u) != 0;
    a.piece[2 * cols] = a.rows > 0 ? a.t->row_sum : 0.0;
    a.piece[2 * cols + 1] = a.t->psq;
    a.piece[2 * cols + 2] = bad ? 1.0 : 0.0;
  }
}

// Column state, r_i, c_j, Σu² and the step scalars (one instantiation: no gradient access).
// Columns go in tiles of 32 (grid-stride over tiles), summed by ada_col_sums — or, for a piece,
// read from the reduced record (global rows, Σrow and Σp² of every rank; its grid depends on
// the columns alone, so every rank forms the same bits). Rows go grid-stride over all threads.
LOMO_DEV void ada_finalize(const AdaArgs& a) {
  __shared__ double sc[LOMO_WARPS][32];
  __shared__ double sdd[LOMO_WARPS][32];
  __shared__ double sd[LOMO_WARPS];
  __shared__ u32 last;
  const LomoStep* st = a.step;
  if (st->skip) return;
  const u64 rows = a.rows, cols = a.cols;
  const bool cols2 = (a.flags & ADA_COLS2) != 0;  // a piece of columns: rows complete here
  const double* pr = cols2 ? nullptr : a.piece;
  if (pr) {
    if (pr[2 * cols + 2] != 0.0) {  // some rank's piece was not finite: skipped everywhere
      if (blockIdx.x == 0 && threadIdx.x == 0) atomicOr(&a.t->bad, 1u);
      return;
    }
  } else if (a.t->bad) {
    return;
  }
  const float beta = st->beta, omb = st->omb;
  const u64 g_rows = pr ? a.global_rows : rows;
  const float row_mean = (float)((pr ? pr[2 * cols] : a.t->row_sum) / (double)g_rows);
  double usq = 0.0;
  const u64 tiles = (cols + 31) / 32;
  for (u64 tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const u64 j = tile * 32 + (threadIdx.x & 31);
    double ct = 0.0, dt = 0.0;
    if (!pr) ada_col_sums(a, j, sc, sdd, &ct, &dt);
    else if (threadIdx.x < 32 && j < cols) {
      ct = pr[j];
      dt = pr[cols + j];
    }
    if (threadIdx.x < 32 && j < cols) {
      const float col_mean = (float)(ct / (double)g_rows);
      const float cn = fmaf(col_mean, omb, a.state_b[j] * beta);
      // A piece of columns commits in adalomo_cols_finish, after its last reduction: the new
      // column waits in its (already read) column partial.
      if (cols2) a.col_part[j] = cn;
      else a.state_b[j] = cn;
      a.ws_c[j] = 1.0f / sqrtf(cn);
      usq += dt / (double)cn;
    }
  }
  for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < rows;
       i += (u64)gridDim.x * blockDim.x) {
    const float rn = a.ws_a[i];
    if (!cols2) a.state_a[i] = rn;
    // rsqrt(row / mean(row)); a row far below the mean (a zero-gradient row next to rows of
    // |g| >~ 1e7) underflows the quotient, and 1/0 would make its zero update inf * 0 = NaN:
    // sqrt(mean) * rsqrt(row) represents it (as the CPU backend's row_scale).
    float rs = 1.0f / sqrtf(rn / row_mean);
    if (bad_bits(rs)) rs = fminf(sqrtf(row_mean) * (1.0f / sqrtf(rn)), 3.40282347e38f);
    a.ws_r[i] = rs;
  }
  const double usq_b = block_sum(usq, sd);
  if (threadIdx.x == 0) a.partials[blockIdx.x] = usq_b;
  if (last_block(&a.t->ticket, &last)) {
    const double part = block_sum_array(a.partials, gridDim.x, sd);
    if (cols2) {  // Σ_{j∈J} D_j / col_j, all-reduced before adalomo_cols_finish
      if (threadIdx.x == 0) a.piece[rows + 2] = part;
      return;
    }
    const double total = part * (double)row_mean;
    if (threadIdx.x == 0) {
      const double lr = (double)st->lr * a.lr_mult;
      const double psq = pr ? pr[2 * cols + 1] : a.t->psq;
      adalomo_scalars(lr, a.weight_decay, a.eps2, a.clip_threshold, psq, total, g_rows * cols,
                      a.t);
      ada_check_scalars(a.t);
    }
  }
}

// A rank ≤ 1 piece after its record was reduced: the step scalars from the global Σu², Σp².
LOMO_DEV void ada_vfinalize(const AdaArgs& a) {
  if (a.step->skip || threadIdx.x != 0) return;
  const double* pr = a.piece;
  if (pr[2] != 0.0) {
    atomicOr(&a.t->bad, 1u);
    return;
  }
  const double lr = (double)a.step->lr * a.lr_mult;
  adalomo_scalars(lr, a.weight_decay, a.eps2, a.clip_threshold, pr[1], pr[0], a.global_rows, a.t);
  ada_check_scalars(a.t);
}

// A piece of columns after its second round was reduced (record [b (R) ‖ Σp² ‖ nf ‖ Σ_J D_j /
// col_j]): commits the row state (ws_a) and the local column state (left in col_part by
// finalize) unless the tensor is refused, and block 0 forms the step scalars from the global
// Σu² = mean(row) · Σ_j D_j / col_j and Σp². The finalize grid (rows and columns over all
// threads).
LOMO_DEV void ada_cols_finish(const AdaArgs& a) {
  if (a.step->skip || (a.t->bad & 1u)) return;
  const double* pr = a.piece;
  const u64 rows = a.rows, cols = a.cols;
  const double psq = pr[rows];
  if (bad_bits((float)sqrt(psq))) {  // the global RMS(p) overflows: refused, nothing committed
    if (blockIdx.x == 0 && threadIdx.x == 0) atomicOr(&a.t->bad, 1u);
    return;
  }
  const u64 stride = (u64)gridDim.x * blockDim.x;
  for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < rows; i += stride)
    a.state_a[i] = a.ws_a[i];
  for (u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x; j < cols; j += stride)
    a.state_b[j] = a.col_part[j];
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  const float row_mean = rows > 0 ? (float)(a.t->row_sum / (double)rows) : 0.0f;
  const double lr = (double)a.step->lr * a.lr_mult;
  adalomo_scalars(lr, a.weight_decay, a.eps2, a.clip_threshold, psq,
                  pr[rows + 2] * (double)row_mean, rows * a.row_stride, a.t);
  ada_check_scalars(a.t);
}

LOMO_KERNEL(adalomo_finalize, AdaArgs, ada_finalize(a))
LOMO_KERNEL(adalomo_piece_gather, AdaArgs, ada_piece_gather(a))
LOMO_KERNEL(adalomo_vfinalize, AdaArgs, ada_vfinalize(a))
LOMO_KERNEL(adalomo_cols_finish, AdaArgs, ada_cols_finish(a))
