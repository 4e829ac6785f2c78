//! FFI layer: a parameter's memory layout other than contiguous row-major
//! (`lomo_param_set_strides`); the core is `crate::optimizer` (strides.rs) and `crate::strided`.

use crate::error::Status;
use crate::ffi::guard::{deref, guard};
use crate::ffi::optimizer::lomo_optimizer;
use crate::ffi::types::shape_from_raw;

/// Declares the element strides of parameter `id`'s buffer, between steps: `strides[d]` is the
/// distance, in elements, between neighbours along dimension `d` of the registered shape
/// (PyTorch's `tensor.stride()`, NumPy's `array.strides / itemsize`). Gradients submitted for
/// the parameter afterwards must have the same strides. The layout must be dense and
/// non-overlapping: every element at its own offset in `0..numel` (a permutation of the
/// contiguous strides, e.g. `channels_last` convolution weights or a transposed matrix; a
/// size-1 dimension may have any stride); `ndim` must equal the registered rank.
///
/// LOMO, elementwise, updates such a buffer in memory order and keeps nothing (its element
/// index for stochastic rounding is the memory offset). AdaLomo defines its statistics on the
/// logical view `[prod(shape[:-1]), shape[-1]]`: for a non-contiguous layout the library
/// allocates here `numel · (dtype size + 4)` bytes of scratch (reported as workspace by
/// `lomo_memory_stats_get`), and each `lomo_grad_submit` copies the gradient and the parameter
/// into it in logical order, steps there and copies the written parameter back in place: the
/// result, the state and checkpoints are bit for bit those of the same parameter registered
/// contiguous. Contiguous strides remove a layout set before.
///
/// Fails with `LOMO_STATUS_INVALID_ARGUMENT` (rank mismatch, negative strides, gaps or
/// overlaps), `LOMO_STATUS_UNKNOWN_PARAM`, `LOMO_STATUS_PHASE_ERROR` (inside a step),
/// `LOMO_STATUS_UNSUPPORTED` (AdaLomo on a non-contiguous layout of a CUDA parameter or of a
/// piece set with `lomo_param_set_shard`) and `LOMO_STATUS_OUT_OF_MEMORY`; a failed call leaves
/// the parameter as it was. One thread at a time (like `lomo_param_register`).
///
/// # Safety
/// If `opt` is NULL, or `strides` is NULL with `ndim` > 0, the call returns
/// `LOMO_STATUS_NULL_ARGUMENT`; otherwise `opt` must come from `lomo_optimizer_new` and stay
/// alive during the call, and `strides` must point to `ndim` readable `int64_t` in host memory
/// (read only during the call).
#[no_mangle]
pub unsafe extern "C" fn lomo_param_set_strides(
    opt: *mut lomo_optimizer,
    id: u32,
    ndim: u32,
    strides: *const i64,
) -> Status {
    guard(|| {
        // SAFETY: a non-NULL `opt` is a live optimizer from lomo_optimizer_new.
        let opt = unsafe { deref(opt, "opt") }?;
        // SAFETY: `strides` holds `ndim` values (the caller's contract).
        let strides = unsafe { shape_from_raw(strides, ndim) }?;
        opt.inner.write().param_set_strides(id, strides)
    })
}
