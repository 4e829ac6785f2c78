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

use crate::backend::{scalars, Backend, PhaseBegin, RawBuf, Record, TensorUpdate};
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
    tensor_with(b, algorithm, t, g, pass, &mut Reducer::Comm(piece)).map(|_| ())
}

/// [`tensor`] in split phase (JAX under `shard_map`, `notes/distributed.md` §4.1 (c)): no
/// communicator; the caller reduces each round's partial record between calls. Round `k`'s
/// reduction substitutes `split.reduced[k]`; at the first round without one the pass stops
/// *before anything is written*, leaves this rank's partial record in `split.partial` and
/// returns `Ok(false)`. Returns `Ok(true)` when the pass ran to the end (every round it
/// needed was given).
pub fn tensor_split<B: Backend>(
    b: &B,
    algorithm: Algorithm,
    t: &mut B::Tensor<'_>,
    g: &RawBuf,
    pass: &TensorPass,
    split: &mut Split<'_>,
) -> Result<bool> {
    tensor_with(b, algorithm, t, g, pass, &mut Reducer::Split(split))
}

/// The reduced records of a split-phase pass ([`tensor_split`]).
#[derive(Debug, Default)]
pub struct Split<'a> {
    /// The records the caller reduced, in round order (round 1 first).
    pub reduced: Vec<&'a [f64]>,
    /// Rounds substituted so far.
    pub used: usize,
    /// This rank's partial record of the first round without a reduced record.
    pub partial: Vec<f64>,
}

impl Split<'_> {
    /// The reduction point in split phase: substitutes the next reduced record (`Ok(true)`),
    /// or keeps this rank's partial one and stops the pass (`Ok(false)`).
    fn exchange(&mut self, rec: &mut [f64]) -> Result<bool> {
        let Some(reduced) = self.reduced.get(self.used) else {
            self.partial = rec.to_vec();
            return Ok(false);
        };
        if reduced.len() != rec.len() {
            crate::error::bail!(
                InvalidArgument,
                "the reduced statistics of round {} have {} values, expected {} (reduce the \
                 record the statistics call of that round returned)",
                self.used + 1,
                reduced.len(),
                rec.len()
            );
        }
        rec.copy_from_slice(reduced);
        self.used += 1;
        Ok(true)
    }
}

/// How a piece's statistics are reduced: in place through a communicator (None: the tensor is
/// whole here), or between calls by the caller ([`Split`]).
enum Reducer<'r, 's> {
    Comm(Option<&'r Comm>),
    Split(&'r mut Split<'s>),
}

/// The one sequence of a tensor's passes; `Ok(false)`: stopped at an unreduced split round.
fn tensor_with<B: Backend>(
    b: &B,
    algorithm: Algorithm,
    t: &mut B::Tensor<'_>,
    g: &RawBuf,
    pass: &TensorPass,
    red: &mut Reducer<'_, '_>,
) -> Result<bool> {
    let u = match pass {
        TensorPass::Norm => return b.norm(t, g).map(|_| true),
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
                if !reduce_tensor_stats(b, t, red)? {
                    return Ok(false);
                }
            }
            b.lomo(t, g, u)?;
        }
        Algorithm::Adalomo => {
            b.ada_stats(t, g, u)?;
            if !reduce_tensor_stats(b, t, red)? {
                return Ok(false);
            }
            while b.ada_next_round(t, g, u)? {
                if !reduce_tensor_stats(b, t, red)? {
                    return Ok(false);
                }
            }
            b.ada_apply(t, g, u)?;
        }
    }
    Ok(true)
}

/// Gradient accumulation (`lomo_accum_enable`): one pass over a parameter's accumulation buffer
/// `acc` ([`crate::backend::AccumOp`]). In an ACCUMULATE phase it adds the submitted gradient;
/// in the step's own phases it completes the buffer, which [`tensor`] then reads as the
/// gradient. Nothing is exchanged across ranks here: on distributed optimizers the completed
/// buffer is what the core then reduces (`optimizer::grad`) and hands to [`tensor`].
pub fn accumulate<B: Backend>(
    b: &B,
    acc: &RawBuf,
    g: Option<&RawBuf>,
    op: &crate::backend::AccumOp,
) -> Result<()> {
    b.accumulate(acc, g, op)
}

