//! Backend layer: the interface every backend implements, and that the core's one orchestration
//! of a step (`crate::orchestrate`) drives for the optimizer and the XLA handlers alike.
//!
//! A [`Backend`] value is a *step context*: one backend, the per-step scalars its passes read,
//! and (CUDA) the stream its work is enqueued on. It is built for each call (cheap: a few words)
//! and never outlives it. [`Backend::Tensor`] is one tensor as that backend addresses it — the
//! caller's parameter, its optimizer state and scratch memory, and its *tensor record*, where the
//! passes leave their per-tensor results. The core owns the order of the calls; the backend owns
//! the arithmetic.
//!
//! # The calls of one step, in order
//!
//! ```text
//! phase_begin(NORM)                          the step record: has_norm, coef = 1, skip = 0
//!   norm(t, g)          per tensor           record: Σ(g·inv_scale)² (f64), finite flag
//! phase_end(NORM)                            record: clip coefficient, skip (= overflow)
//! phase_begin(UPDATE, lr)                    record: lr, AdaLomo β = 1 − t^decay_rate
//!   LOMO:    check_finite(t, g)  (only without a clean NORM phase), lomo(t, g, u)
//!   AdaLomo: ada_stats(t, g, u)  → [reduction point]
//!            (→ ada_next_round(t, g, u) → [reduction point])*  → ada_apply(t, g, u)
//! phase_end(UPDATE)                          record: loss scaler, step counter (CUDA)
//! ```
//!
//! # Who computes which scalar
//!
//! Formulas are in [`super::scalars`] (host) and mirrored by `kernels/step.cu`,
//! `kernels/xla.cu` and the finalize kernel of `kernels/adalomo.cu` (device), bit for bit:
//! - host-known per tensor, passed in [`TensorUpdate`]: group lr multiplier, weight decay,
//!   parameter id (stochastic-rounding stream), carry-Σp² opt-in, whether a NORM phase checked
//!   the gradient;
//! - per step — inv_scale = 1/loss scale, the clip coefficient, the skip flag, lr, β — live in the
//!   context: host values on the CPU ([`super::cpu::step::HostStep`], formed by the core or read
//!   from an XLA call's operands); the device step record on CUDA, formed on the stream by the
//!   phase kernels, so no host synchronization is ever needed;
//! - per tensor after the statistics — RMS(p) (`‖p‖/√n`), the update clip
//!   `max(1, RMS(u)/τ)`, the effective lr and decay — in `ada_apply` (CPU: on the host from the
//!   tensor record; CUDA: in the finalize kernel).
//!
//! # The reduction points
//!
//! A distributed step inserts its all-reduces in exactly two places, both in
//! `crate::orchestrate`: between `ada_stats` (and each `ada_next_round`) and `ada_apply`, or
//! `check_finite` and `lomo` (AdaLomo's per-tensor partial
//! statistics: row/column sums, Σu² through `D_j`, Σp², the finite flag — a [`Record`] from
//! [`Backend::partials`]: on the CPU in host memory, on CUDA the piece's device record filled on
//! the stream), and between the tensors of a phase and `phase_end` (the phase totals: Σg² of the
//! finite tensors and the non-finite count — the host's on the CPU, a device record gathered by
//! [`Backend::phase_record`] on CUDA, which `phase_end(.., reduced = true)` then reads). For
//! whole tensors on one rank nothing is exchanged.
//!
//! # Ownership
//!
//! Parameters and gradients are the caller's ([`RawBuf`]: host memory on the CPU, device memory
//! on CUDA); a backend only reads gradients and writes parameters in place. State, workspaces
//! and records belong to whoever built the [`Backend::Tensor`]: the optimizer (allocated at
//! registration, so a step allocates nothing) or an XLA call (XLA's buffers and pooled
//! workspaces). Methods return errors only for failures to enqueue work (CUDA); numerical
//! outcomes (non-finite gradients) are results in the tensor record, never errors.

use super::RawBuf;
use crate::error::Result;

/// What starts a phase.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PhaseBegin {
    /// UPDATE (true) or NORM (false).
    pub update: bool,
    /// UPDATE: a NORM phase ran earlier in this step (its clip coefficient and skip flag hold);
    /// otherwise they are reset (a cancelled step's NORM results must not leak).
    pub after_norm: bool,
    /// UPDATE: the learning rate of this step (before the group multiplier).
    pub lr: f64,
}

