//! FFI layer: the C-visible structs and constants, and their conversion to core types.
#![allow(non_camel_case_types)]

use crate::config::{Algorithm, Config, LossScaleMode, NonFinitePolicy, Rounding};
use crate::error::{bail, Result};
use crate::ffi::guard::check_struct_size;
use crate::memory::MemoryStats;
use crate::optimizer::StepInfo;

/// ABI version of this library; bumped on every change of the C API (2: distributed training —
/// `lomo_comm`, `lomo_shard_desc`, `lomo_dist_set`, two statuses).
pub const LOMO_ABI_VERSION: u32 = 2;

/// The `device` of a parameter that lives in host memory.
pub const LOMO_DEVICE_CPU: i32 = -1;

/// `lomo_param_desc.flags`: carry Σp² of the values written by the previous AdaLomo step instead
/// of re-reading the parameter in the next one (one read of p less per step). Only valid while
/// nothing but this optimizer writes the parameter; recomputed on the first step and after a
/// state load. Ignored by LOMO.
pub const LOMO_PARAM_CARRY_RMS: u32 = 1;

// The C constant is the core's flag (`param::PARAM_FLAG_CARRY_RMS`); written as a literal above
// because cbindgen only exports literal constants, and held equal to the core's here.
const _: () = assert!(LOMO_PARAM_CARRY_RMS == crate::param::PARAM_FLAG_CARRY_RMS);

/// Optimizer configuration. Fill it with `lomo_config_init`, then change fields.
///
/// Every real-valued field is a `double`; lomo-optim computes derived scalars in double
/// precision and rounds them to float, and so does this library.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct lomo_config {
    /// `sizeof(lomo_config)`; set by `lomo_config_init`.
    pub struct_size: usize,
    /// `LOMO_ALGORITHM_LOMO` or `LOMO_ALGORITHM_ADALOMO`.
    pub algorithm: u32,
    /// Decoupled weight decay of group 0: p ← p·(1 − lr·wd) before the step. Default 0.
    pub weight_decay: f64,
    /// Global gradient-norm clipping threshold C; 0 = off (default). When on, every step needs a
    /// NORM phase; the coefficient is min(1, C / (‖g‖ + 1e-6)) of the unscaled gradients.
    pub clip_grad_norm: f64,
    /// Element-wise clipping of the unscaled gradient to [−v, v]; 0 = off (default).
    pub clip_grad_value: f64,
    /// `LOMO_LOSS_SCALE_NONE` (LOMO default), `_STATIC` (AdaLomo default) or `_DYNAMIC`.
    pub loss_scale_mode: u32,
    /// The static scale, or the initial dynamic scale. Defaults: 1024 (AdaLomo), 65536 (LOMO).
    pub loss_scale: f64,
    /// Dynamic scaling: factor of each back-off and growth. Default 2.
    pub scale_factor: f64,
    /// Dynamic scaling: clean steps before the scale grows. Default 1000.
    pub scale_window: u32,
    /// Dynamic scaling: lower bound of the scale. Default 1.
    pub min_loss_scale: f64,
    /// Dynamic scaling: overflowing steps tolerated before a back-off. Default 1.
    pub hysteresis: u32,
    /// AdaLomo: added to each squared gradient element before the row/column means. Default 1e-30.
    pub eps1: f64,
    /// AdaLomo: lower bound of RMS(p) in the relative step size. Default 1e-3.
    pub eps2: f64,
    /// AdaLomo: updates are divided by max(1, RMS(update)/clip_threshold). Default 1.
    pub clip_threshold: f64,
    /// AdaLomo: β2t = 1 − t^decay_rate. Default −0.8.
    pub decay_rate: f64,
    /// `LOMO_ROUNDING_NEAREST` (default) or `LOMO_ROUNDING_STOCHASTIC`, for f16/bf16 parameters.
    pub rounding: u32,
    /// Seed of the stochastic-rounding generator. Default 0.
    pub seed: u64,
    /// LOMO, steps without a NORM phase: what a gradient with a non-finite element does.
    /// `LOMO_NONFINITE_PER_TENSOR` (default): its tensor is left untouched (exact; the CPU reads
    /// the gradient twice: a check, then the update). `LOMO_NONFINITE_PER_ELEMENT`: one pass;
    /// every element whose gradient is finite is updated, the others keep their value. Either
    /// way no non-finite value is written and the tensor counts in `grads_nonfinite` (the step
    /// reports `overflow`). CPU parameters only (registering a CUDA parameter is refused with
    /// `LOMO_STATUS_UNSUPPORTED`). On a piece of a distributed tensor without a NORM phase the
    /// per-tensor policy all-reduces one non-finite flag per piece before writing (a tensor is
    /// written all or nothing, so the ranks must agree first); the per-element policy needs no
    /// per-tensor collective (the count rides in the phase-end record; `grads_nonfinite` then
    /// counts the pieces of every rank). AdaLomo is not affected. Added after `seed`: a caller built against a header without
    /// this field passes the older `struct_size` and gets the default.
    pub nonfinite_policy: u32,
}

