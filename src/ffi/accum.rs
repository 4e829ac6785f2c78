//! FFI layer: gradient accumulation (`lomo_accum_enable`, `LOMO_PHASE_ACCUMULATE`).
//!
//! Every export has the same shape: guard → convert and check → call the core → write outputs.

use crate::error::{bail, Result, Status};
use crate::ffi::guard::{deref, deref_mut, guard};
use crate::ffi::optimizer::lomo_optimizer;
use crate::optimizer::{AccumBuffer, AccumReduction, AccumSettings};

/// `lomo_accum_enable` buffer: f32 (4 bytes per element).
pub const LOMO_ACCUM_F32: u32 = 0;
/// `lomo_accum_enable` buffer: the parameter's own dtype (2 bytes per f16/bf16 element; each
/// partial sum rounded to it, an f16 sum beyond 65504 overflows the step).
pub const LOMO_ACCUM_PARAM_DTYPE: u32 = 1;
/// `lomo_accum_enable` reduction: the sum of the micro-batches' gradients.
pub const LOMO_ACCUM_SUM: u32 = 0;
/// `lomo_accum_enable` reduction: the mean over the step's micro-batches (its ACCUMULATE
/// phases + 1).
pub const LOMO_ACCUM_MEAN: u32 = 1;

fn settings(buffer: u32, reduction: u32) -> Result<AccumSettings> {
    let buffer = match buffer {
        LOMO_ACCUM_F32 => AccumBuffer::F32,
        LOMO_ACCUM_PARAM_DTYPE => AccumBuffer::ParamDtype,
        b => bail!(
            InvalidArgument,
            "unknown accumulation buffer {b} (expected 0=LOMO_ACCUM_F32, \
             1=LOMO_ACCUM_PARAM_DTYPE)"
        ),
    };
    let reduction = match reduction {
        LOMO_ACCUM_SUM => AccumReduction::Sum,
        LOMO_ACCUM_MEAN => AccumReduction::Mean,
        r => bail!(
            InvalidArgument,
            "unknown accumulation reduction {r} (expected 0=LOMO_ACCUM_SUM, 1=LOMO_ACCUM_MEAN)"
        ),
    };
    Ok(AccumSettings { buffer, reduction })
}

