//! CPU backend, AdaLomo (`reference/semantics.md` §3.3) in two passes over the gradient.
//!
//! ```text
//! x = clamp(g / S, −v, v) · c,   U = x² + ε1,   β = 1 − t^d
//! factored (rank ≥ 2, viewed as [R, C]):
//!   row_i ← β·row_i + (1−β)·mean_j U_ij      col_j ← β·col_j + (1−β)·mean_i U_ij
//!   u_ij  = rsqrt(row_i / mean(row)) · rsqrt(col_j) · x_ij
//! vector (rank ≤ 1):  v ← β·v + (1−β)·U,  u = rsqrt(v) · x
//! û = u / max(1, RMS(u)/τ);   p ← round( fma(û, −η_eff, p·(1 − η_eff·λ)) ),  η_eff = η·max(ε2, RMS(p))
//! ```
//!
//! Pass A (`stats`) reads g once (and p, for RMS(p), unless it is carried over) and produces the
//! new state into the workspace plus Σu² through the identity of `notes/performance.md` §3:
//! Σu² = mean(row) · Σ_j D_j / col_j with D_j = Σ_i x²_ij / row_i, accumulated row by row while
//! the row is in cache. Nothing is committed until the whole gradient is known to be finite.
//! Pass C (`apply`) reads g and p and writes p.

use super::convert::{all_finite, Elem, RoundCtx, TILE};
use super::prefetch::prefetch;
use super::simd::multiversion;
pub(super) use super::sum_sq::sum_sq;
use super::sum_sq::sum_sq_rows;
use super::{chunk_count, chunk_range, for_each_chunk_mut, lane_sum, with_dtypes};
use crate::alloc;
use crate::backend::{GradXform, RawBuf};
use crate::config::Rounding;
use crate::error::Result;

pub use super::ada_state::{AdaState, StateView, StateViewMut};

/// Rows accumulated in f32 before folding into the f64 column sums.
pub(super) const FOLD_ROWS: usize = 64;
/// Elements of a row summed in f32 lanes (32 terms per lane) before folding into the row's f64
/// total, so long rows keep f32-level accuracy (the kernels sum ~cols/256 terms per thread).
pub(super) const ROW_FOLD: usize = 256;

#[derive(Debug, Default)]
pub(super) struct ChunkWs {
    /// Factored: rows `[a, b)`; vector: elements `[a, b)`.
    pub(super) a: usize,
    pub(super) b: usize,
    /// New row state (factored) or new vector state (vector) for this chunk's range.
    pub(super) new_state: Vec<f32>,
    /// rsqrt(row_i / mean(row)) for this chunk's rows (factored).
    pub(super) r_scale: Vec<f32>,
    pub(super) col64: Vec<f64>,
    pub(super) d64: Vec<f64>,
    pub(super) colblk: Vec<f32>,
    pub(super) dblk: Vec<f32>,
    pub(super) xsq: Vec<f32>,
    pub(super) usq: f64,
    pub(super) psq: f64,
    pub(super) finite: bool,
    /// Pass C: every new value of this chunk was finite.
    pub(super) clean: bool,
    /// Column pieces (`ada_cols`): this chunk's rows' partial sums Σ_{j∈J} U_ij (empty
    /// otherwise; sized by `AdaWorkspace::prepare_cols`).
    pub(super) row64: Vec<f64>,
}

/// Scratch memory of one parameter, sized at registration.
#[derive(Debug)]
pub struct AdaWorkspace {
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) factored: bool,
    pub(super) chunks: Vec<ChunkWs>,
    pub(super) col_new: Vec<f32>,
    pub(super) c_scale: Vec<f32>,
    /// A flat piece of a factored tensor (`ada_flat`): the new rows of the whole tensor.
    pub(super) flat: Option<super::ada_flat::FlatWs>,
}

