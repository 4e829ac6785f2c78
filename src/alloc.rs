//! Fallible allocation, used by every layer (like [`crate::error`]).
//!
//! Every buffer the library allocates on behalf of a call whose size follows from the caller's
//! input — AdaLomo state and workspaces, device memory, checkpoint buffers, XLA workspaces — is
//! allocated through here (or, for device memory, reports failure with [`out_of_memory`]), so a
//! failed allocation is `LOMO_STATUS_OUT_OF_MEMORY` with the byte count in the message instead
//! of Rust's abort ("memory allocation of N bytes failed"). Callers allocate everything a call
//! needs before they change anything, so a failed allocation leaves the optimizer as it was.
//!
//! Small bookkeeping of bounded size (messages, names already held by the caller, one registry
//! slot) goes through the global allocator as usual.
//!
//! ## Test hook
//!
//! [`fail_after`] makes a later fallible allocation on the calling thread fail, as if the
//! machine were out of memory: the tests use it to fail each allocation of a registration, a
//! checkpoint or an XLA call in turn and check that nothing changed (`tests/fault_injection.rs`,
//! the fuzz targets in `fuzz/`). The hook is per thread, so parallel tests do not disturb each
//! other, and costs one thread-local read per fallible allocation (none is on the step path). It
//! is reachable from Rust only, not through the C API.

use std::cell::Cell;

use crate::error::{Error, Result, Status};

thread_local! {
    /// Fallible allocations on this thread that still succeed before one fails (None: all do).
    static FAIL_AFTER: Cell<Option<u64>> = const { Cell::new(None) };
    /// Fallible allocations attempted on this thread (for the tests' exhaustive loops).
    static ATTEMPTS: Cell<u64> = const { Cell::new(0) };
}

/// Test hook: after `n` more successful fallible allocations on this thread, the next one fails
/// with `OutOfMemory` (then the hook disarms itself). `None` disarms it.
#[doc(hidden)]
pub fn fail_after(n: Option<u64>) {
    FAIL_AFTER.with(|f| f.set(n));
}

/// Test hook: fallible allocations attempted on this thread so far.
#[doc(hidden)]
pub fn attempts() -> u64 {
    ATTEMPTS.with(|a| a.get())
}

/// Whether the test hook fails this allocation (counts it either way).
fn injected() -> bool {
    ATTEMPTS.with(|a| a.set(a.get().wrapping_add(1)));
    FAIL_AFTER.with(|f| match f.get() {
        None => false,
        Some(0) => {
            f.set(None);
            true
        }
        Some(n) => {
            f.set(Some(n - 1));
            false
        }
    })
}

/// The error of a failed allocation of `bytes` bytes for `what` ("AdaLomo state of 'w'").
pub fn out_of_memory(bytes: u128, what: &str) -> Error {
    Error::new(
        Status::OutOfMemory,
        format!("out of memory: allocating {bytes} bytes for {what} failed"),
    )
}

/// Checks the test hook before an allocation made elsewhere (device memory): an error if the
/// hook fails this one.
pub fn check_injected(bytes: usize, what: &str) -> Result<()> {
    if injected() {
        return Err(out_of_memory(bytes as u128, what));
    }
    Ok(())
}

/// An empty vector with room for exactly `n` elements (no reallocation while it stays within).
pub fn with_capacity<T>(n: usize, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    try_reserve(&mut v, n, what, true)?;
    Ok(v)
}

/// Reserves room for `additional` more elements in `v` (amortized growth, as `push` does), or
/// fails with `OutOfMemory`.
pub fn reserve<T>(v: &mut Vec<T>, additional: usize, what: &str) -> Result<()> {
    try_reserve(v, additional, what, false)
}

fn try_reserve<T>(v: &mut Vec<T>, additional: usize, what: &str, exact: bool) -> Result<()> {
    let bytes = (v.len() as u128 + additional as u128) * std::mem::size_of::<T>() as u128;
    if injected() {
        return Err(out_of_memory(bytes, what));
    }
    let r = if exact {
        v.try_reserve_exact(additional)
    } else {
        v.try_reserve(additional)
    };
    r.map_err(|_| out_of_memory(bytes, what))
}

/// `n` copies of `value`, or `OutOfMemory`.
pub fn filled<T: Clone>(value: T, n: usize, what: &str) -> Result<Vec<T>> {
    let mut v = with_capacity(n, what)?;
    v.resize(n, value);
    Ok(v)
}

/// `n` zeros (`T::default()` of a number type), or `OutOfMemory`.
pub fn zeros<T: Clone + Default>(n: usize, what: &str) -> Result<Vec<T>> {
    filled(T::default(), n, what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_impossible_size_is_an_error_with_the_byte_count() {
        let e = zeros::<f32>(1 << 40, "the test").unwrap_err();
        assert_eq!(e.status(), Status::OutOfMemory);
        assert!(
            e.message().contains("4398046511104 bytes"),
            "{}",
            e.message()
        );
        let e = zeros::<f64>(usize::MAX / 2, "the test").unwrap_err();
        assert_eq!(e.status(), Status::OutOfMemory);
        assert!(
            e.message()
                .contains(&((usize::MAX / 2) as u128 * 8).to_string()),
            "{}",
            e.message()
        );
    }

    #[test]
    fn the_hook_fails_exactly_the_chosen_allocation() {
        fail_after(Some(2));
        assert!(zeros::<u8>(4, "a").is_ok());
        assert!(zeros::<u8>(4, "b").is_ok());
        let e = zeros::<u8>(4, "c").unwrap_err();
        assert_eq!(
            e.message(),
            "out of memory: allocating 4 bytes for c failed"
        );
        assert!(zeros::<u8>(4, "d").is_ok(), "the hook disarms itself");
        fail_after(Some(0));
        fail_after(None);
        assert!(zeros::<u8>(4, "e").is_ok());
    }
}
