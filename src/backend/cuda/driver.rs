//! CUDA backend: the real launcher — cudarc's driver API, loaded dynamically.
//!
//! Every call runs in the **primary context** of the parameter's device (the one PyTorch and
//! XLA use), pushed for the call and popped afterwards, so the caller's current context is left
//! as it was. Modules are compiled by NVRTC for the device's exact `sm_XY` at first use (or read
//! from the on-disk cache, see `nvrtc::cubin_cached`) and loaded once per device. Launches go
//! to the caller's stream with raw device addresses; nothing on the step path synchronizes.

use std::collections::HashMap;
use std::ffi::{c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use cudarc::driver::sys;
use parking_lot::Mutex;

use super::abi::DevPtr;
use super::launcher::{Geometry, Launcher};
use super::nvrtc;
use super::pointer;
use super::registry::{Kernel, Module};
use crate::error::{bail, Error, Result, Status};

/// Whether libcuda loads and cuInit succeeds (probed once, never panics).
fn driver_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        catch_unwind(|| {
            // SAFETY: probing the library, then cuInit(0), which is always valid to call.
            unsafe { sys::is_culib_present() && sys::cuInit(0) == sys::CUresult::CUDA_SUCCESS }
        })
        .unwrap_or(false)
    })
}

/// Number of CUDA devices (0 without a driver).
pub fn device_count() -> i32 {
    if !driver_ready() {
        return 0;
    }
    let mut n = 0;
    // SAFETY: the driver is initialized; `n` is a valid out pointer.
    let ok = catch_unwind(AssertUnwindSafe(|| unsafe {
        sys::cuDeviceGetCount(&mut n)
    }))
    .ok();
    if ok == Some(sys::CUresult::CUDA_SUCCESS) {
        n
    } else {
        0
    }
}

/// The ordinal of the CUDA device that owns device memory at `ptr` (the XLA handlers' way to
/// find their device; no context needs to be current).
pub fn pointer_device(ptr: DevPtr) -> Result<i32> {
    if !driver_ready() {
        bail!(
            NoCuda,
            "no CUDA driver (libcuda.so) could be loaded and initialized"
        );
    }
    let mut ordinal: i32 = -1;
    // SAFETY: the driver is initialized; `ordinal` is a valid out pointer for this attribute (an
    // int).
    let r = unsafe {
        sys::cuPointerGetAttribute(
            (&mut ordinal as *mut i32).cast(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            ptr,
        )
    };
    check(
        r,
        format_args!("cuPointerGetAttribute(DEVICE_ORDINAL) of buffer {ptr:#x}"),
    )?;
    Ok(ordinal)
}

/// `Ok` for CUDA_SUCCESS, else a `CudaError` naming `what`. `what` is formatted only on failure,
/// so callers on the step path pass `format_args!` and allocate nothing when the call succeeds.
pub(super) fn check(r: sys::CUresult, what: impl std::fmt::Display) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut s: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: cuGetErrorString writes a static string pointer.
    unsafe { sys::cuGetErrorString(r, &mut s) };
    let text = if s.is_null() {
        String::new()
    } else {
        // SAFETY: a non-NULL result is a static NUL-terminated string.
        unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
    };
    Err(Error::new(
        Status::CudaError,
        format!("{what} failed: {r:?} ({text})"),
    ))
}

/// Compiled modules per (device, module), and functions per (device, kernel name).
static MODULES: OnceLock<Mutex<HashMap<(i32, Module), usize>>> = OnceLock::new();
static FUNCTIONS: OnceLock<Mutex<HashMap<(i32, String), usize>>> = OnceLock::new();

#[derive(Debug)]
pub struct DriverLauncher {
    ordinal: i32,
    dev: sys::CUdevice,
    ctx: usize,
    arch: String,
    sm_count: u32,
    max_smem: u32,
}

// SAFETY: the context handle is only used through the driver API, which is thread-safe.
unsafe impl Send for DriverLauncher {}
// SAFETY: as above.
unsafe impl Sync for DriverLauncher {}

/// Pushes the primary context for the guard's lifetime.
struct Pushed;

