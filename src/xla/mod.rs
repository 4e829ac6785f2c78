//! XLA FFI layer: custom-call handlers for JAX, written in Rust against `xla/ffi/api/c_api.h`
//! (`notes/ffi-cuda-jax.md` §2), exported from `liblomo.so` as `lomo_xla_<op>` (Host platform)
//! and `lomo_xla_<op>_cuda` (CUDA platform).
//!
//! These symbols are for XLA's registry (`jax.ffi.register_ffi_target(name,
//! jax.ffi.pycapsule(lib.lomo_xla_<op>), platform=...)`), not for C callers, and are left out
//! of `include/lomo.h`. Each one goes through [`frame::boundary`] (metadata query, struct-size
//! checks, panic boundary, error conversion), decodes its operands into a plan ([`ops`]) and
//! runs it through the core's one orchestration of a step (`crate::orchestrate`, as the
//! optimizer does) on the platform's backend ([`cpu`]: the CPU backend with the operands as its
//! step record; [`cuda`]: the CUDA backend on XLA's stream, with workspaces and the device
//! choice in [`cuda_ws`]). Tensors split over devices inside JAX's `shard_map` take the split
//! phase ([`split`], [`split_norm`]: statistics, the caller's `psum`, apply). The operand layout
//! of every whole-tensor op is in [`ops`];
//! `bindings/python/lomo_native/jax.py` is the caller.

pub mod abi;
pub mod cpu;
pub mod cuda;
#[cfg(all(test, feature = "cuda-emulation"))]
mod cuda_norm_tests;
#[cfg(all(test, feature = "cuda-emulation"))]
mod cuda_tests;
pub mod cuda_ws;
pub mod frame;
pub mod ops;
pub mod split;
pub mod split_norm;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;

use self::abi::{XLA_FFI_CallFrame, XLA_FFI_Error};
use self::frame::boundary;

/// XLA FFI handler (Host platform): Σ(g/loss_scale)² over any number of gradients, the global
/// clip coefficient, and a finite flag. See `src/xla/ops.rs` for the operand layout.
///
/// # Safety
/// Called by XLA with its call frame.
#[no_mangle]
pub unsafe extern "C" fn lomo_xla_grad_sum_sq(frame: *mut XLA_FFI_CallFrame) -> *mut XLA_FFI_Error {
    // SAFETY: `frame` is XLA's call frame for this invocation.
    unsafe {
        boundary(frame, "lomo_xla_grad_sum_sq", |f| {
            cpu::grad_sum_sq(&ops::norm_plan(f)?)
        })
    }
}

/// XLA FFI handler (Host platform): one LOMO update of one tensor.
///
/// # Safety
/// Called by XLA with its call frame.
#[no_mangle]
pub unsafe extern "C" fn lomo_xla_lomo_update(frame: *mut XLA_FFI_CallFrame) -> *mut XLA_FFI_Error {
    // SAFETY: `frame` is XLA's call frame for this invocation.
    unsafe {
        boundary(frame, "lomo_xla_lomo_update", |f| {
            cpu::lomo_update(&ops::lomo_plan(f)?)
        })
    }
}

/// XLA FFI handler (Host platform): one AdaLomo update of one tensor and its state.
///
/// # Safety
/// Called by XLA with its call frame.
#[no_mangle]
pub unsafe extern "C" fn lomo_xla_adalomo_update(
    frame: *mut XLA_FFI_CallFrame,
) -> *mut XLA_FFI_Error {
    // SAFETY: `frame` is XLA's call frame for this invocation.
    unsafe {
        boundary(frame, "lomo_xla_adalomo_update", |f| {
            cpu::adalomo_update(&ops::adalomo_plan(f)?)
        })
    }
}

/// XLA FFI handler (CUDA platform) for `grad_sum_sq`.
///
/// # Safety
/// Called by XLA with its call frame.
#[no_mangle]
pub unsafe extern "C" fn lomo_xla_grad_sum_sq_cuda(
    frame: *mut XLA_FFI_CallFrame,
) -> *mut XLA_FFI_Error {
    // SAFETY: `frame` is XLA's call frame for this invocation.
    unsafe {
        boundary(frame, "lomo_xla_grad_sum_sq_cuda", |f| {
            let plan = ops::norm_plan(f)?;
            cuda::grad_sum_sq(&plan, cuda::stream(f)?)
        })
    }
}

/// XLA FFI handler (CUDA platform) for `lomo_update`.
///
/// # Safety
/// Called by XLA with its call frame.
#[no_mangle]
pub unsafe extern "C" fn lomo_xla_lomo_update_cuda(
    frame: *mut XLA_FFI_CallFrame,
) -> *mut XLA_FFI_Error {
    // SAFETY: `frame` is XLA's call frame for this invocation.
    unsafe {
        boundary(frame, "lomo_xla_lomo_update_cuda", |f| {
            let plan = ops::lomo_plan(f)?;
            cuda::lomo_update(&plan, cuda::stream(f)?)
        })
    }
}

/// XLA FFI handler (CUDA platform) for `adalomo_update`.
///
/// # Safety
/// Called by XLA with its call frame.
#[no_mangle]
pub unsafe extern "C" fn lomo_xla_adalomo_update_cuda(
    frame: *mut XLA_FFI_CallFrame,
) -> *mut XLA_FFI_Error {
    // SAFETY: `frame` is XLA's call frame for this invocation.
    unsafe {
        boundary(frame, "lomo_xla_adalomo_update_cuda", |f| {
            let plan = ops::adalomo_plan(f)?;
            cuda::adalomo_update(&plan, cuda::stream(f)?)
        })
    }
}
