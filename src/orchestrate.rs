//! Core layer: the one orchestration of a step, over the backend interface
//! ([`crate::backend::Backend`]): which passes run in which order, and where the statistics of a
//! tensor and of a phase are reduced across ranks ([`crate::dist`]). The optimizer (`optimizer::step`, CPU
//! and CUDA parameters) and the XLA handlers (`xla::cpu`, `xla::cuda`) all go through here.
//!
//! ```text
//! begin(phase)   →  Backend::phase_begin
//! tensor(NORM)   →  norm                                      tensor record: Σg², finite
//! tensor(UPDATE) →  LOMO:    [check_finite → reduce_tensor_stats] → lomo
//!                   AdaLomo: ada_stats → reduce_tensor_stats
//!                            [→ ada_next_round → reduce_tensor_stats]* → ada_apply
//! end(phase)     →  reduce_phase_totals → Backend::phase_end  (+ the host's decisions,
//!                                                             norm_decision, for the CPU)
//! ```
//!
//! The two `reduce_*` functions are the only places where a distributed step exchanges
//! statistics (`notes/distributed.md` §3, §4.2), through the caller's communicator; for a whole
//! tensor, and without a norm group, they exchange nothing.

use crate::backend::{scalars, Backend, PhaseBegin, RawBuf, TensorUpdate};
use crate::config::Algorithm;
use crate::dist::{self, Comm, REDUCE_SUM};
use crate::error::Result;

/// What one submitted gradient does.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TensorPass {
    /// Contributes Σ(g·inv_scale)² and its finite flag to the phase.
    Norm,
    /// Updates its parameter (and state).
    Update(TensorUpdate),
}

/// Starts a phase on `b`'s step record.
pub fn begin<B: Backend>(b: &B, begin: &PhaseBegin) -> Result<()> {
    b.phase_begin(begin)
}

/// One tensor's pass. Results land in the tensor record `t` (CPU: host fields; CUDA: the device
/// `LomoTensor`, in stream order). `piece` is the communicator of the ranks holding the other
/// pieces of the tensor (None: it is whole here). Errors are failures to enqueue (CUDA) or of a
/// callback (`CommError`), before anything was written.
pub fn tensor<B: Backend>(
    b: &B,
    algorithm: Algorithm,
    t: &mut B::Tensor<'_>,
    g: &RawBuf,
    pass: &TensorPass,
    piece: Option<&Comm>,
) -> Result<()> {
    let u = match pass {
        TensorPass::Norm => return b.norm(t, g),
        TensorPass::Update(u) => u,
    };
    match algorithm {
        Algorithm::Lomo => {
            // The per-element policy skips the pre-check (one pass): an element's update
            // depends on that element alone, so a piece needs no agreement before writing (its
            // non-finite count rides in the phase record). The per-tensor policy leaves a
            // tensor untouched when any element is not finite, so without a NORM phase the
            // ranks holding its pieces agree on one non-finite count before anyone writes.
            if !(u.prechecked || u.per_element) {
                b.check_finite(t, g)?;
                reduce_tensor_stats(b, t, piece)?;
            }
            b.lomo(t, g, u)
        }
        Algorithm::Adalomo => {
            b.ada_stats(t, g, u)?;
            reduce_tensor_stats(b, t, piece)?;
            while b.ada_next_round(t, g, u)? {
                reduce_tensor_stats(b, t, piece)?;
            }
            b.ada_apply(t, g, u)
        }
    }
}