/// Turns gradient accumulation on: every parameter (registered now or later) gets a buffer of
/// its element count in f32 (`buffer` = `LOMO_ACCUM_F32`, 4 bytes per element) or in its own
/// dtype (`LOMO_ACCUM_PARAM_DTYPE`), in the parameter's memory (host memory for CPU
/// parameters, device memory of their device for CUDA parameters, where every accumulation
/// pass is a kernel enqueued on the submission's stream: no host synchronization);
/// `reduction` is `LOMO_ACCUM_SUM` or `LOMO_ACCUM_MEAN`.
/// Calling it again changes the options (the buffers are reallocated when their dtype changes).
///
/// A step over k micro-batches is then k − 1 phases `lomo_step_begin(LOMO_PHASE_ACCUMULATE)` …
/// `lomo_grad_submit` … `lomo_step_end` (each gradient is added to its buffer; nothing is
/// updated), followed by the step's own phases, whose backward is the last micro-batch (NORM
/// then UPDATE with `clip_grad_norm`, else UPDATE). There each submitted gradient completes its
/// buffer — `(Σ g)` or `(Σ g)/k` — and the pass reads the buffer: the norm, clipping, loss scale
/// and non-finite checks are exactly those of one step on the accumulated gradients (a
/// non-finite gradient in any micro-batch overflows the whole step). In the UPDATE phase after
/// a NORM phase the buffer is already complete and the resubmitted gradient of the last
/// micro-batch is not read. A parameter that received accumulated gradients but none in the
/// step's phase runs from its buffer at `lomo_step_end`. The UPDATE phase's end empties the
/// buffers; `lomo_step_cancel` discards them. A step without ACCUMULATE phases does not use
/// them. Multiply the loss by `lomo_loss_scale` in every micro-batch, as for any backward.
///
/// Distributed optimizers (`lomo_dist_set`, `lomo_param_set_shard`): the buffer holds what
/// the rank submits for the piece — the piece's reduced gradient (`LOMO_GRAD_REDUCED`), this
/// rank's gradient of the piece (`LOMO_GRAD_ALL_REDUCE`) or this rank's gradient of the WHOLE
/// tensor (`LOMO_GRAD_REDUCE_SCATTER`: the buffer has the global element count, not the
/// partition's). The library reduces only the completed buffer, once per NORM/UPDATE phase
/// (one collective per tensor and phase, not one per micro-batch): n ranks accumulating k
/// micro-batches step exactly as one rank on the concatenated global batch. In the step's
/// NORM/UPDATE phases the passes of pieces (and their collectives) run at `lomo_step_end` in
/// parameter id order, whatever the submission order or the micro-batch each gradient came in;
/// every rank must have accumulated gradients for the same parameters. With `LOMO_DIST_CHECK`
/// the ranks' micro-batch counts are part of the agreement record (`LOMO_STATUS_DIST_MISMATCH`
/// when they differ). A `LOMO_STATUS_COMM_ERROR` at that `lomo_step_end` keeps the
/// accumulated gradients: the call can be retried (passes already run are not repeated), or
/// the step cancelled. `lomo_comm_add`, `lomo_dist_set` and `lomo_param_set_shard` fail with
/// `LOMO_STATUS_PHASE_ERROR` while accumulated gradients are pending.
///
/// The buffers count as `workspace_bytes` in `lomo_memory_stats_get` (and `lomo_accum_get`).
/// They are not part of a checkpoint: `lomo_state_save`/`_load` fail with
/// `LOMO_STATUS_PHASE_ERROR` while accumulated gradients are pending.
///
/// Fails, with nothing changed, with `LOMO_STATUS_PHASE_ERROR` during a step or while
/// accumulated gradients are pending, `LOMO_STATUS_INVALID_ARGUMENT` for unknown values,
/// `LOMO_STATUS_OUT_OF_MEMORY` (host or device). Not thread-safe with other calls on `opt`.
///
/// # Safety
/// If `opt` is NULL, the call returns `LOMO_STATUS_NULL_ARGUMENT`; otherwise `opt` must come from
/// `lomo_optimizer_new` and must not be passed to `lomo_optimizer_free` before this call returns.
#[no_mangle]
pub unsafe extern "C" fn lomo_accum_enable(
    opt: *mut lomo_optimizer,
    buffer: u32,
    reduction: u32,
) -> Status {
    guard(|| {
        // SAFETY: a non-NULL `opt` is a live optimizer from lomo_optimizer_new.
        let opt = unsafe { deref(opt, "opt") }?;
        let s = settings(buffer, reduction)?;
        opt.inner.write().accum_enable(s)
    })
}

/// Turns gradient accumulation off and frees the buffers. A no-op when it is off. Fails with
/// `LOMO_STATUS_PHASE_ERROR` (nothing changed) during a step or while accumulated gradients
/// are pending. Not thread-safe with other calls on `opt`.
///
/// # Safety
/// As `lomo_accum_enable`.
#[no_mangle]
pub unsafe extern "C" fn lomo_accum_disable(opt: *mut lomo_optimizer) -> Status {
    guard(|| {
        // SAFETY: a non-NULL `opt` is a live optimizer from lomo_optimizer_new.
        let opt = unsafe { deref(opt, "opt") }?;
        opt.inner.write().accum_disable()
    })
}

/// Writes the number of ACCUMULATE phases completed in the current step (micro-batches whose
/// gradients wait in the buffers) to `*out_pending`, and the bytes of all accumulation buffers
/// (host or device memory, where the parameters are; 0 when accumulation is off) to
/// `*out_bytes`. Never synchronizes. Both must not be NULL; written
/// only on success. Not thread-safe with other calls on `opt` except `lomo_grad_submit`.
///
/// # Safety
/// As `lomo_accum_enable`; `out_pending` and `out_bytes` must point to writable host memory.
#[no_mangle]
pub unsafe extern "C" fn lomo_accum_get(
    opt: *const lomo_optimizer,
    out_pending: *mut u32,
    out_bytes: *mut u64,
) -> Status {
    guard(|| {
        // SAFETY: non-NULL pointers are valid per the documented contract.
        let (opt, pending, bytes) = unsafe {
            (
                deref(opt, "opt")?,
                deref_mut(out_pending, "out_pending")?,
                deref_mut(out_bytes, "out_bytes")?,
            )
        };
        let o = opt.inner.read();
        let total = o
            .params()
            .iter()
            .map(|p| p.inner.lock().accum.as_ref().map_or(0, |a| a.bytes()))
            .sum();
        *pending = o.accum_pending();
        *bytes = total;
        Ok(())
    })
}
