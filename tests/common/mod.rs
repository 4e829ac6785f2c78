//! Shared test helpers: a safe wrapper over the C API (called directly through the rlib), data
//! generators, and element comparison.
#![allow(dead_code)]

pub mod comm;
pub mod dist;
pub mod dist_accum;
pub mod parity;
pub mod reference;

use std::ffi::{c_void, CString};

use lomo::ffi::optimizer::*;
use lomo::ffi::types::*;

pub const F32: u32 = 0;
pub const F16: u32 = 1;
pub const BF16: u32 = 2;

/// Status and last-error message of a failed call.
#[derive(Debug, PartialEq)]
pub struct Failure {
    pub status: u32,
    pub message: String,
}

pub fn last_error() -> String {
    // SAFETY: NULL/0 asks for the length only; then a buffer of that length + 1 is provided.
    unsafe {
        let n = lomo::ffi::api::lomo_last_error_message(std::ptr::null_mut(), 0);
        let mut buf = vec![0u8; n + 1];
        lomo::ffi::api::lomo_last_error_message(buf.as_mut_ptr().cast(), buf.len());
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

pub fn check(status: lomo::Status) -> Result<(), Failure> {
    if status == lomo::Status::Ok {
        Ok(())
    } else {
        Err(Failure {
            status: status as u32,
            message: last_error(),
        })
    }
}

pub fn config(algorithm: u32) -> lomo_config {
    let mut cfg = std::mem::MaybeUninit::<lomo_config>::zeroed();
    // SAFETY: cfg is writable storage for a lomo_config.
    unsafe {
        check(lomo_config_init(cfg.as_mut_ptr(), algorithm)).unwrap();
        cfg.assume_init()
    }
}

/// An optimizer handle that frees itself.
pub struct Opt(pub *mut lomo_optimizer);

// SAFETY: lomo_optimizer is internally synchronized (documented thread-safety of the C API).
unsafe impl Send for Opt {}
unsafe impl Sync for Opt {}

impl Opt {
    pub fn new(cfg: &lomo_config) -> Result<Opt, Failure> {
        let mut p = std::ptr::null_mut();
        // SAFETY: valid pointers.
        check(unsafe { lomo_optimizer_new(cfg, &mut p) })?;
        Ok(Opt(p))
    }

    /// Registers `data` (a host buffer of `dtype` elements) with `shape`.
    pub fn register(
        &self,
        name: &str,
        data: *mut c_void,
        dtype: u32,
        shape: &[i64],
        group: u32,
    ) -> Result<u32, Failure> {
        self.register_flags(name, data, dtype, shape, group, 0)
    }

    pub fn register_flags(
        &self,
        name: &str,
        data: *mut c_void,
        dtype: u32,
        shape: &[i64],
        group: u32,
        flags: u32,
    ) -> Result<u32, Failure> {
        self.register_on(name, data, dtype, shape, LOMO_DEVICE_CPU, group, flags)
    }

    /// Registers a buffer on `device` (`LOMO_DEVICE_CPU` or a CUDA ordinal).
    #[allow(clippy::too_many_arguments)]
    pub fn register_on(
        &self,
        name: &str,
        data: *mut c_void,
        dtype: u32,
        shape: &[i64],
        device: i32,
        group: u32,
        flags: u32,
    ) -> Result<u32, Failure> {
        let cname = CString::new(name).unwrap();
        let desc = lomo_param_desc {
            struct_size: std::mem::size_of::<lomo_param_desc>(),
            name: cname.as_ptr(),
            data,
            dtype,
            ndim: shape.len() as u32,
            shape: shape.as_ptr(),
            device,
            group,
            flags,
        };
        let mut id = u32::MAX;
        // SAFETY: valid pointers for the duration of the call.
        check(unsafe { lomo_param_register(self.0, &desc, &mut id) })?;
        Ok(id)
    }

    pub fn group_set(&self, group: u32, lr_mult: f64, wd: f64) -> Result<(), Failure> {
        // SAFETY: live handle.
        check(unsafe { lomo_group_set(self.0, group, lr_mult, wd) })
    }

    pub fn begin(&self, phase: u32, lr: f32) -> Result<(), Failure> {
        // SAFETY: live handle.
        check(unsafe { lomo_step_begin(self.0, phase, lr, std::ptr::null_mut()) })
    }

    pub fn submit(&self, id: u32, grad: *const c_void, dtype: u32) -> Result<(), Failure> {
        // SAFETY: live handle; grad buffers are the caller's responsibility.
        check(unsafe { lomo_grad_submit(self.0, id, grad, dtype, std::ptr::null_mut()) })
    }

    pub fn end(&self) -> Result<(), Failure> {
        // SAFETY: live handle.
        check(unsafe { lomo_step_end(self.0, std::ptr::null_mut()) })
    }

    pub fn info(&self) -> lomo_step_info {
        let mut info = lomo_step_info {
            struct_size: std::mem::size_of::<lomo_step_info>(),
            ..Default::default()
        };
        // SAFETY: live handle, valid out pointer.
        check(unsafe { lomo_step_info_get(self.0, &mut info) }).unwrap();
        info
    }

    pub fn loss_scale(&self) -> f32 {
        let mut s = 0.0;
        // SAFETY: live handle, valid out pointer.
        check(unsafe { lomo_loss_scale(self.0, &mut s) }).unwrap();
        s
    }
}

impl Drop for Opt {
    fn drop(&mut self) {
        // SAFETY: the handle came from lomo_optimizer_new and is freed once.
        unsafe { lomo_optimizer_free(self.0) }
    }
}

pub fn bf16(v: f32) -> u16 {
    half::bf16::from_f32(v).to_bits()
}
pub fn from_bf16(b: u16) -> f32 {
    half::bf16::from_bits(b).to_f32()
}
pub fn f16(v: f32) -> u16 {
    half::f16::from_f32(v).to_bits()
}
pub fn from_f16(b: u16) -> f32 {
    half::f16::from_bits(b).to_f32()
}

/// Deterministic pseudo-random numbers (xorshift64*), uniform in [-1, 1).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn normal(&mut self) -> f32 {
        let u1 = ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        let u2 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.normal() * scale).collect()
    }
}