impl AdaWorkspace {
    /// Scratch for the `[rows, cols]` view; `OutOfMemory` if it cannot be allocated.
    pub fn new(rows: usize, cols: usize, factored: bool) -> Result<AdaWorkspace> {
        const WHAT: &str = "AdaLomo workspace";
        let units = if factored { rows } else { rows * cols };
        let unit_elems = if factored { cols } else { 1 };
        let n = chunk_count(units, unit_elems);
        let mut chunks = alloc::with_capacity(n, WHAT)?;
        for c in 0..n {
            let (a, b) = chunk_range(units, n, c);
            let per_col = if factored { cols } else { 0 };
            chunks.push(ChunkWs {
                a,
                b,
                new_state: alloc::zeros(b - a, WHAT)?,
                r_scale: alloc::zeros(if factored { b - a } else { 0 }, WHAT)?,
                col64: alloc::zeros(per_col, WHAT)?,
                d64: alloc::zeros(per_col, WHAT)?,
                colblk: alloc::zeros(per_col, WHAT)?,
                dblk: alloc::zeros(per_col, WHAT)?,
                xsq: alloc::zeros(per_col, WHAT)?,
                ..ChunkWs::default()
            });
        }
        let c = if factored { cols } else { 0 };
        Ok(AdaWorkspace {
            rows,
            cols,
            factored,
            chunks,
            col_new: alloc::zeros(c, WHAT)?,
            c_scale: alloc::zeros(c, WHAT)?,
            flat: None,
        })
    }

    /// Whether the new state computed by the last [`stats`] is finite everywhere (rows and
    /// columns, or the vector). The f32 statistics can overflow on finite gradients
    /// (|g/S| ≳ 1.8e19 squares to infinity), which would silently zero or NaN the update.
    pub fn new_state_finite(&self) -> bool {
        self.chunks
            .iter()
            .all(|w| w.new_state.iter().all(|v| v.is_finite()))
            && self.col_new.iter().all(|v| v.is_finite())
            && self
                .flat
                .as_ref()
                .map_or(true, |f| f.row_new.iter().all(|v| v.is_finite()))
    }

    /// Makes room for column pieces (`ada_cols`): per-row partial sums, at piece setup. Fails
    /// with `OutOfMemory` leaving the workspace as it was.
    pub fn prepare_cols(&mut self) -> Result<()> {
        let mut rows = alloc::with_capacity(self.chunks.len(), "AdaLomo column-piece workspace")?;
        for w in &self.chunks {
            rows.push(alloc::zeros(w.b - w.a, "AdaLomo column-piece workspace")?);
        }
        for (w, r) in self.chunks.iter_mut().zip(rows) {
            w.row64 = r;
        }
        Ok(())
    }

    pub fn bytes(&self) -> usize {
        let per_chunk: usize = self
            .chunks
            .iter()
            .map(|w| {
                4 * (w.new_state.len()
                    + w.r_scale.len()
                    + w.colblk.len()
                    + w.dblk.len()
                    + w.xsq.len())
                    + 8 * (w.col64.len() + w.d64.len() + w.row64.len())
            })
            .sum();
        per_chunk
            + 4 * (self.col_new.len() + self.c_scale.len())
            + self.flat.as_ref().map_or(0, |f| f.bytes())
    }
}

/// Scalars of pass A.
#[derive(Clone, Copy, Debug)]
pub struct StatsArgs {
    pub xf: GradXform,
    pub beta: f32,
    pub one_minus_beta: f32,
    pub eps1: f32,
    /// Whether to compute Σp² (false when it is carried over from the previous apply).
    pub need_psq: bool,
}

/// Result of pass A.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stats {
    pub finite: bool,
    pub sum_u_sq: f64,
    pub sum_p_sq: f64,
}

/// Scalars of pass C.
#[derive(Clone, Copy, Debug)]
pub struct ApplyArgs {
    pub xf: GradXform,
    pub inv_clip: f32,
    pub decay: f32,
    pub neg_lr: f32,
    pub round: RoundCtx,
    /// Whether to return Σp² of the written values (for carrying RMS(p) to the next step).
    pub carry: bool,
}

