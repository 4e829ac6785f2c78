//! CUDA backend: what the orchestration needs from a device — memory, copies and launches.
//!
//! Two implementations: [`super::driver::DriverLauncher`] (cudarc, real GPUs) and
//! `super::emu::EmuLauncher` (tests, `cuda-emulation` feature: the same kernel sources compiled
//! for the host, run on CPU threads, host memory standing in for device memory).

use std::ffi::c_void;

use super::abi::DevPtr;
use super::registry::Kernel;
use crate::error::Result;

/// Launch geometry of one kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub grid: u32,
    pub block: u32,
    pub smem: u32,
}

pub trait Launcher: Send + Sync + std::fmt::Debug {
    /// Device memory of `bytes` bytes (16-byte aligned, contents unspecified). Not on the step
    /// path.
    fn alloc(&self, bytes: usize) -> Result<DevPtr>;
    /// Frees memory from `alloc`.
    fn free(&self, ptr: DevPtr);
    /// Synchronous device → host copy (waits for `stream`).
    fn copy_to_host(&self, dst: &mut [u8], src: DevPtr, stream: usize) -> Result<()>;
    /// Synchronous host → device copy: complete, for kernels on any stream, when it returns.
    /// Not on the step path.
    fn copy_from_host(&self, dst: DevPtr, src: &[u8]) -> Result<()>;
    /// Checks that `bytes` bytes at `ptr` are memory this device's kernels may access: both ends
    /// known to the driver, device memory of this device, allocated in the context the launches
    /// use. `what` names the buffer in the message. A host-side query: it never waits for the
    /// device. Under emulation every address is host memory, so every address passes.
    fn check_buffer(&self, ptr: DevPtr, bytes: u64, what: &str) -> Result<()>;
    /// Enqueues a device → device copy of `bytes` bytes on `stream` (does not wait).
    fn copy_device(&self, dst: DevPtr, src: DevPtr, bytes: usize, stream: usize) -> Result<()>;
    /// Enqueues `kernel` on `stream` (0 = default stream). `args` follows cuLaunchKernel: one
    /// pointer per kernel parameter (every lomo kernel has exactly one, its argument struct).
    fn launch(
        &self,
        kernel: &Kernel,
        geo: Geometry,
        args: &mut [*mut c_void],
        stream: usize,
    ) -> Result<()>;
    /// Streaming multiprocessors (sizes grids).
    fn sm_count(&self) -> u32;
    /// The most dynamic shared memory one block may use (bytes).
    fn max_smem(&self) -> u32;
}

/// A launcher that counts the kernels launched through it (an optimizer's launches per step,
/// `lomo_cuda_launch_count`), forwarding everything to `inner`.
#[derive(Debug)]
pub struct Counting {
    inner: std::sync::Arc<dyn Launcher>,
    launches: std::sync::atomic::AtomicU64,
}

impl Counting {
    pub fn new(inner: std::sync::Arc<dyn Launcher>) -> Counting {
        Counting {
            inner,
            launches: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Kernels launched so far.
    pub fn launches(&self) -> u64 {
        self.launches.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Launcher for Counting {
    fn alloc(&self, bytes: usize) -> Result<DevPtr> {
        self.inner.alloc(bytes)
    }
    fn free(&self, ptr: DevPtr) {
        self.inner.free(ptr)
    }
    fn copy_to_host(&self, dst: &mut [u8], src: DevPtr, stream: usize) -> Result<()> {
        self.inner.copy_to_host(dst, src, stream)
    }
    fn copy_from_host(&self, dst: DevPtr, src: &[u8]) -> Result<()> {
        self.inner.copy_from_host(dst, src)
    }
    fn check_buffer(&self, ptr: DevPtr, bytes: u64, what: &str) -> Result<()> {
        self.inner.check_buffer(ptr, bytes, what)
    }
    fn copy_device(&self, dst: DevPtr, src: DevPtr, bytes: usize, stream: usize) -> Result<()> {
        self.inner.copy_device(dst, src, bytes, stream)
    }
    fn launch(
        &self,
        kernel: &Kernel,
        geo: Geometry,
        args: &mut [*mut c_void],
        stream: usize,
    ) -> Result<()> {
        self.inner.launch(kernel, geo, args, stream)?;
        self.launches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
    fn sm_count(&self) -> u32 {
        self.inner.sm_count()
    }
    fn max_smem(&self) -> u32 {
        self.inner.max_smem()
    }
}
