//! CPU backend, AdaLomo on a piece of columns (`LOMO_LAYOUT_COLS`: row-parallel weights, columns
//! `J` of the `[R, C]` view, all rows here), exactly as one rank holding the whole tensor.
//!
//! The column state of `J` is complete here; the row state needs every column, and
//! `Σu² = mean(row) · Σ_j D_j / col_j` with `D_j = Σ_i x²_ij / row_i` needs the new rows, so a
//! column piece takes two rounds (`notes/distributed.md` §3):
//!
//! ```text
//! round 1 (pass A, reads g and p): b_i = Σ_{j∈J} U_ij per row, column sums, Σp², nf
//!         record [b_0..b_{R−1} ‖ Σp² ‖ nf]                      → all-reduce (R + 2 values)
//! round 2 (pass B, reads g again): new rows (the same on every rank), new columns of J,
//!         D_j with the new rows; record [Σ_{j∈J} D_j / col_j]   → all-reduce (1 value)
//! apply:  Σu² = mean(row) · the reduced sum; RMS(p) from the reduced Σp²
//! ```
//!
//! Rows are summed (f32 lanes folded to f64) and `D_j` accumulated (f32 blocks of `FOLD_ROWS`
//! rows folded to f64) as in [`super::adalomo::stats`], so one rank holding every column gets its
//! bits.

use super::ada_state::StateView;
use super::adalomo::FOLD_ROWS;
use super::adalomo::{fold, row_tiles, AdaWorkspace, ChunkWs, StatsArgs};
use super::convert::Elem;
use super::simd::multiversion;
use super::sum_sq::sum_sq_rows;
use super::{for_each_chunk_mut, with_dtype, with_dtypes};
use crate::backend::RawBuf;

/// Length of a column piece's record: round 1 (R + 2) then round 2 (1).
pub fn record_len(rows: usize) -> usize {
    rows + 3
}

/// The part of the record reduced in `round` (1 or 2).
pub fn round_mut(rec: &mut [f64], round: u8) -> &mut [f64] {
    let r1 = rec.len() - 1;
    if round == 1 {
        &mut rec[..r1]
    } else {
        &mut rec[r1..]
    }
}

/// Whether round 1's reduced record says every piece was finite.
pub fn finite(rec: &[f64]) -> bool {
    rec[rec.len() - 2] == 0.0
}

/// Σp² of the whole tensor (round 1, reduced).
pub fn sum_p_sq(rec: &[f64]) -> f64 {
    rec[rec.len() - 3]
}

/// Round 1: per-row sums of U over the local columns, column sums, Σp² (`carried` replaces it)
/// and the non-finite flag, into `ws` and `rec`.
pub fn stats(
    param: &RawBuf,
    grad: &RawBuf,
    ws: &mut AdaWorkspace,
    args: &StatsArgs,
    carried: Option<f64>,
    rec: &mut [f64],
) {
    rec.fill(0.0);
    let rows = ws.rows;
    let cols = ws.cols;
    if param.numel > 0 {
        for_each_chunk_mut(&mut ws.chunks, |_, w| {
            let (a, b) = (w.a * cols, w.b * cols);
            with_dtypes!(param.dtype, grad.dtype, |P, G| {
                // SAFETY: buffers validated by the core; only read here.
                let (p, g) = unsafe { (param.slice::<P>(a, b), grad.slice::<G>(a, b)) };
                row_sums::<P, G>(w, g, p, cols, args)
            });
        });
    }
    if ws.chunks.iter().any(|w| !w.finite) && param.numel > 0 {
        rec[rows + 1] = 1.0;
        return;
    }
    if param.numel > 0 {
        for w in &ws.chunks {
            rec[w.a..w.b].copy_from_slice(&w.row64);
        }
    }
    let psq = if args.need_psq && param.numel > 0 {
        ws.chunks.iter().map(|w| w.psq).sum()
    } else {
        0.0
    };
    rec[rows] = carried.unwrap_or(psq);
}

