//! CPU backend, AdaLomo on a flat piece (`LOMO_LAYOUT_FLAT`: DeepSpeed ZeRO-3, FSDP1): elements
//! `[o, o + n)` of the flattened global `[R, C]` tensor, rows cut at both ends, exactly as one
//! rank holding the whole tensor (`notes/distributed.md` §3, FLAT row).
//!
//! Every rank keeps the whole row `[R]` and column `[C]` state (replicated: derived from the
//! same reduced bits everywhere). The rows the piece holds completely ("interior") get their new
//! state locally; the at most two cut rows need the other ranks' parts first, so a flat piece
//! takes two rounds:
//!
//! ```text
//! round 1 (reads g, p): per row Σ_{j∈piece} U_ij (R values, 0 outside the piece), per column
//!         Σ_{i∈piece} U_ij (C), Σp², nf; interior rows: new row_i and D_j += x²_ij / row_i
//!         record [rows (R) ‖ cols (C) ‖ Σp² ‖ nf]                       → all-reduce (R + C + 2)
//! round 2 (re-reads the ≤ 2 cut row fragments): every new row and column, mean(row),
//!         D_j += x²_ij / row_i for the fragments; record [Σ_j D_j / col_j] → all-reduce (1)
//! apply:  Σu² = mean(row) · the reduced sum; RMS(p) from the reduced Σp²
//! ```
//!
//! An interior row's reduced sum is this rank's sum plus zeros, so its new state is the same bits
//! on every rank. Sums are formed in f64 in another order than [`super::adalomo::stats`]: the
//! results equal one rank within f32 rounding. The statistics rounds run on the calling thread;
//! the apply pass in chunks on the CPU pool.

use super::ada_state::StateView;
use super::adalomo::{row_scale, AdaWorkspace, ApplyArgs, StatsArgs};
use super::convert::Elem;
use super::{chunk_count, chunk_range, for_each_chunk, with_dtype, with_dtypes, Partials};
use crate::alloc;
use crate::backend::RawBuf;
use crate::config::Rounding;
use crate::error::Result;
use std::sync::atomic::{AtomicBool, Ordering};

/// The flat piece's part of the workspace: the new rows of the whole tensor, their scales and
/// the `D_j` partials (the new columns are [`AdaWorkspace`]'s `col_new`, `c_scale`).
#[derive(Debug)]
pub struct FlatWs {
    pub(super) row_new: Vec<f32>,
    pub(super) r_scale: Vec<f32>,
    pub(super) d64: Vec<f64>,
    /// mean(row) of the new rows (round 2).
    pub(super) row_mean: f32,
}

impl FlatWs {
    pub fn new(rows: usize, cols: usize) -> Result<FlatWs> {
        const WHAT: &str = "AdaLomo flat-piece workspace";
        Ok(FlatWs {
            row_new: alloc::zeros(rows, WHAT)?,
            r_scale: alloc::zeros(rows, WHAT)?,
            d64: alloc::zeros(cols, WHAT)?,
            row_mean: 0.0,
        })
    }

    pub fn bytes(&self) -> usize {
        4 * (self.row_new.len() + self.r_scale.len()) + 8 * self.d64.len()
    }
}

impl AdaWorkspace {
    /// Scratch for a flat piece (`ada_flat`) of a factored `[rows, cols]` tensor: the new rows
    /// and columns of the whole tensor, no chunks (the piece is one pass); `OutOfMemory` if it
    /// cannot be allocated.
    pub fn flat(rows: usize, cols: usize) -> Result<AdaWorkspace> {
        const WHAT: &str = "AdaLomo workspace";
        Ok(AdaWorkspace {
            rows,
            cols,
            factored: true,
            chunks: Vec::new(),
            col_new: alloc::zeros(cols, WHAT)?,
            c_scale: alloc::zeros(cols, WHAT)?,
            flat: Some(FlatWs::new(rows, cols)?),
        })
    }
}

/// Length of a flat piece's record of a `[rows, cols]` tensor: round 1 (R + C + 2), round 2 (1).
pub fn record_len(rows: usize, cols: usize) -> usize {
    rows + cols + 3
}

/// Whether round 1's reduced record says every piece was finite.
pub fn finite(rec: &[f64]) -> bool {
    rec[rec.len() - 2] == 0.0
}

/// Σp² of the whole tensor (round 1, reduced).
pub fn sum_p_sq(rec: &[f64]) -> f64 {
    rec[rec.len() - 3]
}

/// The segments of the piece `[offset, offset + n)` in a tensor of rows of `cols`: (local start,
/// row, first column, length), in order.
fn segments(
    offset: usize,
    n: usize,
    cols: usize,
) -> impl Iterator<Item = (usize, usize, usize, usize)> {
    let mut k = 0;
    std::iter::from_fn(move || {
        if k >= n || cols == 0 {
            return None;
        }
        let e = offset + k;
        let (i, j0) = (e / cols, e % cols);
        let len = (cols - j0).min(n - k);
        let seg = (k, i, j0, len);
        k += len;
        Some(seg)
    })
}

