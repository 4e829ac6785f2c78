//! XLA FFI layer, CUDA platform: the caller's stream, and the plans' execution on the device.
//!
//! The CUDA backend is not part of this build yet, so every handler checks its operands (the
//! same plans as the Host platform), obtains XLA's stream with `XLA_FFI_Stream_Get`, and then
//! returns UNIMPLEMENTED. To wire the backend in, implement the three functions below: on `stream`,
//! copy each `InOut` operand to its result when `!aliased()` (`cuMemcpyDtoDAsync`), then launch
//! the norm / update kernels on the result buffers. The per-step scalars (`Scalars`) are device
//! memory here: kernels must read lr, loss_scale, clip_coef and step from those pointers (never
//! copy them to the host: no synchronization on the hot path), and skip the update when
//! clip_coef is not finite. Results `finite` / `sum_sq` / `clip_coef` are device scalars too.

use std::ffi::c_void;

use super::abi::*;
use super::frame::{Frame, XResult, XlaError};
use super::ops::{AdaPlan, LomoPlan, NormPlan};

/// The platform stream of this call (a `CUstream`/`cudaStream_t` on the CUDA platform).
pub fn stream(f: &Frame<'_>) -> XResult<*mut c_void> {
    // SAFETY: `api` is XLA's table for this call (checked non-NULL and large enough below).
    let api = unsafe { f.raw.api.as_ref() }
        .ok_or_else(|| XlaError::internal("XLA_FFI_CallFrame.api is NULL"))?;
    if api.struct_size < XLA_FFI_API_SIZE_FOR_STREAM_GET {
        return Err(XlaError::internal(format!(
            "XLA_FFI_Api is {} bytes, too small for XLA_FFI_Stream_Get",
            api.struct_size
        )));
    }
    let get = api
        .XLA_FFI_Stream_Get
        .ok_or_else(|| XlaError::internal("XLA_FFI_Stream_Get is NULL"))?;
    let mut args = XLA_FFI_Stream_Get_Args {
        struct_size: XLA_FFI_STREAM_GET_ARGS_STRUCT_SIZE,
        extension_start: std::ptr::null_mut(),
        ctx: f.raw.ctx,
        stream: std::ptr::null_mut(),
    };
    // SAFETY: valid args for this call's execution context.
    let err = unsafe { get(&mut args) };
    if !err.is_null() {
        return Err(XlaError {
            code: XLA_FFI_ERROR_INTERNAL,
            message: String::new(),
            from_xla: Some(err),
        });
    }
    Ok(args.stream)
}

fn no_backend(op: &str) -> XlaError {
    XlaError::unimplemented(format!(
        "lomo {op} on the CUDA platform: CUDA backend not available in this build (use the \
         CPU platform, e.g. JAX_PLATFORMS=cpu)"
    ))
}

/// `grad_sum_sq` on `stream`: one Σg² pass per gradient into a device f64 accumulator, then a
/// finalize kernel writing sum_sq, clip_coef and finite.
pub fn grad_sum_sq(plan: &NormPlan<'_>, stream: *mut c_void) -> XResult<()> {
    let _ = (plan, stream);
    Err(no_backend("grad_sum_sq"))
}

/// `lomo_update` on `stream`: copy p when not aliased, then the LOMO kernel on the result.
pub fn lomo_update(plan: &LomoPlan<'_>, stream: *mut c_void) -> XResult<()> {
    let _ = (plan, stream);
    Err(no_backend("lomo_update"))
}

/// `adalomo_update` on `stream`: copy p and state when not aliased, then the AdaLomo passes.
pub fn adalomo_update(plan: &AdaPlan<'_>, stream: *mut c_void) -> XResult<()> {
    let _ = (plan, stream);
    Err(no_backend("adalomo_update"))
}