/// Pass A: new state into `ws`, Σu², Σp² and the finite flag. `state` is not modified.
pub fn stats(
    param: &RawBuf,
    grad: &RawBuf,
    state: StateView<'_>,
    ws: &mut AdaWorkspace,
    args: &StatsArgs,
) -> Stats {
    let rows = ws.rows;
    chunk_pass(param, grad, state, ws, args);
    let stats = gather(ws, args.need_psq);
    match state {
        StateView::Factored { col, .. } if stats.finite => {
            // On the calling thread, outside the chunks: IEEE arithmetic too.
            let sum_u_sq = super::fpenv::ieee(|| finalize_factored(ws, col, rows, args));
            Stats { sum_u_sq, ..stats }
        }
        _ => stats,
    }
}

/// The per-chunk loops of pass A: each chunk's new state, column and `D_j` partials, Σu²
/// (vector), Σp² and finite flag, in its workspace. The buffers must hold at least one element.
pub(super) fn chunk_pass(
    param: &RawBuf,
    grad: &RawBuf,
    state: StateView<'_>,
    ws: &mut AdaWorkspace,
    args: &StatsArgs,
) {
    let cols = ws.cols;
    match state {
        StateView::Factored { row, .. } => {
            for_each_chunk_mut(&mut ws.chunks, |_, w| {
                let (a, b) = (w.a * cols, w.b * cols);
                with_dtypes!(param.dtype, grad.dtype, |P, G| {
                    // SAFETY: buffers validated by the core; only read here.
                    let (p, g) = unsafe { (param.slice::<P>(a, b), grad.slice::<G>(a, b)) };
                    stats_rows::<P, G>(w, g, p, &row[w.a..w.b], cols, args)
                });
            });
        }
        StateView::Vector { v } => {
            for_each_chunk_mut(&mut ws.chunks, |_, w| {
                with_dtypes!(param.dtype, grad.dtype, |P, G| {
                    // SAFETY: buffers validated by the core; only read here.
                    let (p, g) = unsafe { (param.slice::<P>(w.a, w.b), grad.slice::<G>(w.a, w.b)) };
                    stats_vector::<P, G>(w, g, p, &v[w.a..w.b], args)
                });
            });
        }
    }
}

pub(super) fn gather(ws: &AdaWorkspace, need_psq: bool) -> Stats {
    let finite = ws.chunks.iter().all(|w| w.finite);
    let sum_u_sq = ws.chunks.iter().map(|w| w.usq).sum();
    let sum_p_sq = if need_psq {
        ws.chunks.iter().map(|w| w.psq).sum()
    } else {
        0.0
    };
    Stats {
        finite,
        sum_u_sq,
        sum_p_sq,
    }
}

/// Column state, the row/column scales and Σu² from the per-chunk partials.
fn finalize_factored(ws: &mut AdaWorkspace, col_old: &[f32], rows: usize, args: &StatsArgs) -> f64 {
    let row_sum: f64 = ws
        .chunks
        .iter()
        .flat_map(|w| w.new_state.iter())
        .map(|&r| r as f64)
        .sum();
    let row_mean = (row_sum / rows as f64) as f32;
    let mut sum_u_sq = 0f64;
    for (j, &old) in col_old.iter().enumerate().take(ws.cols) {
        let (mut c, mut d) = (0f64, 0f64);
        for w in &ws.chunks {
            c += w.col64[j];
            d += w.d64[j];
        }
        let col_mean = (c / rows as f64) as f32;
        let cn = col_mean.mul_add(args.one_minus_beta, old * args.beta);
        ws.col_new[j] = cn;
        ws.c_scale[j] = 1.0 / cn.sqrt();
        sum_u_sq += d / cn as f64;
    }
    for w in &mut ws.chunks {
        for (s, &r) in w.r_scale.iter_mut().zip(&w.new_state) {
            *s = row_scale(r, row_mean);
        }
    }
    sum_u_sq * row_mean as f64
}

/// rsqrt(row / mean(row)), lomo-optim's formula, for every row it can represent. A row far
/// below the mean (a zero-gradient row, whose state is ε1-sized, next to rows with |g| ≳ 1e7)
/// makes the quotient underflow to 0 and the formula infinite, and ∞ · 0 would turn that row's
/// zero update into NaN: such rows take the same value as sqrt(mean) · rsqrt(row), which
/// represents it (saturated at the f32 maximum in the limit).
#[inline]
pub(super) fn row_scale(r: f32, row_mean: f32) -> f32 {
    let s = 1.0 / (r / row_mean).sqrt();
    if s.is_finite() {
        s
    } else {
        (row_mean.sqrt() * (1.0 / r.sqrt())).min(f32::MAX)
    }
}

