//! FFI layer: the optimizer handle — lifecycle, groups, registration and the step protocol.
//!
//! Every export has the same shape: guard → convert and check → call the core → write outputs.
#![allow(non_camel_case_types)]

use std::ffi::c_void;

use parking_lot::RwLock;

use crate::config::{Algorithm, Config};
use crate::dtype::DType;
use crate::error::{bail, Status};
use crate::ffi::guard::{c_str, check_struct_size, deref, deref_mut, guard, guard_or};
use crate::ffi::types::{lomo_config, lomo_param_desc, lomo_step_info, shape_from_raw};
use crate::optimizer::{Optimizer, Phase};
use crate::param::{Device, ParamDesc};

/// An optimizer: its configuration, the registered parameters and their state.
///
/// Create with `lomo_optimizer_new`, destroy with `lomo_optimizer_free`. `lomo_grad_submit` may
/// be called from several threads at once (for different parameters); every other function
/// taking a `lomo_optimizer *` must be called by one thread at a time, between submissions
/// (calls are serialized internally, so a violation blocks rather than corrupts).
pub struct lomo_optimizer {
    pub(crate) inner: RwLock<Optimizer>,
}

/// Fills `*cfg` with lomo-optim's defaults for `algorithm` (`LOMO_ALGORITHM_LOMO` or
/// `LOMO_ALGORITHM_ADALOMO`) and sets `struct_size`. See `lomo_config` for each default.
/// `cfg` must not be NULL; it is written only on success. Thread-safe.
///
/// # Safety
/// If `cfg` is NULL, the call returns `LOMO_STATUS_NULL_ARGUMENT`; otherwise `cfg` must point to
/// writable host memory for one `lomo_config`, whose previous contents are overwritten, not read.
#[no_mangle]
pub unsafe extern "C" fn lomo_config_init(cfg: *mut lomo_config, algorithm: u32) -> Status {
    guard(|| {
        // SAFETY: a non-NULL `cfg` points to writable storage for a lomo_config.
        let out = unsafe { deref_mut(cfg, "cfg") }?;
        let algorithm = Algorithm::try_from(algorithm)?;
        *out = lomo_config::from_core(&Config::defaults(algorithm));
        Ok(())
    })
}

/// Creates an optimizer from a validated copy of `*cfg` and stores it in `*out`.
/// `cfg` and `out` must not be NULL; `*out` is written only on success. The caller owns the
/// result and frees it with `lomo_optimizer_free`. Thread-safe.
///
/// # Safety
/// If `cfg` or `out` is NULL, the call returns `LOMO_STATUS_NULL_ARGUMENT` (nothing written);
/// otherwise `cfg` must point to a readable `lomo_config` (only read during the call) and `out` to
/// a writable `lomo_optimizer *`.
#[no_mangle]
pub unsafe extern "C" fn lomo_optimizer_new(
    cfg: *const lomo_config,
    out: *mut *mut lomo_optimizer,
) -> Status {
    guard(|| {
        // SAFETY: non-NULL pointers are valid per the documented contract.
        let out = unsafe { deref_mut(out, "out")? };
        if cfg.is_null() {
            bail!(NullArgument, "cfg is NULL");
        }
        // SAFETY: `cfg` is non-NULL and readable per the contract, for the size its
        // `struct_size` declares (no reference to a full struct is formed before that is known).
        let cfg = unsafe { lomo_config::read_versioned(cfg) };
        let opt = Optimizer::new(cfg.to_core()?)?;
        *out = Box::into_raw(Box::new(lomo_optimizer {
            inner: RwLock::new(opt),
        }));
        Ok(())
    })
}

/// Destroys an optimizer and its state. NULL is a no-op. Parameter buffers are the caller's and
/// are not touched. No other call on `opt` may be running or follow.
///
/// # Safety
/// `opt` must be NULL or a handle from `lomo_optimizer_new` not yet freed. No other call on `opt`
/// (`lomo_grad_submit` included) may run concurrently or follow; freeing twice is undefined
/// behaviour. Device addresses from `lomo_cuda_loss_scale_ptr` become invalid.
#[no_mangle]
pub unsafe extern "C" fn lomo_optimizer_free(opt: *mut lomo_optimizer) {
    guard_or((), || {
        if !opt.is_null() {
            // SAFETY: `opt` came from lomo_optimizer_new and is freed exactly once.
            drop(unsafe { Box::from_raw(opt) });
        }
    })
}