impl Drop for Pushed {
    fn drop(&mut self) {
        let mut old: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: pops the context pushed by `DriverLauncher::push`.
        unsafe { sys::cuCtxPopCurrent_v2(&mut old) };
    }
}

impl DriverLauncher {
    pub fn new(ordinal: i32) -> Result<DriverLauncher> {
        if !driver_ready() {
            bail!(NoCuda, "CUDA device {ordinal} requested, but no CUDA driver (libcuda.so) could be loaded and initialized");
        }
        let n = device_count();
        if ordinal >= n {
            bail!(
                NoCuda,
                "CUDA device {ordinal} does not exist ({n} devices found)"
            );
        }
        if !nvrtc::available() {
            bail!(NoCuda, "NVRTC (libnvrtc.so) was not found: install the CUDA toolkit or the nvidia-cuda-nvrtc-cu12 wheel (LOMO_NVRTC_PATH names the file)");
        }
        let mut dev: sys::CUdevice = 0;
        let mut ctx: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: the driver is initialized; out pointers are valid.
        unsafe {
            check(sys::cuDeviceGet(&mut dev, ordinal), "cuDeviceGet")?;
            check(
                sys::cuDevicePrimaryCtxRetain(&mut ctx, dev),
                "cuDevicePrimaryCtxRetain",
            )?;
        }
        let attr = |a: sys::CUdevice_attribute| -> Result<i32> {
            let mut v = 0;
            // SAFETY: valid device and out pointer.
            check(
                unsafe { sys::cuDeviceGetAttribute(&mut v, a, dev) },
                "cuDeviceGetAttribute",
            )?;
            Ok(v)
        };
        let major = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        let sm_count =
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let max_smem =
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?
                as u32;
        Ok(DriverLauncher {
            ordinal,
            dev,
            ctx: ctx as usize,
            arch: format!("sm_{major}{minor}"),
            sm_count,
            max_smem,
        })
    }

    fn push(&self) -> Result<Pushed> {
        // SAFETY: the primary context is retained for this launcher's lifetime.
        check(
            unsafe { sys::cuCtxPushCurrent_v2(self.ctx as sys::CUcontext) },
            "cuCtxPushCurrent",
        )?;
        Ok(Pushed)
    }

    /// The kernel's function handle (compiling and loading its module at first use).
    fn function(&self, kernel: &Kernel) -> Result<sys::CUfunction> {
        let functions = FUNCTIONS.get_or_init(|| Mutex::new(HashMap::new()));
        let key = (self.ordinal, kernel.name.clone());
        if let Some(&f) = functions.lock().get(&key) {
            return Ok(f as sys::CUfunction);
        }
        let modules = MODULES.get_or_init(|| Mutex::new(HashMap::new()));
        let mut mods = modules.lock();
        let module = match mods.get(&(self.ordinal, kernel.module)) {
            Some(&m) => m as sys::CUmodule,
            None => {
                let cubin = nvrtc::cubin_cached(kernel.module, &self.arch)?;
                let mut m: sys::CUmodule = std::ptr::null_mut();
                // SAFETY: `cubin` is a complete ELF image for this device's architecture.
                check(
                    unsafe { sys::cuModuleLoadData(&mut m, cubin.as_ptr().cast()) },
                    "cuModuleLoadData",
                )?;
                mods.insert((self.ordinal, kernel.module), m as usize);
                m
            }
        };
        let name = CString::new(kernel.name.as_str()).expect("no NUL");
        let mut f: sys::CUfunction = std::ptr::null_mut();
        // SAFETY: `module` is loaded in this context; `name` is NUL-terminated.
        check(
            unsafe { sys::cuModuleGetFunction(&mut f, module, name.as_ptr()) },
            "cuModuleGetFunction",
        )?;
        functions.lock().insert(key, f as usize);
        Ok(f)
    }
}

impl Drop for DriverLauncher {
    fn drop(&mut self) {
        // SAFETY: releases the retain taken in `new`.
        unsafe { sys::cuDevicePrimaryCtxRelease_v2(self.dev) };
    }
}