/// The host-known options of one tensor's UPDATE pass.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TensorUpdate {
    /// The stochastic-rounding stream of the tensor (the C API's parameter id).
    pub param_id: u32,
    /// The group's lr multiplier: the tensor's lr is `lr · lr_multiplier` (in f64 on the host,
    /// in the kernels from the f32 lr of the step record).
    pub lr_multiplier: f64,
    /// The group's decoupled weight decay.
    pub weight_decay: f64,
    /// A NORM phase of this step checked the gradient for non-finite values (its flags decide);
    /// otherwise the core calls [`Backend::check_finite`] first (LOMO) or the statistics pass
    /// finds out (AdaLomo).
    pub prechecked: bool,
    /// LOMO, `NonFinitePolicy::PerElement`: without a pre-check, the update pass writes every
    /// element whose gradient is finite and reports the tensor non-finite if one was not (CPU;
    /// pieces too: nothing to agree on per tensor, the count rides in the phase record).
    pub per_element: bool,
    /// AdaLomo: carry Σp² of the written values to the next step (`PARAM_FLAG_CARRY_RMS`).
    pub carry: bool,
}

/// Gradient accumulation (`lomo_accum_enable`): one pass over a parameter's accumulation buffer,
/// `acc ← round_acc(((keep ? acc : 0) + g) · factor)` in f32 arithmetic, the gradient `g`
/// optional (absent: `acc ← round_acc((keep ? acc : 0) · factor)`), stored in the buffer's
/// dtype by round-to-nearest-even. Non-finite values propagate into the buffer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AccumOp {
    /// Add to the buffer's contents (false: the buffer holds nothing of this step yet).
    pub keep: bool,
    /// 1 while accumulating (and for a summed reduction); `1/k` when a mean over `k`
    /// micro-batches completes the buffer.
    pub factor: f32,
}

/// One backend in one call: the passes of a step over its tensors.
pub trait Backend {
    /// One tensor as this backend addresses it: parameter, state, workspace and tensor record.
    type Tensor<'t>;

    /// Starts a phase on the step record (CPU: the host values of the context already are the
    /// record, nothing to do; CUDA: one single-block kernel).
    fn phase_begin(&self, begin: &PhaseBegin) -> Result<()>;