fn flat(ws: &mut AdaWorkspace) -> &mut FlatWs {
    ws.flat
        .as_mut()
        .expect("flat pieces have a flat workspace (lomo_param_set_shard)")
}

/// Round 1 of a piece at global element `offset`: the partial record into `rec`; the new state
/// and `D_j` of the interior rows into the workspace. `carried` replaces the piece's Σp².
#[allow(clippy::too_many_arguments)]
pub fn stats(
    param: &RawBuf,
    grad: &RawBuf,
    state: StateView<'_>,
    ws: &mut AdaWorkspace,
    args: &StatsArgs,
    carried: Option<f64>,
    rec: &mut [f64],
    offset: usize,
) {
    rec.fill(0.0);
    let (rows, cols) = (ws.rows, ws.cols);
    let StateView::Factored { row, .. } = state else {
        unreachable!("flat pieces of factored tensors have factored state");
    };
    let fw = flat(ws);
    fw.d64.fill(0.0);
    let n = param.numel;
    let mut psq = 0f64;
    if n > 0 {
        let ok = with_dtypes!(param.dtype, grad.dtype, |P, G| {
            // SAFETY: buffers validated by the core (n elements each); only read here.
            let (p, g) = unsafe { (param.slice::<P>(0, n), grad.slice::<G>(0, n)) };
            round1::<P, G>(p, g, row, fw, args, rec, offset, cols, &mut psq)
        });
        if !ok {
            rec.fill(0.0);
            rec[rows + cols + 1] = 1.0;
            return;
        }
    }
    rec[rows + cols] = carried.unwrap_or(if args.need_psq { psq } else { 0.0 });
}

#[allow(clippy::too_many_arguments)]
fn round1<P: Elem, G: Elem>(
    p: &[P],
    g: &[G],
    row_old: &[f32],
    fw: &mut FlatWs,
    args: &StatsArgs,
    rec: &mut [f64],
    offset: usize,
    cols: usize,
    psq: &mut f64,
) -> bool {
    let rows = row_old.len();
    let (xf, eps1) = (args.xf, args.eps1);
    for (k, i, j0, len) in segments(offset, g.len(), cols) {
        let (gs, ps) = (&g[k..k + len], &p[k..k + len]);
        let mut total = 0f64;
        for (j, gv) in (j0..).zip(gs) {
            if !gv.is_finite_bits() {
                return false;
            }
            let x = xf.apply(gv.to_f32());
            let u = x * x + eps1;
            total += u as f64;
            rec[rows + j] += u as f64;
        }
        if args.need_psq {
            *psq += ps.iter().map(|v| (v.to_f32() as f64).powi(2)).sum::<f64>();
        }
        rec[i] = total;
        if len == cols {
            // Interior row: its reduced sum will be `total` on every rank.
            let rn = new_row(total, cols, row_old[i], args);
            fw.row_new[i] = rn;
            add_d(&mut fw.d64[j0..j0 + len], gs, rn, args);
        }
    }
    true
}

/// The new row state from its reduced Σ_j U_ij.
#[inline]
fn new_row(total: f64, cols: usize, old: f32, args: &StatsArgs) -> f32 {
    let mean = (total / cols as f64) as f32;
    mean.mul_add(args.one_minus_beta, old * args.beta)
}

/// `d[j] += x²_j / rn` for the fragment `g` of a row whose new state is `rn`.
fn add_d<G: Elem>(d: &mut [f64], g: &[G], rn: f32, args: &StatsArgs) {
    let inv = 1.0 / rn;
    for (dj, gv) in d.iter_mut().zip(g) {
        let x = args.xf.apply(gv.to_f32());
        *dj += ((x * x) * inv) as f64;
    }
}

