//! CUDA backend: LOMO and AdaLomo on CUDA devices, behind the same core as the CPU backend.
//!
//! - [`abi`] — mirrors of the kernels' structs; [`registry`] — kernel sources and names;
//! - [`launcher`] — the device interface, implemented by `emu` (with the `cuda-emulation`
//!   feature, for tests: host emulation of the same kernel sources) and, with the `cuda`
//!   feature, `driver` (cudarc: dynamic loading, NVRTC);
//! - [`passes`] — one tensor's geometry, workspace sizes and kernel launches;
//! - [`step`] — [`step::CudaStep`], the backend interface (`crate::backend::Backend`) over the
//!   passes and the step kernels, on the caller's stream;
//! - [`device`] — one optimizer's parameters, records and workspaces over a launcher;
//! - [`snapshot`] — the device state read and written between steps (checkpoints, memory);
//! - `pointer` (with `cuda`) — the driver's checks of the caller's buffers.
//!
//! [`abi`]: crate::backend::cuda::abi
//! [`registry`]: crate::backend::cuda::registry
//! [`launcher`]: crate::backend::cuda::launcher
//! [`passes`]: crate::backend::cuda::passes
//! [`device`]: crate::backend::cuda::device
//! [`step`]: crate::backend::cuda::step
//! [`step::CudaStep`]: crate::backend::cuda::step::CudaStep
//! [`snapshot`]: crate::backend::cuda::snapshot

pub mod abi;
pub mod accum;
mod ada_passes;
pub mod device;
#[cfg(feature = "cuda")]
pub mod driver;
#[cfg(feature = "cuda-emulation")]
pub mod emu;
pub mod launcher;
pub mod multi;
#[cfg(feature = "cuda")]
pub mod nvrtc;
#[cfg(feature = "cuda")]
pub mod nvrtc_lib;
pub mod passes;
pub mod piece;
#[cfg(feature = "cuda")]
pub mod pointer;
pub mod registry;
pub mod side;
pub mod snapshot;
pub mod step;