    /// NORM: Σ(g·inv_scale)² over the finite gradient (f64) and the finite flag, into the
    /// tensor record.
    fn norm(&self, t: &mut Self::Tensor<'_>, g: &RawBuf) -> Result<()>;

    /// The finite flag of the gradient alone, into the tensor record (LOMO without a clean NORM
    /// phase: nothing may be written from a non-finite gradient).
    fn check_finite(&self, t: &mut Self::Tensor<'_>, g: &RawBuf) -> Result<()>;

    /// LOMO: `p ← round(fma(x, −lr, p·(1 − lr·wd)))` with `x` the transformed gradient; nothing
    /// when the step is skipped or the record says the gradient is not finite.
    fn lomo(&self, t: &mut Self::Tensor<'_>, g: &RawBuf, u: &TensorUpdate) -> Result<()>;

    /// [`Backend::norm`] (or, `check_only`, [`Backend::check_finite`]) of several whole
    /// tensors: the same results, in fewer launches where the backend can (CUDA: multi-tensor
    /// kernels for small tensors). By default one by one.
    fn norm_many(
        &self,
        ts: &mut [Self::Tensor<'_>],
        gs: &[RawBuf],
        check_only: bool,
    ) -> Result<()> {
        for (t, g) in ts.iter_mut().zip(gs) {
            if check_only {
                self.check_finite(t, g)?;
            } else {
                self.norm(t, g)?;
            }
        }
        Ok(())
    }

    /// [`Backend::lomo`] of several whole tensors, as [`Backend::norm_many`].
    fn lomo_many(
        &self,
        ts: &mut [Self::Tensor<'_>],
        gs: &[RawBuf],
        us: &[TensorUpdate],
    ) -> Result<()> {
        for ((t, g), u) in ts.iter_mut().zip(gs).zip(us) {
            self.lomo(t, g, u)?;
        }
        Ok(())
    }

    /// AdaLomo pass A: the new state (not yet committed), Σu² (via `D_j`), Σp² (unless
    /// carried) and the finite flag, into the tensor's workspace and record.
    fn ada_stats(&self, t: &mut Self::Tensor<'_>, g: &RawBuf, u: &TensorUpdate) -> Result<()>;

    /// AdaLomo pieces whose statistics need another round after the first reduction (a piece of
    /// columns: the new rows, then `D_j` with them, a second read of g): computes this rank's
    /// part into the record and returns true, and the core reduces it again; false when the
    /// statistics are complete (whole tensors, pieces of rows, non-finite gradients).
    fn ada_next_round(
        &self,
        t: &mut Self::Tensor<'_>,
        g: &RawBuf,
        u: &TensorUpdate,
    ) -> Result<bool>;

    /// AdaLomo after the (reduced) statistics: when finite and not skipped, commits the state,
    /// forms RMS(p), the update clip and the effective lr and decay, and applies the update
    /// (Σp² of the written values into the record when `u.carry`).
    fn ada_apply(&self, t: &mut Self::Tensor<'_>, g: &RawBuf, u: &TensorUpdate) -> Result<()>;

    /// The tensor's partial statistics as one f64 record to all-reduce (SUM) over the group of
    /// ranks holding its pieces, after `ada_stats` or `check_finite`; None when the tensor is
    /// whole on this rank (nothing to reduce). The layout is the backend's (CPU:
    /// `cpu::ada_piece`, in host memory; CUDA: the same layout in the piece's device record,
    /// filled on the stream); the core only reduces it.
    fn partials<'s>(&self, t: &'s mut Self::Tensor<'_>) -> Option<Record<'s>>;

    /// A distributed phase end, before [`Backend::phase_end`]: the phase totals `[Σg² of the
    /// finite tensors not marked NORM_DUPLICATE, non-finite count]` (f64) gathered where this
    /// backend keeps its tensor records, for the core to all-reduce over the norm group. None:
    /// the host holds the totals (CPU; the core reduces its own `PhaseTotals`). CUDA: one
    /// single-block kernel gathers them into a device record on the stream.
    fn phase_record(&self, update: bool) -> Result<Option<Record<'_>>>;

    /// Hands a host record (the `LOMO_DIST_CHECK` agreement record) to `reduce`, the core's
    /// in-place all-reduce: on the CPU as it is; on CUDA staged through device memory (copied
    /// in, reduced on the stream, copied back: a synchronization, in the checking mode only).
    fn reduce_host(
        &self,
        rec: &mut [f64],
        reduce: &mut dyn FnMut(Record<'_>) -> Result<()>,
    ) -> Result<()>;

    /// Ends a phase on the step record from the tensor records (CPU: the core decides on the
    /// host, nothing to do here; CUDA: one single-block kernel). `reduced`: the decision reads
    /// the reduced record of [`Backend::phase_record`] instead of gathering the tensor records.
    fn phase_end(&self, update: bool, reduced: bool) -> Result<()>;

    /// Gradient accumulation: applies `op` to the accumulation buffer `acc` (memory the core
    /// allocated on this backend's device) with the submitted gradient `g` ([`AccumOp`]).
    /// Backends without accumulation buffers refuse (`Unsupported`), before anything changes.
    fn accumulate(&self, acc: &RawBuf, g: Option<&RawBuf>, op: &AccumOp) -> Result<()> {
        let _ = (acc, g, op);
        crate::error::bail!(
            Unsupported,
            "gradient accumulation buffers are not implemented on this backend"
        )
    }
}

/// A record of f64 values that the core all-reduces in place (statistics of a piece, phase
/// totals).
#[derive(Debug)]
pub enum Record<'s> {
    /// Host memory (the CPU backend); the callback gets stream NULL.
    Host(&'s mut [f64]),
    /// Device memory (the CUDA backend), written by kernels on `stream`: the callback is
    /// handed `stream` and must order its collective after them (no host synchronization).
    Device {
        addr: u64,
        count: usize,
        stream: usize,
    },
}
