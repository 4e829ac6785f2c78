//! Backend layer: where the per-tensor passes run. The core decides *what* to compute and in
//! which order (`crate::orchestrate`: phases, scalars, which tensors, where statistics are
//! reduced); a backend decides *how* (threads and SIMD on the CPU, kernels on CUDA), behind one
//! interface, [`Backend`] ([`interface`] documents each method, its units and who owns what),
//! implemented by [`cpu::step::CpuStep`] and [`cuda::step::CudaStep`].
//!
//! Backends know nothing about the C ABI, the optimizer or the XLA handlers. They receive raw
//! buffers ([`RawBuf`]) whose validity the caller has established, and plain scalar structs
//! ([`GradXform`], [`TensorUpdate`], ...).

pub mod cpu;
/// Nothing in the CUDA backend is part of the C API:
/// cbindgen:ignore
pub mod cuda;
pub mod interface;
pub mod scalars;

pub use interface::{AccumOp, Backend, PhaseBegin, Record, TensorUpdate};

use crate::dtype::DType;

/// A caller-owned buffer: address, element type and element count. The optimizer never frees it.
#[derive(Clone, Copy, Debug)]
pub struct RawBuf {
    pub addr: usize,
    pub dtype: DType,
    pub numel: usize,
}

impl RawBuf {
    pub fn bytes(&self) -> usize {
        self.numel * self.dtype.size()
    }
}

/// How a raw gradient element `g` becomes the value the update uses:
/// `x = clamp(g · inv_scale, −clip_value, clip_value) · coef` (`reference/semantics.md` §2.4 b–f).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradXform {
    /// 1 / loss scale.
    pub inv_scale: f32,
    /// Value-clipping bound; +∞ when value clipping is off.
    pub clip_value: f32,
    /// Global-norm clip coefficient; 1 when norm clipping is off.
    pub coef: f32,
}

impl GradXform {
    /// Whether `apply` is the identity (no scaling, clipping or coefficient).
    pub fn is_identity(&self) -> bool {
        self.inv_scale == 1.0 && self.clip_value == f32::INFINITY && self.coef == 1.0
    }

    /// For finite `g` (callers check first); compiles to plain vector min/max.
    #[inline(always)]
    pub fn apply(&self, g: f32) -> f32 {
        let v = g * self.inv_scale;
        let v = if v < -self.clip_value {
            -self.clip_value
        } else {
            v
        };
        let v = if v > self.clip_value {
            self.clip_value
        } else {
            v
        };
        v * self.coef
    }
}

/// Result of a pass that reads a gradient: whether every element was finite.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradCheck {
    pub finite: bool,
}