/// A host buffer of one dtype holding values given in f32.
pub struct Buf {
    pub dtype: u32,
    pub f32s: Vec<f32>,
    pub halves: Vec<u16>,
}

impl Buf {
    pub fn new(dtype: u32, vals: &[f32]) -> Buf {
        match dtype {
            F32 => Buf {
                dtype,
                f32s: vals.to_vec(),
                halves: vec![],
            },
            F16 => Buf {
                dtype,
                f32s: vec![],
                halves: vals.iter().map(|&v| f16(v)).collect(),
            },
            _ => Buf {
                dtype,
                f32s: vec![],
                halves: vals.iter().map(|&v| bf16(v)).collect(),
            },
        }
    }
    pub fn ptr(&mut self) -> *mut c_void {
        if self.dtype == F32 {
            self.f32s.as_mut_ptr().cast()
        } else {
            self.halves.as_mut_ptr().cast()
        }
    }
    pub fn values(&self) -> Vec<f32> {
        match self.dtype {
            F32 => self.f32s.clone(),
            F16 => self.halves.iter().map(|&b| from_f16(b)).collect(),
            _ => self.halves.iter().map(|&b| from_bf16(b)).collect(),
        }
    }
    pub fn len(&self) -> usize {
        if self.dtype == F32 {
            self.f32s.len()
        } else {
            self.halves.len()
        }
    }
    /// Rounds a value to this buffer's dtype.
    pub fn round(dtype: u32, v: f32) -> f32 {
        match dtype {
            F32 => v,
            F16 => from_f16(f16(v)),
            _ => from_bf16(bf16(v)),
        }
    }
}

/// Distance in units in the last place of `dtype` between two values.
pub fn ulps(dtype: u32, a: f32, b: f32) -> f64 {
    let ulp = |v: f32| -> f64 {
        let v = v.abs().max(match dtype {
            F32 => f32::MIN_POSITIVE,
            F16 => 6.103_515_6e-5,
            _ => f32::MIN_POSITIVE,
        });
        let bits = match dtype {
            F32 => 23,
            F16 => 10,
            _ => 7,
        };
        2f64.powi(v.log2().floor() as i32 - bits)
    };
    (a as f64 - b as f64).abs() / ulp(a).min(ulp(b))
}