/// Sets the lr multiplier and weight decay of `group`, creating the group if needed. Group 0
/// exists from the start with multiplier 1 and the config's `weight_decay`. Use a separate group
/// with `weight_decay = 0` for biases and norm weights. Takes effect from the next submission.
///
/// # Safety
/// If `opt` is NULL, the call returns `LOMO_STATUS_NULL_ARGUMENT`; otherwise `opt` must come from
/// `lomo_optimizer_new` and must not be passed to `lomo_optimizer_free` before this call returns.
#[no_mangle]
pub unsafe extern "C" fn lomo_group_set(
    opt: *mut lomo_optimizer,
    group: u32,
    lr_multiplier: f64,
    weight_decay: f64,
) -> Status {
    guard(|| {
        // SAFETY: a non-NULL `opt` is a live optimizer from lomo_optimizer_new.
        let opt = unsafe { deref(opt, "opt") }?;
        opt.inner
            .write()
            .group_set(group, lr_multiplier, weight_decay)
    })
}

/// Reads a group's lr multiplier and weight decay. Outputs are written only on success.
///
/// # Safety
/// If `opt`, `out_lr_multiplier` or `out_weight_decay` is NULL, the call returns
/// `LOMO_STATUS_NULL_ARGUMENT` (nothing written); otherwise `opt` must come from
/// `lomo_optimizer_new` and must not be passed to `lomo_optimizer_free` before this call returns,
/// and each output must point to a writable `double`.
#[no_mangle]
pub unsafe extern "C" fn lomo_group_get(
    opt: *const lomo_optimizer,
    group: u32,
    out_lr_multiplier: *mut f64,
    out_weight_decay: *mut f64,
) -> Status {
    guard(|| {
        // SAFETY: non-NULL pointers are valid per the documented contract.
        let (opt, lr, wd) = unsafe {
            (
                deref(opt, "opt")?,
                deref_mut(out_lr_multiplier, "out_lr_multiplier")?,
                deref_mut(out_weight_decay, "out_weight_decay")?,
            )
        };
        let g = opt.inner.read().group_get(group)?;
        (*lr, *wd) = (g.lr_multiplier, g.weight_decay);
        Ok(())
    })
}

/// Registers a parameter buffer (between steps) and stores its id in `*out_id`; ids are
/// assigned densely from 0 in registration order. The name and shape are copied; the data buffer
/// is borrowed (see `lomo_param_desc`). AdaLomo allocates the parameter's state and workspace
/// here, so steps allocate nothing. Frozen parameters are simply not registered.
///
/// Fails with `LOMO_STATUS_OUT_OF_MEMORY` (the message gives the bytes asked for) when the
/// state or workspace cannot be allocated, and with `LOMO_STATUS_INVALID_ARGUMENT` when the
/// shape's element count, or its size in bytes, overflows 64 bits. A failed registration leaves
/// the optimizer as it was.
///
/// A CUDA parameter's buffer is checked with the driver (first and last byte, host-side, no
/// synchronization): memory CUDA does not know is `LOMO_STATUS_INVALID_ARGUMENT`, device memory
/// of another device or of a context other than the device's primary context is
/// `LOMO_STATUS_DEVICE_MISMATCH`.
///
/// # Safety
/// If `opt`, `desc`, `out_id`, `desc->name` or (when `ndim` > 0) `desc->shape` is NULL, the call
/// returns `LOMO_STATUS_NULL_ARGUMENT`; otherwise `opt` must come from `lomo_optimizer_new` and not
/// be freed before this call returns; `desc` must point to a readable `lomo_param_desc`, `out_id`
/// to a writable `uint32_t`, `name` to a NUL-terminated string and `shape` to `ndim` `int64_t`
/// (read only during the call). `desc->data` must meet the contract of `lomo_param_desc.data`.
#[no_mangle]
pub unsafe extern "C" fn lomo_param_register(
    opt: *mut lomo_optimizer,
    desc: *const lomo_param_desc,
    out_id: *mut u32,
) -> Status {
    guard(|| {
        // SAFETY: non-NULL pointers are valid per the documented contract.
        let (opt, d, out_id) = unsafe {
            (
                deref(opt, "opt")?,
                deref(desc, "desc")?,
                deref_mut(out_id, "out_id")?,
            )
        };
        check_struct_size(
            "lomo_param_desc",
            d.struct_size,
            std::mem::size_of::<lomo_param_desc>(),
        )?;
        // SAFETY: `name` is NUL-terminated and `shape` holds `ndim` values (documented contract).
        let (name, shape) = unsafe {
            (
                c_str(d.name, "desc->name")?,
                shape_from_raw(d.shape, d.ndim)?,
            )
        };
        let desc = ParamDesc {
            name,
            addr: d.data as usize,
            dtype: DType::try_from(d.dtype)?,
            shape,
            device: Device::from_raw(d.device)?,
            group: d.group,
            flags: d.flags,
        };
        *out_id = opt.inner.write().register(&desc)?;
        Ok(())
    })
}