/// The reduction point of a tensor's statistics, between `ada_stats` and `ada_apply` (and, for
/// LOMO without a NORM phase, between `check_finite` and `lomo`): where a tensor held in pieces
/// by several ranks all-reduces its partial record — AdaLomo's column sums, `D_j` sums, Σrow,
/// Σp² and non-finite count (one SUM of 2C+3 values; 3 for rank ≤ 1), LOMO's non-finite count —
/// over the piece group (`notes/distributed.md` §3). A whole tensor needs nothing.
fn reduce_tensor_stats<B: Backend>(
    b: &B,
    t: &mut B::Tensor<'_>,
    piece: Option<&Comm>,
) -> Result<()> {
    match (piece, b.partials(t)) {
        (Some(comm), Some(rec)) => comm.all_reduce_f64(rec, REDUCE_SUM, "a tensor's statistics"),
        _ => Ok(()),
    }
}

/// The group that agrees on a phase's scalars (`lomo_dist_set`), and with `LOMO_DIST_CHECK`
/// this rank's values of `dist::CHECK_FIELDS`.
#[derive(Clone, Copy, Debug)]
pub struct Agreement<'c> {
    pub comm: &'c Comm,
    pub check: Option<[f64; 5]>,
}

/// What the tensors of a phase contributed, summed in id (operand) order.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PhaseTotals {
    /// Gradients submitted in the phase.
    pub submitted: u32,
    /// Of which non-finite.
    pub nonfinite: u32,
    /// Σ(g·inv_scale)² over the finite ones (NORM).
    pub sum_sq: f64,
}

impl PhaseTotals {
    /// Adds one tensor record.
    pub fn add(&mut self, finite: bool, sum_sq: f64) {
        self.submitted += 1;
        if finite {
            self.sum_sq += sum_sq;
        } else {
            self.nonfinite += 1;
        }
    }
}

/// The reduction point of a phase: the agreement check (`LOMO_DIST_CHECK`), then one SUM record
/// `[Σg², non-finite count]` over the norm group (`notes/distributed.md` §4.2). On CUDA the
/// totals are gathered from the device tensor records by the phase-end kernel itself
/// (`kernels/step.cu`), which would split here into gather, all-reduce on the stream, and
/// decide (distributed CUDA steps are not supported yet).
fn reduce_phase_totals(totals: &mut PhaseTotals, agree: Option<Agreement<'_>>) -> Result<()> {
    let Some(a) = agree else {
        return Ok(());
    };
    if let Some(values) = a.check {
        dist::check_agreement(a.comm, values)?;
    }
    let mut rec = [totals.sum_sq, totals.nonfinite as f64];
    a.comm
        .all_reduce_f64(&mut rec, REDUCE_SUM, "the phase record")?;
    totals.sum_sq = rec[0];
    totals.nonfinite = rec[1] as u32;
    Ok(())
}

/// Ends a phase: reduces the totals the host holds over `agree`'s group, then lets `b` decide
/// on its step record. Returns the (reduced) totals for the host's own decisions
/// ([`norm_decision`]); `submitted` stays this rank's count.
pub fn end<B: Backend>(
    b: &B,
    update: bool,
    mut totals: PhaseTotals,
    agree: Option<Agreement<'_>>,
) -> Result<PhaseTotals> {
    reduce_phase_totals(&mut totals, agree)?;
    b.phase_end(update)?;
    Ok(totals)
}

/// What a NORM phase decides, on the host (the same rule as `kernels/step.cu` step_norm_end and
/// `kernels/xla.cu` xla_norm_finish on the device).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NormDecision {
    /// A gradient was not finite: the UPDATE phase is skipped.
    pub overflow: bool,
    /// `min(1, C / (‖g‖ + 1e-6))` in f32 when clipping is on and nothing overflowed, else 1.
    pub coef: f32,
}

/// The NORM decision from the (reduced) totals; `clip_grad_norm` 0 turns clipping off.
pub fn norm_decision(totals: &PhaseTotals, clip_grad_norm: f64) -> NormDecision {
    let overflow = totals.nonfinite > 0;
    let coef = if clip_grad_norm > 0.0 && !overflow {
        scalars::clip_coef(totals.sum_sq, clip_grad_norm)
    } else {
        1.0
    };
    NormDecision { overflow, coef }
}
