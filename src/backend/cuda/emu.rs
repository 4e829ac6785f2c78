//! CUDA backend: the emulated launcher. The kernels in `kernels/` are compiled for the host by
//! `build.rs` (through `kernels/emu/cuda_emu.hpp`); launches run their blocks on CPU threads, and
//! "device memory" is host memory. Selected with `LOMO_CUDA_EMULATE=1` (tests and CI without a
//! GPU): the whole CUDA orchestration — workspaces, phases, device scalars, geometry — runs as on
//! a GPU.

use std::alloc::Layout;
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CString};

use parking_lot::Mutex;

use super::abi::DevPtr;
use super::launcher::{Geometry, Launcher};
use super::registry::Kernel;
use crate::error::{bail, Result};

extern "C" {
    fn lomo_emu_launch(
        name: *const c_char,
        grid: u32,
        block: u32,
        smem: usize,
        args: *mut *mut c_void,
    ) -> i32;
    fn lomo_emu_arg_size(name: *const c_char) -> usize;
    fn lomo_emu_sizeof_step() -> usize;
    fn lomo_emu_sizeof_tensor() -> usize;
}

pub fn arg_size(name: &str) -> usize {
    let c = CString::new(name).expect("kernel names have no NUL");
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    unsafe { lomo_emu_arg_size(c.as_ptr()) }
}

pub fn sizeof_step() -> usize {
    // SAFETY: a pure function of the C++ side.
    unsafe { lomo_emu_sizeof_step() }
}

pub fn sizeof_tensor() -> usize {
    // SAFETY: a pure function of the C++ side.
    unsafe { lomo_emu_sizeof_tensor() }
}

/// Emulated device: `sm_count` multiprocessors (sizes grids as on a GPU of that size).
#[derive(Debug)]
pub struct EmuLauncher {
    sm_count: u32,
    allocs: Mutex<HashMap<DevPtr, Layout>>,
    names: Mutex<HashMap<String, CString>>,
}

impl EmuLauncher {
    pub fn new(sm_count: u32) -> EmuLauncher {
        EmuLauncher {
            sm_count,
            allocs: Mutex::new(HashMap::new()),
            names: Mutex::new(HashMap::new()),
        }
    }
}

impl Drop for EmuLauncher {
    fn drop(&mut self) {
        for (p, layout) in self.allocs.lock().drain() {
            // SAFETY: allocated by `alloc` with this layout and not freed yet.
            unsafe { std::alloc::dealloc(p as *mut u8, layout) };
        }
    }
}

impl Launcher for EmuLauncher {
    /// Memory comes back filled with 0xFF bytes (NaN as f32/f64): nothing may rely on
    /// allocations being zero, so tests see any read of a workspace before its write.
    fn alloc(&self, bytes: usize) -> Result<DevPtr> {
        crate::alloc::check_injected(bytes, "emulated device memory")?;
        let layout = match Layout::from_size_align(bytes.max(16), 16) {
            Ok(l) => l,
            Err(_) => bail!(
                OutOfMemory,
                "out of memory: allocating {bytes} bytes of emulated device memory failed (too large)"
            ),
        };
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc(layout) };
        if p.is_null() {
            bail!(
                OutOfMemory,
                "out of memory: allocating {bytes} bytes of emulated device memory failed"
            );
        }
        // SAFETY: `p` points to layout.size() writable bytes.
        unsafe { std::ptr::write_bytes(p, 0xff, layout.size()) };
        self.allocs.lock().insert(p as DevPtr, layout);
        Ok(p as DevPtr)
    }

    fn free(&self, ptr: DevPtr) {
        if let Some(layout) = self.allocs.lock().remove(&ptr) {
            // SAFETY: allocated by `alloc` with this layout.
            unsafe { std::alloc::dealloc(ptr as *mut u8, layout) };
        }
    }

    fn copy_to_host(&self, dst: &mut [u8], src: DevPtr, _stream: usize) -> Result<()> {
        // SAFETY: `src` is emulated device memory (host memory) holding at least dst.len() bytes.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn copy_from_host(&self, dst: DevPtr, src: &[u8]) -> Result<()> {
        // SAFETY: `dst` is emulated device memory (host memory) with room for src.len() bytes.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    fn check_buffer(&self, _ptr: DevPtr, _bytes: u64, _what: &str) -> Result<()> {
        // Emulated device memory is host memory: the driver's checks have nothing to look up.
        Ok(())
    }

    fn copy_device(&self, dst: DevPtr, src: DevPtr, bytes: usize, _stream: usize) -> Result<()> {
        // SAFETY: both are emulated device memory (host memory) holding `bytes` bytes (`copy`
        // even tolerates overlap). Launches are synchronous here, so stream order holds.
        unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
        Ok(())
    }

    fn launch(
        &self,
        kernel: &Kernel,
        geo: Geometry,
        args: &mut [*mut c_void],
        _stream: usize,
    ) -> Result<()> {
        let name = {
            let mut names = self.names.lock();
            names
                .entry(kernel.name.clone())
                .or_insert_with(|| CString::new(kernel.name.as_str()).expect("no NUL"))
                .clone()
        };
        // SAFETY: `args` follows the kernel's parameter list (one pointer to its argument struct,
        // checked by size in abi.rs tests); every pointer inside is emulated device memory.
        let rc = unsafe {
            lomo_emu_launch(
                name.as_ptr(),
                geo.grid,
                geo.block,
                geo.smem as usize,
                args.as_mut_ptr(),
            )
        };
        match rc {
            0 => Ok(()),
            1 => bail!(
                CudaError,
                "emulated launch: unknown kernel '{}'",
                kernel.name
            ),
            _ => bail!(
                CudaError,
                "emulated launch of '{}': bad block size {}",
                kernel.name,
                geo.block
            ),
        }
    }

    fn sm_count(&self) -> u32 {
        self.sm_count
    }

    fn max_smem(&self) -> u32 {
        48 * 1024
    }
}