/// Number of registered parameters.
///
/// # Safety
/// If `opt` or `out` is NULL, the call returns `LOMO_STATUS_NULL_ARGUMENT`; otherwise `opt` must
/// come from `lomo_optimizer_new` and must not be passed to `lomo_optimizer_free` before this call
/// returns, and `out` must point to a writable `uint32_t`.
#[no_mangle]
pub unsafe extern "C" fn lomo_param_count(opt: *const lomo_optimizer, out: *mut u32) -> Status {
    guard(|| {
        // SAFETY: non-NULL pointers are valid per the documented contract.
        let (opt, out) = unsafe { (deref(opt, "opt")?, deref_mut(out, "out")?) };
        *out = opt.inner.read().params().len() as u32;
        Ok(())
    })
}

/// Begins a phase of a training step.
///
/// `phase` is `LOMO_PHASE_NORM` (only the global norm and the overflow check; required before
/// every UPDATE phase when `clip_grad_norm` is set) or `LOMO_PHASE_UPDATE` (each submitted
/// gradient updates its parameter, with learning rate `lr` times the group's multiplier).
/// `lr` is ignored by NORM phases. `stream` is the caller's `cudaStream_t`/`CUstream` for CUDA
/// parameters (NULL = default stream); it is ignored on the CPU. Fails with
/// `LOMO_STATUS_PHASE_ERROR` if a phase is active or if an UPDATE phase lacks its NORM phase.
///
/// # Safety
/// If `opt` is NULL, the call returns `LOMO_STATUS_NULL_ARGUMENT`; otherwise `opt` must come from
/// `lomo_optimizer_new` and must not be passed to `lomo_optimizer_free` before this call returns.
/// For CUDA parameters `stream` must be NULL or a live stream of the parameters' device; it is
/// never used for CPU parameters.
#[no_mangle]
pub unsafe extern "C" fn lomo_step_begin(
    opt: *mut lomo_optimizer,
    phase: u32,
    lr: f32,
    stream: *mut c_void,
) -> Status {
    guard(|| {
        // SAFETY: a non-NULL `opt` is a live optimizer from lomo_optimizer_new.
        let opt = unsafe { deref(opt, "opt") }?;
        opt.inner
            .write()
            .begin_on(Phase::try_from(phase)?, lr as f64, stream as usize)
    })
}

/// Hands over the gradient of parameter `param_id` during a phase.
///
/// `grad` points to the parameter's number of elements of `grad_dtype` (any of f32/f16/bf16,
/// independent of the parameter's dtype), contiguous and aligned, in the parameter's memory
/// (host for CPU parameters); for a piece in `LOMO_GRAD_REDUCE_SCATTER` mode, the whole
/// tensor's (`prod(global_shape)`, see `lomo_param_set_shard`). The gradient is that of the loss multiplied by `lomo_loss_scale`;
/// the library unscales it. On the CPU the parameter is updated before the call returns and
/// `grad` may be reused at once; on CUDA the work is ordered on `stream`. A non-finite gradient
/// is never applied: it is reported through `lomo_step_info` (not as an error). Nor does the
/// optimizer write a non-finite value it made itself: a finite gradient whose f32 statistics
/// or scalars overflow (|g / loss scale| or |p| above ~1.8e19) is refused like a non-finite one
/// (nothing changes), and an element whose new value would overflow the parameter's dtype keeps
/// its old value; both are reported the same way. Prefer `lomo_grad_submit_checked`, which
/// also checks the gradient's element count. A CUDA gradient
/// is checked with the driver as the parameter is at `lomo_param_register` (host-side, legal
/// during graph capture) and refused, with nothing enqueued, if the device could not read it.
///
/// Thread-safe: several threads may submit different parameters at once (parameters that issue
/// collectives — pieces, library-reduced gradients — must be submitted from one thread in the
/// same order on every rank; the gradient scratch is locked for one submission at a time).
///
/// # Safety
/// If `opt` is NULL, the call returns `LOMO_STATUS_NULL_ARGUMENT`; otherwise `opt` must come from
/// `lomo_optimizer_new` and must not be passed to `lomo_optimizer_free` before this call returns. A
/// NULL `grad` returns `LOMO_STATUS_NULL_ARGUMENT` unless the parameter has no elements. CPU
/// parameters: `grad` is host memory read only during the call, and no other code may access the
/// parameter's buffer during it. CUDA parameters: `grad` is memory on the parameter's device that
/// must stay valid and unchanged until the work on `stream` (as for `lomo_step_begin`) has run.
#[no_mangle]
pub unsafe extern "C" fn lomo_grad_submit(
    opt: *mut lomo_optimizer,
    param_id: u32,
    grad: *const c_void,
    grad_dtype: u32,
    stream: *mut c_void,
) -> Status {
    guard(|| {
        // SAFETY: a non-NULL `opt` is a live optimizer from lomo_optimizer_new.
        let opt = unsafe { deref(opt, "opt") }?;
        let dtype = DType::try_from(grad_dtype)?;
        opt.inner
            .read()
            .submit_on(param_id, grad as usize, dtype, stream as usize)
    })
}