/// Writes the new state computed by [`stats`] into `state`.
pub fn commit(state: StateViewMut<'_>, ws: &AdaWorkspace) {
    match state {
        StateViewMut::Factored { row, col } => {
            for w in &ws.chunks {
                row[w.a..w.b].copy_from_slice(&w.new_state);
            }
            if let Some(f) = &ws.flat {
                row.copy_from_slice(&f.row_new);
            }
            col.copy_from_slice(&ws.col_new);
        }
        StateViewMut::Vector { v } => {
            for w in &ws.chunks {
                v[w.a..w.b].copy_from_slice(&w.new_state);
            }
        }
    }
}

/// Pass C: applies the normalized update; returns Σp² of the written values when `args.carry`
/// (else 0) and whether every new value was finite. An element whose new value overflows the
/// parameter's dtype keeps its old value (finite inputs can only overflow, never give NaN).
pub fn apply(
    param: &RawBuf,
    grad: &RawBuf,
    ws: &mut AdaWorkspace,
    args: &ApplyArgs,
) -> (f64, bool) {
    let cols = ws.cols;
    let factored = ws.factored;
    let c_scale = &ws.c_scale;
    for_each_chunk_mut(&mut ws.chunks, |_, w| {
        let (a, b) = if factored {
            (w.a * cols, w.b * cols)
        } else {
            (w.a, w.b)
        };
        (w.psq, w.clean) = with_dtypes!(param.dtype, grad.dtype, |P, G| {
            // SAFETY: buffers validated by the core; chunks are disjoint, so this is the only
            // reference to p[a..b]; the gradient is only read.
            let (p, g) = unsafe { (param.slice_mut::<P>(a, b), grad.slice::<G>(a, b)) };
            if factored {
                apply_rows::<P, G>(p, g, &w.r_scale, c_scale, args, a as u64)
            } else {
                apply_vector::<P, G>(p, g, &w.new_state, args, a as u64)
            }
        });
    });
    let clean = ws.chunks.iter().all(|w| w.clean);
    let psq = if args.carry {
        ws.chunks.iter().map(|w| w.psq).sum()
    } else {
        0.0
    };
    (psq, clean)
}

multiversion! {
    fn stats_rows<P: Elem, G: Elem>(w: &mut ChunkWs, g: &[G], p: &[P], row_old: &[f32], cols: usize, args: &StatsArgs) {
        w.col64.fill(0.0);
        w.d64.fill(0.0);
        w.colblk.fill(0.0);
        w.dblk.fill(0.0);
        w.finite = true;
        let (xf, eps1) = (args.xf, args.eps1);
        let mut psq = 0f64;
        let mut pending = 0;
        for (i, &old) in row_old.iter().enumerate() {
            let grow = &g[i * cols..(i + 1) * cols];
            let next = ((i + 1) * cols).min(g.len())..((i + 2) * cols).min(g.len());
            let ahead = (&g[next.clone()], if args.need_psq { &p[next] } else { &p[..0] });
            let Some(row_total) = row_tiles(w, grow, ahead, xf, eps1) else {
                w.finite = false;
                return;
            };
            if args.need_psq {
                // The row's tiles side by side, added to `psq` one by one in order.
                sum_sq_rows(&p[i * cols..(i + 1) * cols], cols, &mut psq);
            }
            let mean = (row_total / cols as f64) as f32;
            let rn = mean.mul_add(args.one_minus_beta, old * args.beta);
            w.new_state[i] = rn;
            let inv = 1.0 / rn;
            for (d, &s) in w.dblk.iter_mut().zip(w.xsq.iter()) {
                *d = s.mul_add(inv, *d);
            }
            pending += 1;
            if pending == FOLD_ROWS || i + 1 == row_old.len() {
                fold(&mut w.col64, &mut w.colblk);
                fold(&mut w.d64, &mut w.dblk);
                pending = 0;
            }
        }
        w.psq = psq;
        w.usq = 0.0;
    }
}