/// Round 2, after round 1 was reduced and found finite: every new row and column (the same on
/// every rank), the scales, `D_j` of the cut row fragments (a second read of them), and
/// `rec[last] = Σ_j D_j / col_j`. Returns mean(row).
pub fn second(
    grad: &RawBuf,
    state: StateView<'_>,
    ws: &mut AdaWorkspace,
    args: &StatsArgs,
    rec: &mut [f64],
    offset: usize,
) -> f32 {
    let StateView::Factored { row, col } = state else {
        unreachable!("flat pieces of factored tensors have factored state");
    };
    let (rows, cols) = (ws.rows, ws.cols);
    let (beta, omb) = (args.beta, args.one_minus_beta);
    let fw = ws.flat.as_mut().expect("flat workspace");
    let mut row_sum = 0f64;
    for i in 0..rows {
        let rn = new_row(rec[i], cols, row[i], args);
        fw.row_new[i] = rn;
        row_sum += rn as f64;
    }
    let row_mean = (row_sum / rows as f64) as f32;
    for (j, &old) in col.iter().enumerate().take(cols) {
        let col_mean = (rec[rows + j] / rows as f64) as f32;
        let cn = col_mean.mul_add(omb, old * beta);
        ws.col_new[j] = cn;
        ws.c_scale[j] = 1.0 / cn.sqrt();
    }
    let n = grad.numel;
    if n > 0 {
        with_dtype!(grad.dtype, |G| {
            // SAFETY: the gradient was validated by the core; only read here.
            let g = unsafe { grad.slice::<G>(0, n) };
            for (k, i, j0, len) in segments(offset, n, cols) {
                if len < cols {
                    let rn = fw.row_new[i];
                    add_d(&mut fw.d64[j0..j0 + len], &g[k..k + len], rn, args);
                }
            }
        });
    }
    let mut part = 0f64;
    for (d, &cn) in fw.d64.iter().zip(&ws.col_new) {
        part += d / cn as f64;
    }
    for (s, &r) in fw.r_scale.iter_mut().zip(&fw.row_new) {
        *s = row_scale(r, row_mean);
    }
    fw.row_mean = row_mean;
    let last = rec.len() - 1;
    rec[last] = part;
    row_mean
}

/// mean(row) of the last round 2.
pub fn row_mean(ws: &AdaWorkspace) -> f32 {
    ws.flat.as_ref().map_or(1.0, |f| f.row_mean)
}

/// Pass C on the piece at global element `offset`: as [`super::adalomo::apply`], element `k`
/// drawing its stochastic rounding by `args.round` (whose offset is the piece's). Returns Σp² of
/// the written values when `args.carry` and whether every new value was finite. Runs in chunks
/// of the piece on the CPU pool (the chunking depends on the piece's length only).
pub fn apply(
    param: &RawBuf,
    grad: &RawBuf,
    ws: &AdaWorkspace,
    args: &ApplyArgs,
    offset: usize,
) -> (f64, bool) {
    let fw = ws.flat.as_ref().expect("flat workspace");
    let n = param.numel;
    if n == 0 {
        return (0.0, true);
    }
    let chunks = chunk_count(n, 1);
    let psq = Partials::new();
    let overflow = AtomicBool::new(false);
    for_each_chunk(chunks, |c| {
        let (a, b) = chunk_range(n, chunks, c);
        let (sq, clean) = with_dtypes!(param.dtype, grad.dtype, |P, G| {
            // SAFETY: buffers validated by the core; chunks are disjoint, so this is the only
            // reference to p[a..b]; the gradient is only read.
            let (p, g) = unsafe { (param.slice_mut::<P>(a, b), grad.slice::<G>(a, b)) };
            apply_piece::<P, G>(p, g, &fw.r_scale, &ws.c_scale, args, offset, a)
        });
        psq.set(c, sq);
        if !clean {
            overflow.store(true, Ordering::Relaxed);
        }
    });
    (psq.sum(chunks), !overflow.load(Ordering::Relaxed))
}

/// Elements `[first, first + p.len())` of the piece.
fn apply_piece<P: Elem, G: Elem>(
    p: &mut [P],
    g: &[G],
    r_scale: &[f32],
    c_scale: &[f32],
    args: &ApplyArgs,
    offset: usize,
    first: usize,
) -> (f64, bool) {
    let cols = c_scale.len();
    let (xf, inv_clip, neg_lr, decay) = (args.xf, args.inv_clip, args.neg_lr, args.decay);
    let stochastic = args.round.mode == Rounding::Stochastic;
    let mut psq = 0f64;
    let mut overflow = 0u32;
    for (k, i, j0, len) in segments(offset + first, g.len(), cols) {
        let rs = r_scale[i];
        let (ps, gs) = (&mut p[k..k + len], &g[k..k + len]);
        let cs = &c_scale[j0..j0 + len];
        for (e, ((pv, gv), &cs)) in ps.iter_mut().zip(gs).zip(cs).enumerate() {
            let u = ((rs * cs) * xf.apply(gv.to_f32())) * inv_clip;
            let v = u.mul_add(neg_lr, pv.to_f32() * decay);
            let nv: P = if stochastic {
                args.round.store(v, (first + k + e) as u64)
            } else {
                P::from_f32_rne(v)
            };
            let ok = nv.is_finite_bits();
            overflow |= (!ok) as u32;
            *pv = if ok { nv } else { *pv };
        }
        if args.carry {
            psq += super::adalomo::sum_sq(ps);
        }
    }
    (psq, overflow == 0)
}