/// `lomo_grad_submit` with the gradient's element count, so that a buffer of the wrong extent is
/// refused instead of read past its end (the form every binding and the C++ wrapper use).
///
/// `grad_count` is the number of `grad_dtype` elements the caller's buffer holds (as NCCL's
/// `count`); it must equal the parameter's element count (the product of its registered shape;
/// with `LOMO_GRAD_REDUCE_SCATTER` the whole tensor's), else the call returns `LOMO_STATUS_INVALID_ARGUMENT` with nothing read, nothing changed, and
/// the parameter still expecting its gradient in this phase. Everything else — phases, NULL,
/// host or device memory, stream ordering, thread safety — is as for `lomo_grad_submit`.
///
/// # Safety
/// As `lomo_grad_submit`; `grad` must point to `grad_count` readable elements of `grad_dtype`.
#[no_mangle]
pub unsafe extern "C" fn lomo_grad_submit_checked(
    opt: *mut lomo_optimizer,
    param_id: u32,
    grad: *const c_void,
    grad_dtype: u32,
    grad_count: u64,
    stream: *mut c_void,
) -> Status {
    guard(|| {
        // SAFETY: a non-NULL `opt` is a live optimizer from lomo_optimizer_new.
        let opt = unsafe { deref(opt, "opt") }?;
        let dtype = DType::try_from(grad_dtype)?;
        let inner = opt.inner.read();
        if let Some(p) = inner.params().get(param_id as usize) {
            p.check_grad_count(grad_count)?;
        }
        inner.submit_on(param_id, grad as usize, dtype, stream as usize)
    })
}

/// Ends the active phase. After a NORM phase it forms the clip coefficient and the overflow
/// decision (an overflow turns the following UPDATE phase into a no-op); after an UPDATE phase it
/// advances the loss scaler and the step counter. `stream`: as for `lomo_step_begin`.
///
/// # Safety
/// If `opt` is NULL, the call returns `LOMO_STATUS_NULL_ARGUMENT`; otherwise `opt` must come from
/// `lomo_optimizer_new` and must not be passed to `lomo_optimizer_free` before this call returns.
/// `stream`: as for `lomo_step_begin`.
#[no_mangle]
pub unsafe extern "C" fn lomo_step_end(opt: *mut lomo_optimizer, stream: *mut c_void) -> Status {
    guard(|| {
        // SAFETY: a non-NULL `opt` is a live optimizer from lomo_optimizer_new.
        let opt = unsafe { deref(opt, "opt") }?;
        opt.inner.write().end_on(stream as usize)
    })
}

/// Abandons the current step (for example when the trainer's backward raised): the optimizer
/// returns to "between steps" without advancing the loss scaler or the step counter. Updates an
/// UPDATE phase already applied stay applied. A no-op between steps.
///
/// # Safety
/// If `opt` is NULL, the call returns `LOMO_STATUS_NULL_ARGUMENT`; otherwise `opt` must come from
/// `lomo_optimizer_new` and must not be passed to `lomo_optimizer_free` before this call returns.
#[no_mangle]
pub unsafe extern "C" fn lomo_step_cancel(opt: *mut lomo_optimizer) -> Status {
    guard(|| {
        // SAFETY: a non-NULL `opt` is a live optimizer from lomo_optimizer_new.
        let opt = unsafe { deref(opt, "opt") }?;
        opt.inner.write().cancel();
        Ok(())
    })
}