#[inline(always)]
pub(super) fn fold(acc: &mut [f64], blk: &mut [f32]) {
    for (a, b) in acc.iter_mut().zip(blk.iter_mut()) {
        *a += *b as f64;
        *b = 0.0;
    }
}

/// One row of a factored statistics pass, tile by tile: `w.xsq` ← x² of the transformed
/// gradient, `w.colblk` += x² + eps1. Returns the row's Σ(x² + eps1) (f32 lanes of `ROW_FOLD`
/// terms folded into f64), or None at the first tile with a non-finite gradient element. Shared
/// by the whole-tensor pass ([`stats`]) and the column-piece pass (`ada_cols`), so both sum in
/// the same order. Σp² is the callers' (`sum_sq_rows`, tile by tile in row order).
#[inline(always)]
pub(super) fn row_tiles<P: Elem, G: Elem>(
    w: &mut ChunkWs,
    grow: &[G],
    ahead: (&[G], &[P]),
    xf: GradXform,
    eps1: f32,
) -> Option<f64> {
    let cols = grow.len();
    let mut row_total = 0f64;
    // Simple loops over one tile each, so every one of them vectorizes; the tile stays in L1
    // between them.
    let mut t = 0;
    while t < cols {
        let len = TILE.min(cols - t);
        let gt = &grow[t..t + len];
        // The same columns of what comes next (a hint: changes nothing computed).
        prefetch(&ahead.0[t.min(ahead.0.len())..(t + len).min(ahead.0.len())]);
        prefetch(&ahead.1[t.min(ahead.1.len())..(t + len).min(ahead.1.len())]);
        if !all_finite(gt) {
            return None;
        }
        let xsq = &mut w.xsq[t..t + len];
        for (s, gv) in xsq.iter_mut().zip(gt) {
            let x = xf.apply(gv.to_f32());
            *s = x * x;
        }
        for (c, &s) in w.colblk[t..t + len].iter_mut().zip(xsq.iter()) {
            *c += s + eps1;
        }
        for part in xsq.chunks(ROW_FOLD) {
            let mut lanes = [0f32; 8];
            lane_add_plus(&mut lanes, part, eps1);
            row_total += lane_sum(&lanes) as f64;
        }
        t += len;
    }
    Some(row_total)
}

/// Adds `v[k] + c` to lane `k % 8`.
#[inline(always)]
pub(super) fn lane_add_plus(lanes: &mut [f32; 8], v: &[f32], c: f32) {
    let mut it = v.chunks_exact(8);
    for c8 in &mut it {
        for k in 0..8 {
            lanes[k] += c8[k] + c;
        }
    }
    for (k, &x) in it.remainder().iter().enumerate() {
        lanes[k] += x + c;
    }
}

multiversion! {
    fn stats_vector<P: Elem, G: Elem>(w: &mut ChunkWs, g: &[G], p: &[P], v_old: &[f32], args: &StatsArgs) {
        let (xf, eps1, beta, omb) = (args.xf, args.eps1, args.beta, args.one_minus_beta);
        let mut usq = 0f64;
        w.finite = true;
        for (t, gt) in g.chunks(TILE).enumerate() {
            if !all_finite(gt) {
                w.finite = false;
                return;
            }
            let base = t * TILE;
            let (vo, vn) = (&v_old[base..base + gt.len()], &mut w.new_state[base..base + gt.len()]);
            let mut lanes = [0f32; 8];
            // Element k of the tile accumulates into lane k % 8: in groups of 8 (which
            // vectorizes: sqrt and division 8 or 16 at a time), then the remainder.
            let step = |gv: &G, old: f32, nv: &mut f32, lane: &mut f32| {
                let x = xf.apply(gv.to_f32());
                let u = x * x + eps1;
                let n = u.mul_add(omb, old * beta);
                *nv = n;
                let uu = (1.0 / n.sqrt()) * x;
                *lane = uu.mul_add(uu, *lane);
            };
            let (mut gi, mut oi, mut ni) = (gt.chunks_exact(8), vo.chunks_exact(8), vn.chunks_exact_mut(8));
            for ((g8, o8), n8) in (&mut gi).zip(&mut oi).zip(&mut ni) {
                for k in 0..8 {
                    step(&g8[k], o8[k], &mut n8[k], &mut lanes[k]);
                }
            }
            let rest = gi.remainder().iter().zip(oi.remainder()).zip(ni.into_remainder());
            for (k, ((gv, &old), nv)) in rest.enumerate() {
                step(gv, old, nv, &mut lanes[k]);
            }
            usq += lane_sum(&lanes) as f64;
        }
        w.usq = usq;
        w.psq = if args.need_psq { sum_sq(p) } else { 0.0 };
    }
}

