//! FFI layer: submitting several gradients in one call (`lomo_grad_submit_batch`) and the CUDA
//! launch counter (`lomo_cuda_launch_count`).

use std::ffi::c_void;

use crate::dtype::DType;
use crate::error::{bail, Status};
use crate::ffi::guard::{deref, deref_mut, guard};
use crate::ffi::optimizer::lomo_optimizer;

/// Hands over `n` gradients of the active phase in one call: `param_ids[k]`, `grads[k]`,
/// `grad_dtypes[k]` and `grad_counts[k]` are as `lomo_grad_submit_checked`'s `param_id`, `grad`,
/// `grad_dtype` and `grad_count`. The result is that of submitting them one by one in this order;
/// every entry is checked first (ids, element counts, duplicates in the batch or the phase, the
/// buffers), so a bad entry returns its status with nothing changed. On CUDA the work is ordered
/// on `stream` (as for `lomo_grad_submit`) and small whole tensors share launches: the NORM
/// pass and LOMO's non-finite pre-check and update of up to 24 tensors of at most 8192 elements
/// (and one gradient dtype, LOMO: one dtype pair) run as one multi-tensor kernel each, bit for
/// bit as separate submits (AdaLomo tensors and pieces of distributed tensors run one by one);
/// groups form within runs of 64 consecutive entries. Allocates no host memory.
/// On the CPU it is the same as the separate submits. `n` may be 0.
///
/// Entries whose passes call collectives (pieces of distributed tensors, gradients reduced by
/// the library) run first, in batch order: a collective failing in the first of them
/// (`LOMO_STATUS_COMM_ERROR`) leaves the whole batch unapplied; one failing later leaves the
/// entries before it applied (the message says how many; they count as submitted in this phase,
/// so resubmitting them is refused: cancel the step).
///
/// Thread-safe as `lomo_grad_submit`, for batches of different parameters.
///
/// # Safety
/// If `opt` is NULL (or, with `n > 0`, any array) the call returns `LOMO_STATUS_NULL_ARGUMENT`;
/// otherwise `opt` must come from `lomo_optimizer_new` and stay alive during the call, and each
/// array must hold `n` readable entries, unchanged until the call returns (they are read more
/// than once, not copied). Each gradient buffer: as for `lomo_grad_submit_checked`.
#[no_mangle]
pub unsafe extern "C" fn lomo_grad_submit_batch(
    opt: *mut lomo_optimizer,
    n: usize,
    param_ids: *const u32,
    grads: *const *const c_void,
    grad_dtypes: *const u32,
    grad_counts: *const u64,
    stream: *mut c_void,
) -> Status {
    guard(|| {
        // SAFETY: a non-NULL `opt` is a live optimizer from lomo_optimizer_new.
        let opt = unsafe { deref(opt, "opt") }?;
        if n > 0
            && (param_ids.is_null()
                || grads.is_null()
                || grad_dtypes.is_null()
                || grad_counts.is_null())
        {
            bail!(
                NullArgument,
                "lomo_grad_submit_batch: param_ids, grads, grad_dtypes and grad_counts must not \
                 be NULL when n > 0"
            );
        }
        // Entry `k` of the caller's arrays (read again by the core: no copy is allocated).
        let entry = |k: usize| {
            // SAFETY: `k < n` and the arrays hold `n` readable entries (the caller's contract),
            // checked non-NULL above.
            let (id, g, d) = unsafe { (*param_ids.add(k), *grads.add(k), *grad_dtypes.add(k)) };
            Ok((id, g as usize, DType::try_from(d)?))
        };
        let inner = opt.inner.read();
        for k in 0..n {
            entry(k)?;
            // SAFETY: as in `entry`.
            let (id, c) = unsafe { (*param_ids.add(k), *grad_counts.add(k)) };
            if let Some(p) = inner.params().get(id as usize) {
                p.check_grad_count(c)?;
            }
        }
        inner.submit_batch_on(n, entry, stream as usize)
    })
}

/// The number of kernels `opt` has launched on its CUDA device so far (diagnostics: the
/// difference over a step is the step's launches; `lomo_grad_submit_batch` lowers it for small
/// tensors). Host-side, no synchronization. `LOMO_STATUS_UNSUPPORTED` without CUDA parameters.
/// Thread-safe.
///
/// # Safety
/// If `opt` or `out` is NULL the call returns `LOMO_STATUS_NULL_ARGUMENT`; otherwise `opt` must
/// come from `lomo_optimizer_new` and stay alive during the call, and `out` must be writable.
#[no_mangle]
pub unsafe extern "C" fn lomo_cuda_launch_count(
    opt: *const lomo_optimizer,
    out: *mut u64,
) -> Status {
    guard(|| {
        // SAFETY: non-NULL pointers are valid per the documented contract.
        let (opt, out) = unsafe { (deref(opt, "opt")?, deref_mut(out, "out")?) };
        match opt.inner.read().cuda() {
            Some(side) => *out = side.launches(),
            None => bail!(
                Unsupported,
                "the optimizer has no CUDA parameters (register one before counting launches)"
            ),
        }
        Ok(())
    })
}
