//! lomo: LOMO and AdaLomo optimizer steps fused into the backward pass, behind a C ABI.
//!
//! Layers, each depending only on the ones below it (design.md §2):
//! - [`ffi`]: the C ABI (`include/lomo.h`), thin shims around the core;
//! - [`xla`]: XLA FFI custom-call handlers for JAX (same level as `ffi`, not in the header);
//! - the core: [`optimizer`], [`orchestrate`] (the one orchestration of a step, shared by the
//!   optimizer and the XLA handlers), [`dist`] (several ranks as one optimizer), [`param`],
//!   [`config`], [`scaler`], [`state`] (checkpoints), [`memory`] (accounting), [`error`],
//!   [`dtype`], [`alloc`] (fallible allocation, used by every layer);
//! - [`backend`]: the backend interface ([`backend::Backend`]) and its implementations, the
//!   passes themselves (CPU threads and SIMD; CUDA kernels on the caller's stream). It imports
//!   nothing from the layers above; [`alloc`], [`config`], [`dtype`] and [`error`] are leaves
//!   that every layer may use.

pub mod alloc;
pub mod backend;
pub mod config;
pub mod dist;
pub mod dtype;
pub mod error;
pub mod ffi;
pub mod memory;
pub mod optimizer;
pub mod orchestrate;
pub mod param;
pub mod scaler;
pub mod state;
pub mod strided;
pub mod xla;

pub use config::{Algorithm, Config, LossScaleMode, NonFinitePolicy, Rounding};
pub use dtype::DType;
pub use error::{Error, Result, Status};
pub use optimizer::{Optimizer, Phase, StepInfo};
pub use param::{Device, ParamDesc};