multiversion! {
    fn apply_rows<P: Elem, G: Elem>(p: &mut [P], g: &[G], r_scale: &[f32], c_scale: &[f32], args: &ApplyArgs, elem0: u64) -> (f64, bool) {
        let cols = c_scale.len();
        let (xf, inv_clip, neg_lr, decay) = (args.xf, args.inv_clip, args.neg_lr, args.decay);
        let mut psq = 0f64;
        let mut overflow = 0u32;
        for (i, &rs) in r_scale.iter().enumerate() {
            let (prow, grow) = (&mut p[i * cols..(i + 1) * cols], &g[i * cols..(i + 1) * cols]);
            match args.round.mode {
                Rounding::Nearest => {
                    for ((pv, gv), &cs) in prow.iter_mut().zip(grow).zip(c_scale) {
                        let u = ((rs * cs) * xf.apply(gv.to_f32())) * inv_clip;
                        let nv = P::from_f32_rne(u.mul_add(neg_lr, pv.to_f32() * decay));
                        let ok = nv.is_finite_bits();
                        overflow |= (!ok) as u32;
                        *pv = if ok { nv } else { *pv };
                    }
                }
                Rounding::Stochastic => {
                    let e0 = elem0 + (i * cols) as u64;
                    for (k, ((pv, gv), &cs)) in prow.iter_mut().zip(grow).zip(c_scale).enumerate() {
                        let u = ((rs * cs) * xf.apply(gv.to_f32())) * inv_clip;
                        let nv: P = args.round.store(u.mul_add(neg_lr, pv.to_f32() * decay), e0 + k as u64);
                        let ok = nv.is_finite_bits();
                        overflow |= (!ok) as u32;
                        *pv = if ok { nv } else { *pv };
                    }
                }
            }
            if args.carry {
                psq += sum_sq(prow);
            }
        }
        (psq, overflow == 0)
    }
}

multiversion! {
    fn apply_vector<P: Elem, G: Elem>(p: &mut [P], g: &[G], v: &[f32], args: &ApplyArgs, elem0: u64) -> (f64, bool) {
        let (xf, inv_clip, neg_lr, decay) = (args.xf, args.inv_clip, args.neg_lr, args.decay);
        let mut overflow = 0u32;
        // The rounding mode is matched once, outside the loop (as in `apply_rows`), so the
        // nearest-rounding loop vectorizes; the arithmetic is the same in both.
        match args.round.mode {
            Rounding::Nearest => {
                for ((pv, gv), &vv) in p.iter_mut().zip(g).zip(v) {
                    let u = ((1.0 / vv.sqrt()) * xf.apply(gv.to_f32())) * inv_clip;
                    let nv = P::from_f32_rne(u.mul_add(neg_lr, pv.to_f32() * decay));
                    let ok = nv.is_finite_bits();
                    overflow |= (!ok) as u32;
                    *pv = if ok { nv } else { *pv };
                }
            }
            Rounding::Stochastic => {
                for (k, ((pv, gv), &vv)) in p.iter_mut().zip(g).zip(v).enumerate() {
                    let u = ((1.0 / vv.sqrt()) * xf.apply(gv.to_f32())) * inv_clip;
                    let nv: P = args.round.store(u.mul_add(neg_lr, pv.to_f32() * decay), elem0 + k as u64);
                    let ok = nv.is_finite_bits();
                    overflow |= (!ok) as u32;
                    *pv = if ok { nv } else { *pv };
                }
            }
        }
        let psq = if args.carry { sum_sq(p) } else { 0.0 };
        (psq, overflow == 0)
    }
}