/// Copies the diagnostics of the last phase and step into `*out`; set `out->struct_size` to
/// `sizeof(lomo_step_info)` first. May synchronize with the device for CUDA parameters.
///
/// # Safety
/// If `opt` or `out` is NULL, the call returns `LOMO_STATUS_NULL_ARGUMENT`; otherwise `opt` must
/// come from `lomo_optimizer_new` and must not be passed to `lomo_optimizer_free` before this call
/// returns, and `out` must point to a writable `lomo_step_info` (`sizeof(lomo_step_info)` host
/// bytes).
#[no_mangle]
pub unsafe extern "C" fn lomo_step_info_get(
    opt: *const lomo_optimizer,
    out: *mut lomo_step_info,
) -> Status {
    guard(|| {
        // SAFETY: non-NULL pointers are valid per the documented contract.
        let (opt, out) = unsafe { (deref(opt, "opt")?, deref_mut(out, "out")?) };
        check_struct_size(
            "lomo_step_info",
            out.struct_size,
            std::mem::size_of::<lomo_step_info>(),
        )?;
        *out = lomo_step_info::from_core(&opt.inner.read().try_step_info()?);
        Ok(())
    })
}

/// The factor to multiply the loss by before the next backward pass (1 when scaling is off).
/// With dynamic loss scaling of CUDA parameters the scale is read from the device, so the call
/// waits for the stream of the optimizer's latest launch (see `lomo_cuda_loss_scale_ptr` for a
/// synchronization-free alternative); with no or static scaling it never synchronizes. `opt`
/// and `out` must not be NULL; `*out` is written only on success. One thread at a time, like
/// every call other than `lomo_grad_submit`.
///
/// # Safety
/// If `opt` or `out` is NULL, the call returns `LOMO_STATUS_NULL_ARGUMENT`; otherwise `opt` must
/// come from `lomo_optimizer_new` and must not be passed to `lomo_optimizer_free` before this call
/// returns, and `out` must point to a writable host `float`.
#[no_mangle]
pub unsafe extern "C" fn lomo_loss_scale(opt: *const lomo_optimizer, out: *mut f32) -> Status {
    guard(|| {
        // SAFETY: non-NULL pointers are valid per the documented contract.
        let (opt, out) = unsafe { (deref(opt, "opt")?, deref_mut(out, "out")?) };
        let s = opt.inner.read().try_loss_scale()?;
        if !s.is_finite() {
            bail!(InvalidArgument, "loss scale is not finite");
        }
        *out = s as f32;
        Ok(())
    })
}

/// Stores in `*out` the device address of a `float` holding the loss scale for the next
/// backward pass, for CUDA-graph capture: multiply the loss by it on the device instead of
/// reading `lomo_loss_scale` on the host. The value is updated in stream order by the
/// `lomo_step_end` that ends an UPDATE phase (the dynamic scaler runs on the device). The address
/// stays valid until the optimizer is freed; never write through it. Fails with
/// `LOMO_STATUS_UNSUPPORTED` when the optimizer has no CUDA parameters. Thread-safe as
/// `lomo_loss_scale`.
///
/// # Safety
/// If `opt` or `out` is NULL, the call returns `LOMO_STATUS_NULL_ARGUMENT`; otherwise `opt` must
/// come from `lomo_optimizer_new` and must not be passed to `lomo_optimizer_free` before this call
/// returns, and `out` must point to a writable `const float *`. The stored address is device
/// memory: read it only on the device (never on the host), and not after `lomo_optimizer_free`.
#[no_mangle]
pub unsafe extern "C" fn lomo_cuda_loss_scale_ptr(
    opt: *const lomo_optimizer,
    out: *mut *const f32,
) -> Status {
    guard(|| {
        // SAFETY: non-NULL pointers are valid per the documented contract.
        let (opt, out) = unsafe { (deref(opt, "opt")?, deref_mut(out, "out")?) };
        *out = opt.inner.read().cuda_loss_scale_ptr()? as usize as *const f32;
        Ok(())
    })
}