/// Round 2, after round 1 was reduced (and found finite): the new rows from every column
/// (`global_cols` = C), the new local columns and their scales, `D_j` with the new rows (a
/// second read of g), and `rec2 = Σ_{j∈J} D_j / col_j`. Returns mean(row) of the new rows.
pub fn second(
    grad: &RawBuf,
    state: StateView<'_>,
    ws: &mut AdaWorkspace,
    args: &StatsArgs,
    rec: &mut [f64],
    global_cols: usize,
) -> f32 {
    let StateView::Factored { row, col } = state else {
        unreachable!("column pieces are factored (checked at lomo_param_set_shard)");
    };
    let (rows, cols) = (ws.rows, ws.cols);
    let (beta, omb) = (args.beta, args.one_minus_beta);
    for w in &mut ws.chunks {
        for (k, nv) in w.new_state.iter_mut().enumerate() {
            let mean = (rec[w.a + k] / global_cols as f64) as f32;
            *nv = mean.mul_add(omb, row[w.a + k] * beta);
        }
    }
    if grad.numel > 0 {
        for_each_chunk_mut(&mut ws.chunks, |_, w| {
            let (a, b) = (w.a * cols, w.b * cols);
            with_dtype!(grad.dtype, |G| {
                // SAFETY: the gradient was validated by the core; only read here.
                let g = unsafe { grad.slice::<G>(a, b) };
                d_sums::<G>(w, g, cols, args)
            });
        });
    }
    let row_sum: f64 = ws
        .chunks
        .iter()
        .flat_map(|w| w.new_state.iter())
        .map(|&r| r as f64)
        .sum();
    let row_mean = (row_sum / rows as f64) as f32;
    let mut part = 0f64;
    for (j, &old) in col.iter().enumerate().take(cols) {
        let (mut c, mut d) = (0f64, 0f64);
        for w in &ws.chunks {
            c += w.col64[j];
            d += w.d64[j];
        }
        let col_mean = (c / rows as f64) as f32;
        let cn = col_mean.mul_add(omb, old * beta);
        ws.col_new[j] = cn;
        ws.c_scale[j] = 1.0 / cn.sqrt();
        part += d / cn as f64;
    }
    for w in &mut ws.chunks {
        for (s, &r) in w.r_scale.iter_mut().zip(&w.new_state) {
            *s = 1.0 / (r / row_mean).sqrt();
        }
    }
    let last = rec.len() - 1;
    rec[last] = part;
    row_mean
}

multiversion! {
    fn row_sums<P: Elem, G: Elem>(w: &mut ChunkWs, g: &[G], p: &[P], cols: usize, args: &StatsArgs) {
        w.col64.fill(0.0);
        w.colblk.fill(0.0);
        w.finite = true;
        let (xf, eps1) = (args.xf, args.eps1);
        let rows = w.b - w.a;
        let mut psq = 0f64;
        let mut pending = 0;
        for i in 0..rows {
            let (grow, prow) = (&g[i * cols..(i + 1) * cols], &p[i * cols..(i + 1) * cols]);
            let next = ((i + 1) * cols).min(g.len())..((i + 2) * cols).min(g.len());
            let ahead = (&g[next.clone()], if args.need_psq { &p[next] } else { &p[..0] });
            let Some(row_total) = row_tiles(w, grow, ahead, xf, eps1) else {
                w.finite = false;
                return;
            };
            if args.need_psq {
                sum_sq_rows(prow, cols, &mut psq);
            }
            w.row64[i] = row_total;
            pending += 1;
            if pending == FOLD_ROWS || i + 1 == rows {
                fold(&mut w.col64, &mut w.colblk);
                pending = 0;
            }
        }
        w.psq = psq;
    }
}

multiversion! {
    fn d_sums<G: Elem>(w: &mut ChunkWs, g: &[G], cols: usize, args: &StatsArgs) {
        w.d64.fill(0.0);
        w.dblk.fill(0.0);
        let xf = args.xf;
        let rows = w.b - w.a;
        let mut pending = 0;
        for i in 0..rows {
            let grow = &g[i * cols..(i + 1) * cols];
            for (s, gv) in w.xsq.iter_mut().zip(grow) {
                let x = xf.apply(gv.to_f32());
                *s = x * x;
            }
            let inv = 1.0 / w.new_state[i];
            for (d, &s) in w.dblk.iter_mut().zip(w.xsq.iter()) {
                *d = s.mul_add(inv, *d);
            }
            pending += 1;
            if pending == FOLD_ROWS || i + 1 == rows {
                fold(&mut w.d64, &mut w.dblk);
                pending = 0;
            }
        }
    }
}
