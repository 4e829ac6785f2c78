//! FFI layer: the one boundary every export goes through.
//!
//! [`guard`] runs an export's body under `catch_unwind`, turns an [`Error`] into its status and
//! keeps its message as the calling thread's last error; [`guard_or`] does the same for exports
//! that return a plain value. Pointer helpers turn NULL into `LOMO_STATUS_NULL_ARGUMENT`.

use std::cell::RefCell;
use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::{Error, Result, Status};

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Records `message` as this thread's last error.
pub fn set_last_error(message: String) {
    LAST_ERROR.with(|e| *e.borrow_mut() = message);
}

/// Runs `f` with this thread's last error message.
pub fn with_last_error<R>(f: impl FnOnce(&str) -> R) -> R {
    LAST_ERROR.with(|e| f(&e.borrow()))
}

/// The boundary for status-returning exports. The body runs in the IEEE floating-point
/// environment (no flush-to-zero, round to nearest even; the caller's modes are restored after,
/// see `backend::cpu::fpenv`), so no result depends on the caller's MXCSR/FPCR.
pub fn guard<F: FnOnce() -> Result<()>>(f: F) -> Status {
    match catch_unwind(AssertUnwindSafe(|| crate::backend::cpu::fpenv::ieee(f))) {
        Ok(Ok(())) => Status::Ok,
        Ok(Err(e)) => {
            let status = e.status();
            set_last_error(e.message().to_owned());
            status
        }
        Err(payload) => {
            set_last_error(format!(
                "internal panic: {}",
                crate::error::panic_message(payload.as_ref())
            ));
            Status::Panic
        }
    }
}

/// The boundary for exports that return a value: `on_panic` is returned if `f` panics. Runs in
/// the IEEE environment, as [`guard`].
pub fn guard_or<T, F: FnOnce() -> T>(on_panic: T, f: F) -> T {
    match catch_unwind(AssertUnwindSafe(|| crate::backend::cpu::fpenv::ieee(f))) {
        Ok(v) => v,
        Err(payload) => {
            set_last_error(format!(
                "internal panic: {}",
                crate::error::panic_message(payload.as_ref())
            ));
            on_panic
        }
    }
}

/// `&T` from a possibly NULL pointer.
///
/// # Safety
/// A non-NULL `p` must point to a valid `T` for the lifetime the caller picks.
pub unsafe fn deref<'a, T>(p: *const T, what: &str) -> Result<&'a T> {
    // SAFETY: non-NULL validity is the caller's contract (documented on each export).
    match unsafe { p.as_ref() } {
        Some(r) => Ok(r),
        None => Err(Error::new(Status::NullArgument, format!("{what} is NULL"))),
    }
}

/// `&mut T` from a possibly NULL pointer.
///
/// # Safety
/// A non-NULL `p` must point to a valid `T` not aliased for the lifetime the caller picks.
pub unsafe fn deref_mut<'a, T>(p: *mut T, what: &str) -> Result<&'a mut T> {
    // SAFETY: non-NULL validity and exclusivity are the caller's contract.
    match unsafe { p.as_mut() } {
        Some(r) => Ok(r),
        None => Err(Error::new(Status::NullArgument, format!("{what} is NULL"))),
    }
}

/// A UTF-8 `&str` from a NUL-terminated C string.
///
/// # Safety
/// A non-NULL `p` must point to a NUL-terminated string that outlives the returned borrow.
pub unsafe fn c_str<'a>(p: *const c_char, what: &str) -> Result<&'a str> {
    if p.is_null() {
        return Err(Error::new(Status::NullArgument, format!("{what} is NULL")));
    }
    // SAFETY: NUL termination and lifetime are the caller's contract.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map_err(|_| Error::invalid(format!("{what} is not valid UTF-8")))
}

/// Checks a caller-filled `struct_size` against the size this library was built with.
pub fn check_struct_size(what: &str, got: usize, expected: usize) -> Result<()> {
    if got != expected {
        return Err(Error::invalid(format!(
            "{what}.struct_size is {got}, this library expects {expected}: initialise it with \
             sizeof({what}) (or its _init function) and use the header that matches the library"
        )));
    }
    Ok(())
}