/// Several whole tensors' passes of one phase at once (`lomo_grad_submit_batch`): the results of
/// [`tensor`] on each, with NORM and LOMO's passes (pre-check included) through the backend's
/// batched calls ([`Backend::norm_many`], [`Backend::lomo_many`]: one launch for many small
/// tensors on CUDA); AdaLomo tensor by tensor. `passes` are all NORM or all UPDATE; no tensor is
/// a piece of a distributed one (those go through [`tensor`]).
pub fn batch<B: Backend>(
    b: &B,
    algorithm: Algorithm,
    ts: &mut [B::Tensor<'_>],
    gs: &[RawBuf],
    passes: &[TensorPass],
) -> Result<()> {
    // The UPDATE options, on the stack (a batch allocates nothing): runs of `BATCH_CHUNK`.
    type Updates = smallvec::SmallVec<[TensorUpdate; crate::optimizer::BATCH_CHUNK]>;
    let n = crate::optimizer::BATCH_CHUNK;
    if ts.len() > n {
        let (t0, t1) = ts.split_at_mut(n);
        batch(b, algorithm, t0, &gs[..n], &passes[..n])?;
        return batch(b, algorithm, t1, &gs[n..], &passes[n..]);
    }
    let us: Updates = passes
        .iter()
        .filter_map(|p| match p {
            TensorPass::Update(u) => Some(*u),
            TensorPass::Norm => None,
        })
        .collect();
    if us.is_empty() {
        return b.norm_many(ts, gs, false);
    }
    match algorithm {
        Algorithm::Lomo => {
            // As in `tensor`: the pre-check unless a NORM phase checked (or, per element, a
            // whole tensor's one pass decides); tensors are independent, so all pre-checks may
            // come first.
            let check = |u: &TensorUpdate| !(u.prechecked || u.per_element);
            if us.iter().all(check) {
                b.norm_many(ts, gs, true)?;
            } else {
                for ((t, g), _) in ts.iter_mut().zip(gs).zip(&us).filter(|(_, u)| check(u)) {
                    b.check_finite(t, g)?;
                }
            }
            b.lomo_many(ts, gs, &us)
        }
        Algorithm::Adalomo => {
            for ((t, g), p) in ts.iter_mut().zip(gs).zip(passes) {
                tensor(b, algorithm, t, g, p, None)?;
            }
            Ok(())
        }
    }
}

/// The reduction point of a tensor's statistics, between `ada_stats` and `ada_apply` (and, for
/// LOMO without a NORM phase, between `check_finite` and `lomo`): where a tensor held in pieces
/// by several ranks all-reduces its partial record — AdaLomo's column sums, `D_j` sums, Σrow,
/// Σp² and non-finite count (one SUM of 2C+3 values; 3 for rank ≤ 1), LOMO's non-finite count —
/// over the piece group (`notes/distributed.md` §3), or, in split phase, takes the record the
/// caller reduced. A whole tensor needs nothing. `Ok(false)`: split phase, stop here.
fn reduce_tensor_stats<B: Backend>(
    b: &B,
    t: &mut B::Tensor<'_>,
    red: &mut Reducer<'_, '_>,
) -> Result<bool> {
    let Some(rec) = b.partials(t) else {
        return Ok(true);
    };
    match red {
        Reducer::Comm(None) => Ok(true),
        Reducer::Comm(Some(comm)) => {
            all_reduce(comm, rec, REDUCE_SUM, "a tensor's statistics").map(|_| true)
        }
        Reducer::Split(s) => match rec {
            Record::Host(rec) => s.exchange(rec),
            Record::Device { .. } => crate::error::bail!(
                Unsupported,
                "split-phase statistics (shard_map) of device tensors are not implemented"
            ),
        },
    }
}

/// All-reduces a backend's record in place over `comm`: a host record with stream NULL, a
/// device record on its stream (the callback orders the collective after the kernels that
/// wrote it; nothing waits for the device).
fn all_reduce(comm: &Comm, rec: Record<'_>, op: u32, what: &str) -> Result<()> {
    match rec {
        Record::Host(rec) => comm.all_reduce_f64(rec, op, what),
        // SAFETY: a device record of `count` f64 values that the backend allocated for this
        // purpose and keeps for the optimizer's life; its writes and later reads are ordered on
        // `stream`, which the callback receives.
        Record::Device {
            addr,
            count,
            stream,
        } => unsafe { comm.all_reduce_raw(addr as usize, count, op, stream, what) },
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
/// `[Σg², non-finite count]` over the norm group (`notes/distributed.md` §4.2) — the host's
/// totals (CPU), or the record the backend gathers from its device tensor records on the
/// stream (CUDA: `kernels/step.cu` step_gather), which the decision kernel then reads. Returns
/// whether a backend record was reduced.
fn reduce_phase_totals<B: Backend>(
    b: &B,
    update: bool,
    totals: &mut PhaseTotals,
    agree: Option<Agreement<'_>>,
) -> Result<bool> {
    let Some(a) = agree else {
        return Ok(false);
    };
    if let Some(values) = a.check {
        dist::check_agreement(values, |rec, op, what| {
            b.reduce_host(rec, &mut |r| all_reduce(a.comm, r, op, what))
        })?;
    }
    if let Some(rec) = b.phase_record(update)? {
        all_reduce(a.comm, rec, REDUCE_SUM, "the phase record")?;
        return Ok(true);
    }
    let mut rec = [totals.sum_sq, totals.nonfinite as f64];
    a.comm
        .all_reduce_f64(&mut rec, REDUCE_SUM, "the phase record")?;
    totals.sum_sq = rec[0];
    totals.nonfinite = rec[1] as u32;
    Ok(false)
}

/// Ends a phase: reduces the totals over `agree`'s group, then lets `b` decide on its step
/// record. Returns the (reduced) host totals for the host's own decisions ([`norm_decision`]);
/// `submitted` stays this rank's count. A CUDA backend's totals live on the device: they are
/// reduced there and the host's are left as they were.
pub fn end<B: Backend>(
    b: &B,
    update: bool,
    mut totals: PhaseTotals,
    agree: Option<Agreement<'_>>,
) -> Result<PhaseTotals> {
    let reduced = reduce_phase_totals(b, update, &mut totals, agree)?;
    b.phase_end(update, reduced)?;
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

#[cfg(test)]
#[path = "orchestrate_split_tests.rs"]
mod split_tests;