impl Launcher for DriverLauncher {
    fn alloc(&self, bytes: usize) -> Result<DevPtr> {
        let _c = self.push()?;
        let mut p: sys::CUdeviceptr = 0;
        // SAFETY: valid out pointer; the context is current.
        let r = unsafe { sys::cuMemAlloc_v2(&mut p, bytes.max(16)) };
        if r == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            return Err(crate::alloc::out_of_memory(
                bytes as u128,
                &format!(
                    "memory on CUDA device {} (CUDA_ERROR_OUT_OF_MEMORY)",
                    self.ordinal
                ),
            ));
        }
        check(r, "cuMemAlloc")?;
        Ok(p)
    }

    fn free(&self, ptr: DevPtr) {
        if let Ok(_c) = self.push() {
            // SAFETY: `ptr` came from `alloc` in this context.
            unsafe { sys::cuMemFree_v2(ptr) };
        }
    }

    fn copy_to_host(&self, dst: &mut [u8], src: DevPtr, stream: usize) -> Result<()> {
        let _c = self.push()?;
        // SAFETY: `stream` is the caller's stream (or 0); `dst` has room for dst.len() bytes.
        unsafe {
            check(
                sys::cuStreamSynchronize(stream as sys::CUstream),
                "cuStreamSynchronize",
            )?;
            check(
                sys::cuMemcpyDtoH_v2(dst.as_mut_ptr().cast(), src, dst.len()),
                "cuMemcpyDtoH",
            )
        }
    }

    fn copy_from_host(&self, dst: DevPtr, src: &[u8]) -> Result<()> {
        let _c = self.push()?;
        // SAFETY: `dst` is device memory from `alloc` with room for src.len() bytes.
        check(
            unsafe { sys::cuMemcpyHtoD_v2(dst, src.as_ptr().cast(), src.len()) },
            "cuMemcpyHtoD",
        )?;
        // A copy from pageable memory may return before its DMA lands; kernels on the caller's
        // (possibly non-blocking) stream must see the data, so wait for the context.
        // SAFETY: the context is current.
        check(unsafe { sys::cuCtxSynchronize() }, "cuCtxSynchronize")
    }

    fn check_buffer(&self, ptr: DevPtr, bytes: u64, what: &str) -> Result<()> {
        let expect = pointer::Expected {
            ordinal: self.ordinal,
            context: self.ctx,
        };
        pointer::check_buffer(&expect, ptr, bytes, what, pointer::query)
    }

    fn copy_device(&self, dst: DevPtr, src: DevPtr, bytes: usize, stream: usize) -> Result<()> {
        let _c = self.push()?;
        // SAFETY: both are device memory of this context holding `bytes` bytes (the caller's
        // buffers or ours); the copy is ordered on the caller's stream.
        check(
            unsafe { sys::cuMemcpyDtoDAsync_v2(dst, src, bytes, stream as sys::CUstream) },
            "cuMemcpyDtoDAsync",
        )
    }

    fn launch(
        &self,
        kernel: &Kernel,
        geo: Geometry,
        args: &mut [*mut c_void],
        stream: usize,
    ) -> Result<()> {
        let _c = self.push()?;
        let f = self.function(kernel)?;
        if geo.smem > 48 * 1024 {
            // SAFETY: valid function handle; the size was checked against the device's opt-in limit.
            check(
                unsafe {
                    sys::cuFuncSetAttribute(
                        f,
                        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        geo.smem as i32,
                    )
                },
                "cuFuncSetAttribute",
            )?;
        }
        // SAFETY: `args` holds one pointer per kernel parameter (the argument struct, checked by
        // size against the kernels in abi.rs tests); the stream belongs to this context.
        check(
            unsafe {
                sys::cuLaunchKernel(
                    f,
                    geo.grid,
                    1,
                    1,
                    geo.block,
                    1,
                    1,
                    geo.smem,
                    stream as sys::CUstream,
                    args.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            },
            format_args!("launching {}", kernel.name),
        )
    }

    fn sm_count(&self) -> u32 {
        self.sm_count
    }

    fn max_smem(&self) -> u32 {
        self.max_smem
    }
}