/// `lomo_config.nonfinite_policy`: a non-finite gradient leaves its whole tensor untouched.
pub const LOMO_NONFINITE_PER_TENSOR: u32 = 0;
/// `lomo_config.nonfinite_policy`: only the elements with a non-finite gradient keep their value.
pub const LOMO_NONFINITE_PER_ELEMENT: u32 = 1;
const _: () = assert!(LOMO_NONFINITE_PER_TENSOR == NonFinitePolicy::PerTensor as u32);
const _: () = assert!(LOMO_NONFINITE_PER_ELEMENT == NonFinitePolicy::PerElement as u32);

/// `sizeof(lomo_config)` before `nonfinite_policy` was appended (ABI 2 headers up to 0.1.0):
/// still accepted, with the default policy.
pub const LOMO_CONFIG_SIZE_V1: usize = std::mem::offset_of!(lomo_config, nonfinite_policy);

impl lomo_config {
    pub fn from_core(c: &Config) -> lomo_config {
        lomo_config {
            struct_size: std::mem::size_of::<lomo_config>(),
            algorithm: c.algorithm as u32,
            weight_decay: c.weight_decay,
            clip_grad_norm: c.clip_grad_norm,
            clip_grad_value: c.clip_grad_value,
            loss_scale_mode: c.loss_scale_mode as u32,
            loss_scale: c.loss_scale,
            scale_factor: c.scale_factor,
            scale_window: c.scale_window,
            min_loss_scale: c.min_loss_scale,
            hysteresis: c.hysteresis,
            eps1: c.eps1,
            eps2: c.eps2,
            clip_threshold: c.clip_threshold,
            decay_rate: c.decay_rate,
            rounding: c.rounding as u32,
            seed: c.seed,
            nonfinite_policy: c.nonfinite as u32,
        }
    }

    /// Reads a caller's `lomo_config` of either accepted size: the current one, or
    /// [`LOMO_CONFIG_SIZE_V1`] (then the fields appended since keep their defaults). Any other
    /// `struct_size` is returned as it is, for [`lomo_config::to_core`] to refuse.
    ///
    /// # Safety
    /// `cfg` must point to readable memory of at least `min(cfg.struct_size, sizeof)` bytes
    /// (its first field is read first).
    pub unsafe fn read_versioned(cfg: *const lomo_config) -> lomo_config {
        // SAFETY: `struct_size` is the first field, present in every version.
        let size = unsafe { std::ptr::addr_of!((*cfg).struct_size).read_unaligned() };
        if size == LOMO_CONFIG_SIZE_V1 {
            let mut out = lomo_config::from_core(&Config::defaults(Algorithm::Lomo));
            // SAFETY: the caller's struct holds LOMO_CONFIG_SIZE_V1 readable bytes, which are a
            // prefix of `out`'s layout (same repr(C) fields in the same order).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    cfg as *const u8,
                    &mut out as *mut lomo_config as *mut u8,
                    LOMO_CONFIG_SIZE_V1,
                )
            };
            out.nonfinite_policy = LOMO_NONFINITE_PER_TENSOR;
            out.struct_size = std::mem::size_of::<lomo_config>();
            out
        } else {
            // SAFETY: a caller passing the current size (or a wrong one, refused later) has a
            // full struct per the documented contract.
            unsafe { *cfg }
        }
    }

    /// Converts and validates.
    pub fn to_core(&self) -> Result<Config> {
        check_struct_size(
            "lomo_config",
            self.struct_size,
            std::mem::size_of::<lomo_config>(),
        )?;
        let c = Config {
            algorithm: Algorithm::try_from(self.algorithm)?,
            weight_decay: self.weight_decay,
            clip_grad_norm: self.clip_grad_norm,
            clip_grad_value: self.clip_grad_value,
            loss_scale_mode: LossScaleMode::try_from(self.loss_scale_mode)?,
            loss_scale: self.loss_scale,
            scale_factor: self.scale_factor,
            scale_window: self.scale_window,
            min_loss_scale: self.min_loss_scale,
            hysteresis: self.hysteresis,
            eps1: self.eps1,
            eps2: self.eps2,
            clip_threshold: self.clip_threshold,
            decay_rate: self.decay_rate,
            rounding: Rounding::try_from(self.rounding)?,
            seed: self.seed,
            nonfinite: NonFinitePolicy::try_from(self.nonfinite_policy)?,
        };
        c.validate()?;
        Ok(c)
    }
}

