//! CPU backend, AdaLomo on a piece of a tensor held by several ranks (`notes/distributed.md` §3):
//! pass A leaves a *partial record* that the core all-reduces (SUM) over the piece's group, and
//! the finalize step works from the reduced record, so every rank derives the same column state,
//! Σu² and RMS(p) as one rank holding the whole tensor.
//!
//! Record layouts (f64):
//! - factored, rows `I` of `[R, C]` held here (ROWS): `[a_0..a_{C−1} ‖ d_0..d_{C−1} ‖ Σrow ‖ Σp² ‖
//!   nf]` with `a_j = Σ_{i∈I} U_ij`, `d_j = Σ_{i∈I} x²_ij / row_i` (new rows, exact locally),
//!   `Σrow = Σ_{i∈I} row_i`: 2C + 3 values;
//! - vector (rank ≤ 1): `[Σu² ‖ Σp² ‖ nf]`: 3 values.
//!
//! `nf` counts the ranks whose piece had a non-finite gradient: the tensor is skipped on every
//! rank when it is not 0. With one rank and the whole tensor the sums are formed in the same
//! order as [`super::adalomo::stats`], so the results are bit-identical to it.

use super::ada_state::StateView;
use super::adalomo::{chunk_pass, gather, AdaWorkspace, StatsArgs};
use crate::backend::RawBuf;

/// Length of the partial record of a `[rows, cols]` (factored) or vector tensor.
pub fn record_len(cols: usize, factored: bool) -> usize {
    if factored {
        2 * cols + 3
    } else {
        3
    }
}

/// Pass A of a piece: the chunk loops of [`super::adalomo::stats`], then the partial record
/// into `rec` (`record_len` values). `carried` replaces the piece's Σp² when given.
pub fn stats(
    param: &RawBuf,
    grad: &RawBuf,
    state: StateView<'_>,
    ws: &mut AdaWorkspace,
    args: &StatsArgs,
    carried: Option<f64>,
    rec: &mut [f64],
) {
    rec.fill(0.0);
    let n = param.numel;
    let last = rec.len() - 1;
    if n == 0 {
        rec[last - 1] = carried.unwrap_or(0.0);
        return;
    }
    chunk_pass(param, grad, state, ws, args);
    let st = gather(ws, args.need_psq);
    if !st.finite {
        rec[last] = 1.0;
        return;
    }
    let psq = carried.unwrap_or(st.sum_p_sq);
    if ws.factored {
        let cols = ws.cols;
        for j in 0..cols {
            let (mut c, mut d) = (0f64, 0f64);
            for w in &ws.chunks {
                c += w.col64[j];
                d += w.d64[j];
            }
            rec[j] = c;
            rec[cols + j] = d;
        }
        rec[2 * cols] = ws
            .chunks
            .iter()
            .flat_map(|w| w.new_state.iter())
            .map(|&r| r as f64)
            .sum();
        rec[2 * cols + 1] = psq;
    } else {
        rec[0] = st.sum_u_sq;
        rec[1] = psq;
    }
}

/// Whether the reduced record says every piece was finite.
pub fn finite(rec: &[f64]) -> bool {
    rec[rec.len() - 1] == 0.0
}

/// Σp² over the whole tensor, from the reduced record.
pub fn sum_p_sq(rec: &[f64]) -> f64 {
    rec[rec.len() - 2]
}

/// From the reduced record of a finite tensor: the new column state and the scales into `ws`
/// (factored), and Σu² over the whole tensor. `global_rows` is R of the global `[R, C]` view.
pub fn finalize(
    ws: &mut AdaWorkspace,
    col_old: Option<&[f32]>,
    rec: &[f64],
    global_rows: usize,
    args: &StatsArgs,
) -> f64 {
    let Some(col_old) = col_old.filter(|_| ws.factored) else {
        return rec[0];
    };
    let cols = ws.cols;
    let rows = global_rows as f64;
    let row_mean = (rec[2 * cols] / rows) as f32;
    let mut sum_u_sq = 0f64;
    for (j, &old) in col_old.iter().enumerate().take(cols) {
        let col_mean = (rec[j] / rows) as f32;
        let cn = col_mean.mul_add(args.one_minus_beta, old * args.beta);
        ws.col_new[j] = cn;
        ws.c_scale[j] = 1.0 / cn.sqrt();
        sum_u_sq += rec[cols + j] / cn as f64;
    }
    for w in &mut ws.chunks {
        for (s, &r) in w.r_scale.iter_mut().zip(&w.new_state) {
            *s = 1.0 / (r / row_mean).sqrt();
        }
    }
    sum_u_sq * row_mean as f64
}
