//! FFI layer: version, status strings, the last-error message and device probes.

use std::ffi::c_char;

use crate::error::Status;
use crate::ffi::guard::{guard_or, with_last_error};
use crate::ffi::types::LOMO_ABI_VERSION;

/// The ABI version of the loaded library. Compare with `LOMO_ABI_VERSION` from the header you
/// compiled against. Thread-safe; never fails.
#[no_mangle]
pub extern "C" fn lomo_abi_version() -> u32 {
    guard_or(0, || LOMO_ABI_VERSION)
}

/// The library version, e.g. "0.1.0": a static NUL-terminated string the caller must not free.
/// Thread-safe; never fails.
#[no_mangle]
pub extern "C" fn lomo_version() -> *const c_char {
    guard_or(std::ptr::null(), || {
        concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
    })
}

/// A static description of a status number (for unknown numbers: "unknown status"). The string
/// is NUL-terminated, static, and must not be freed. Thread-safe.
#[no_mangle]
pub extern "C" fn lomo_status_str(status: u32) -> *const c_char {
    guard_or(std::ptr::null(), || {
        Status::from_u32(status).map_or(c"unknown status".as_ptr(), |s| s.as_cstr().as_ptr())
    })
}

/// Copies the calling thread's last error message into `buf` (at most `len` bytes including the
/// terminating NUL; truncated if needed) and returns the message's full length in bytes, without
/// the NUL. `buf` may be NULL when `len` is 0 (to ask for the length). The message belongs to the
/// calling thread and is replaced by the next failing call on that thread; successful calls leave
/// it as it was. Never fails.
///
/// # Safety
/// If `buf` is NULL, nothing is written and only the length is returned; otherwise `buf` must point
/// to at least `len` writable bytes of host memory. Thread-safe: each thread has its own message.
#[no_mangle]
pub unsafe extern "C" fn lomo_last_error_message(buf: *mut c_char, len: usize) -> usize {
    guard_or(0, || {
        with_last_error(|msg| {
            if !buf.is_null() && len > 0 {
                let n = msg.len().min(len - 1);
                // SAFETY: the caller provides `len` writable bytes at `buf`; n + 1 <= len.
                unsafe {
                    std::ptr::copy_nonoverlapping(msg.as_ptr(), buf.cast::<u8>(), n);
                    *buf.add(n) = 0;
                }
            }
            msg.len()
        })
    })
}

/// Whether CUDA parameters can be registered: the library was built with its CUDA backend and a
/// CUDA driver with at least one device was found (or the host emulation is selected with
/// `LOMO_CUDA_EMULATE=1`). Probes the driver once, never fails. Thread-safe.
#[no_mangle]
pub extern "C" fn lomo_cuda_available() -> bool {
    guard_or(false, crate::backend::cuda::side::available)
}