/// Describes one parameter buffer for `lomo_param_register`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct lomo_param_desc {
    /// `sizeof(lomo_param_desc)`.
    pub struct_size: usize,
    /// Unique, non-empty, NUL-terminated name (copied). Checkpoints store state under it.
    pub name: *const std::ffi::c_char,
    /// The parameter's elements, contiguous, row-major (or in the dense layout declared
    /// afterwards with `lomo_param_set_strides`), aligned to the element size; host memory
    /// for `LOMO_DEVICE_CPU`, device memory otherwise. Borrowed: it must stay valid, and must not
    /// move, until the optimizer is freed. May be NULL only when the shape has no elements.
    pub data: *mut std::ffi::c_void,
    /// `LOMO_DTYPE_F32`, `LOMO_DTYPE_F16` or `LOMO_DTYPE_BF16`.
    pub dtype: u32,
    /// Rank; 0 for a scalar. AdaLomo keeps factored state for rank ≥ 2, viewing the tensor as
    /// `[prod(shape[:-1]), shape[-1]]`, and per-element state for rank ≤ 1.
    pub ndim: u32,
    /// `ndim` dimensions (copied); may be NULL when `ndim` is 0.
    pub shape: *const i64,
    /// `LOMO_DEVICE_CPU` (−1) or a CUDA device ordinal.
    pub device: i32,
    /// Group id (0 always exists; others are created with `lomo_group_set`).
    pub group: u32,
    /// 0, or `LOMO_PARAM_CARRY_RMS`.
    pub flags: u32,
}

/// Diagnostics of the last phase and step (`lomo_step_info_get`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct lomo_step_info {
    /// Set to `sizeof(lomo_step_info)` before the call.
    pub struct_size: usize,
    /// Applied update steps so far (AdaLomo's t of the last update).
    pub step: u64,
    /// Global 2-norm of the unscaled gradients from the last NORM phase; NaN without one or on
    /// overflow.
    pub grad_norm: f32,
    /// Clip coefficient the last UPDATE phase used (1 without norm clipping, 0 when skipped).
    pub clip_coef: f32,
    /// Loss scale of the last step.
    pub loss_scale: f32,
    /// Loss scale for the next step.
    pub next_loss_scale: f32,
    /// 1 if a non-finite gradient was seen in the last step, or an update that would have made
    /// a non-finite value (see `lomo_grad_submit`).
    pub overflow: u32,
    /// 1 if the last step was skipped entirely (overflow found in its NORM phase).
    pub skipped: u32,
    /// Steps skipped so far (restored by `lomo_state_load`).
    pub skipped_total: u64,
    /// Gradients submitted in the last phase.
    pub grads_submitted: u32,
    /// Of those, gradients with a non-finite element (not applied), or whose update overflowed:
    /// f32 statistics or scalars (not applied) or the parameter's dtype (the overflowing
    /// elements kept their old values).
    pub grads_nonfinite: u32,
}

impl lomo_step_info {
    pub fn from_core(i: &StepInfo) -> lomo_step_info {
        lomo_step_info {
            struct_size: std::mem::size_of::<lomo_step_info>(),
            step: i.step,
            grad_norm: i.grad_norm,
            clip_coef: i.clip_coef,
            loss_scale: i.loss_scale,
            next_loss_scale: i.next_loss_scale,
            overflow: i.overflow as u32,
            skipped: i.skipped as u32,
            skipped_total: i.skipped_total,
            grads_submitted: i.grads_submitted,
            grads_nonfinite: i.grads_nonfinite,
        }
    }
}

/// Reads `n` dimensions from a C array.
///
/// # Safety
/// A non-NULL `shape` must point to `n` readable `int64_t`.
pub unsafe fn shape_from_raw<'a>(shape: *const i64, n: u32) -> Result<&'a [i64]> {
    if n == 0 {
        return Ok(&[]);
    }
    if shape.is_null() {
        bail!(NullArgument, "shape is NULL but ndim is {n}");
    }
    // SAFETY: `shape` points to `n` int64 values (the caller's contract).
    Ok(unsafe { std::slice::from_raw_parts(shape, n as usize) })
}

/// Number of per-device entries in `lomo_memory_stats.devices`.
pub const LOMO_MEMORY_MAX_DEVICES: usize = 16;

/// Memory of the parameters registered on one device (`lomo_memory_stats.devices`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct lomo_device_memory {
    /// `LOMO_DEVICE_CPU` (−1) or a CUDA ordinal.
    pub device: i32,
    /// Parameters registered on this device.
    pub param_count: u32,
    /// Their elements.
    pub param_elements: u64,
    /// Their buffers (the caller's memory; not owned by the optimizer).
    pub param_bytes: u64,
    /// Optimizer state owned by the library on this device (AdaLomo's f32 second-moment
    /// estimates: rows + cols per factored tensor, numel per vector; 0 for LOMO).
    pub state_bytes: u64,
    /// Scratch memory owned by the library on this device, allocated at registration (and the
    /// gradient accumulation buffers of `lomo_accum_enable`).
    pub workspace_bytes: u64,
    /// What AdamW with f32 master weights would need for the same parameters, besides the
    /// parameters themselves: m and v in f32 (8 B per element), an f32 master copy of f16/bf16
    /// parameters (4 B; none for f32), and a gradient buffer in the parameter's dtype for every
    /// parameter (AdamW steps after backward, with all gradients alive). 14 B per bf16 element,
    /// 12 B per f32 element.
    pub adamw_bytes: u64,
}

/// Memory accounting of an optimizer (`lomo_memory_stats_get`). Totals cover every device;
/// `devices` lists the first `LOMO_MEMORY_MAX_DEVICES` devices that hold parameters, the CPU
/// first, then CUDA ordinals in increasing order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct lomo_memory_stats {
    /// Set to `sizeof(lomo_memory_stats)` before the call.
    pub struct_size: usize,
    /// Registered parameters, all devices.
    pub param_count: u64,
    pub param_elements: u64,
    /// Parameter buffers (the caller's), all devices.
    pub param_bytes: u64,
    /// Optimizer state owned by the library, all devices.
    pub state_bytes: u64,
    /// Scratch memory owned by the library, all devices (accumulation buffers included).
    pub workspace_bytes: u64,
    /// AdamW's need for the same parameters, all devices (see `lomo_device_memory.adamw_bytes`).
    pub adamw_bytes: u64,
    /// Devices holding parameters (may exceed `LOMO_MEMORY_MAX_DEVICES`; then only the first
    /// `LOMO_MEMORY_MAX_DEVICES` are listed).
    pub device_count: u32,
    /// Per-device entries; the first `min(device_count, LOMO_MEMORY_MAX_DEVICES)` are valid.
    pub devices: [lomo_device_memory; LOMO_MEMORY_MAX_DEVICES],
}

impl lomo_memory_stats {
    pub fn from_core(m: &MemoryStats) -> lomo_memory_stats {
        let mut out = lomo_memory_stats {
            struct_size: std::mem::size_of::<lomo_memory_stats>(),
            param_count: m.total.params,
            param_elements: m.total.elements,
            param_bytes: m.total.param_bytes,
            state_bytes: m.total.state_bytes,
            workspace_bytes: m.total.workspace_bytes,
            adamw_bytes: m.total.adamw_bytes,
            device_count: m.devices.len() as u32,
            ..Default::default()
        };
        for (slot, (dev, d)) in out.devices.iter_mut().zip(&m.devices) {
            *slot = lomo_device_memory {
                device: dev.raw(),
                param_count: d.params as u32,
                param_elements: d.elements,
                param_bytes: d.param_bytes,
                state_bytes: d.state_bytes,
                workspace_bytes: d.workspace_bytes,
                adamw_bytes: d.adamw_bytes,
            };
        }
        out
    }
}
