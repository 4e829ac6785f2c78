//! FFI layer: optimizer-state checkpoints (files and memory buffers) and memory accounting.
//!
//! Every export has the same shape: guard → convert and check → call the core → write outputs.

use std::ffi::c_char;
use std::path::PathBuf;

use crate::error::{bail, Result, Status};
use crate::ffi::guard::{check_struct_size, deref, deref_mut, guard};
use crate::ffi::optimizer::lomo_optimizer;
use crate::ffi::types::lomo_memory_stats;
use crate::{memory, state};

/// A path from a NUL-terminated C string (any bytes on Unix; UTF-8 elsewhere).
///
/// # Safety
/// A non-NULL `p` must point to a NUL-terminated string.
unsafe fn c_path(p: *const c_char) -> Result<PathBuf> {
    if p.is_null() {
        bail!(NullArgument, "path is NULL");
    }
    // SAFETY: NUL termination is the caller's contract.
    let bytes = unsafe { std::ffi::CStr::from_ptr(p) }.to_bytes();
    if bytes.is_empty() {
        bail!(InvalidArgument, "path is empty");
    }
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(PathBuf::from(std::ffi::OsStr::from_bytes(bytes)))
    }
    #[cfg(not(unix))]
    match std::str::from_utf8(bytes) {
        Ok(s) => Ok(PathBuf::from(s)),
        Err(_) => bail!(InvalidArgument, "path is not valid UTF-8"),
    }
}

/// Writes the optimizer's state to the file `path` (safetensors; see the README section
/// "Checkpoints" for its contents): every AdaLomo parameter's second-moment state under its
/// registered name (`<name>.row`, `<name>.col` or `<name>.v`), the step counters, the loss
/// scaler's state and the configuration. LOMO's file has no tensors. The parameters' values are
/// not included: save them with the model.
///
/// The file is written to `<path>.tmp.<pid>`, flushed (fsync), and renamed over `path`, so
/// `path` is either the old file or the complete new one: a save that fails part-way (disk full,
/// read-only directory) removes its temporary file and leaves `path` as it was. Call between steps (else
/// `LOMO_STATUS_PHASE_ERROR`); `LOMO_STATUS_IO_ERROR` if the file cannot be written. `opt` and
/// `path` (NUL-terminated) must not be NULL. For CUDA parameters the state is copied through the
/// host (the call synchronizes). Not thread-safe with other calls on `opt`.
///
/// # Safety
/// If `opt` is NULL, the call returns `LOMO_STATUS_NULL_ARGUMENT`; otherwise `opt` must come from
/// `lomo_optimizer_new` and must not be passed to `lomo_optimizer_free` before this call returns.
/// If `path` is NULL, the call returns `LOMO_STATUS_NULL_ARGUMENT`; otherwise `path` must point to
/// a NUL-terminated string, read only during the call.
#[no_mangle]
pub unsafe extern "C" fn lomo_state_save(
    opt: *const lomo_optimizer,
    path: *const c_char,
) -> Status {
    guard(|| {
        // SAFETY: non-NULL pointers are valid per the documented contract.
        let (opt, path) = unsafe { (deref(opt, "opt")?, c_path(path)?) };
        state::save(&opt.inner.read(), &path)
    })
}

/// Loads a file written by `lomo_state_save` (or `lomo_state_serialize`) into `opt`, between
/// steps (else `LOMO_STATUS_PHASE_ERROR`). State is matched to the registered parameters by
/// name; registration order may differ.
///
/// Fails with `LOMO_STATUS_STATE_MISMATCH` when the file is truncated, corrupted (it carries a
/// CRC-32) or not a lomo checkpoint, or when its algorithm, set of parameter names, parameter
/// shapes, or (AdaLomo) `eps1` or `decay_rate` differ from the optimizer's; with
/// `LOMO_STATUS_IO_ERROR` when it cannot be read, and with `LOMO_STATUS_OUT_OF_MEMORY` when the
/// host memory to read it into cannot be allocated. A file whose `format_version` is newer than
/// this library's, or written with another byte order, is refused (`STATE_MISMATCH`) with a
/// message saying so. On failure `opt` is unchanged; the last-error message says what differs.
///
/// Restored: the state tensors, the applied and skipped step counts, and, when both the file
/// and `opt` use dynamic loss scaling, the scaler's scale and counters (clamped to this config's
/// `min_loss_scale` and `hysteresis`). Everything else (lr, weight decay and groups, clipping,
/// eps2, clip_threshold, loss-scale options, rounding, seed, parameter dtypes) comes from `opt`.
/// Carried Σp² (`LOMO_PARAM_CARRY_RMS`) is recomputed on the next step. Loading the same
/// configuration resumes bit-identically (with stochastic rounding, register parameters in the
/// same order: the random stream depends on the parameter id). For CUDA parameters the file is
/// checked on the host, then copied to the device (the call synchronizes with the stream of
/// the optimizer's latest launch). Not thread-safe with other calls on `opt`.
///
/// # Safety
/// If `opt` is NULL, the call returns `LOMO_STATUS_NULL_ARGUMENT`; otherwise `opt` must come from
/// `lomo_optimizer_new` and must not be passed to `lomo_optimizer_free` before this call returns.
/// If `path` is NULL, the call returns `LOMO_STATUS_NULL_ARGUMENT`; otherwise `path` must point to
/// a NUL-terminated string, read only during the call.
#[no_mangle]
pub unsafe extern "C" fn lomo_state_load(opt: *mut lomo_optimizer, path: *const c_char) -> Status {
    guard(|| {
        // SAFETY: non-NULL pointers are valid per the documented contract.
        let (opt, path) = unsafe { (deref(opt, "opt")?, c_path(path)?) };
        state::load(&mut opt.inner.write(), &path)
    })
}

/// Stores in `*out_size` the exact size in bytes of the state `lomo_state_serialize` would write
/// now. Call between steps (else `LOMO_STATUS_PHASE_ERROR`). `opt` and `out_size` must not be
/// NULL; `*out_size` is written only on success.
///
/// # Safety
/// If `opt` or `out_size` is NULL, the call returns `LOMO_STATUS_NULL_ARGUMENT`; otherwise `opt`
/// must come from `lomo_optimizer_new` and must not be passed to `lomo_optimizer_free` before this
/// call returns, and `out_size` must point to a writable `size_t`.
#[no_mangle]
pub unsafe extern "C" fn lomo_state_size(
    opt: *const lomo_optimizer,
    out_size: *mut usize,
) -> Status {
    guard(|| {
        // SAFETY: non-NULL pointers are valid per the documented contract.
        let (opt, out) = unsafe { (deref(opt, "opt")?, deref_mut(out_size, "out_size")?) };
        *out = state::encoded_size(&opt.inner.read())?;
        Ok(())
    })
}

/// Writes the optimizer's state into the host buffer `buf` of `len` bytes: a complete
/// safetensors file, byte for byte what `lomo_state_save` would write. `len` must be at least
/// `lomo_state_size` (else `LOMO_STATUS_INVALID_ARGUMENT` and nothing is written); the number of
/// bytes written is stored in `*out_written`. Call between steps. `opt`, `buf` and
/// `out_written` must not be NULL.
///
/// # Safety
/// If `opt`, `buf` or `out_written` is NULL, the call returns `LOMO_STATUS_NULL_ARGUMENT` (nothing
/// written); otherwise `opt` must come from `lomo_optimizer_new` and must not be passed to
/// `lomo_optimizer_free` before this call returns, `buf` must point to `len` writable bytes of host
/// memory (never device memory), and `out_written` to a writable `size_t`.
#[no_mangle]
pub unsafe extern "C" fn lomo_state_serialize(
    opt: *const lomo_optimizer,
    buf: *mut u8,
    len: usize,
    out_written: *mut usize,
) -> Status {
    guard(|| {
        // SAFETY: non-NULL pointers are valid per the documented contract.
        let (opt, out) = unsafe { (deref(opt, "opt")?, deref_mut(out_written, "out_written")?) };
        if buf.is_null() {
            bail!(NullArgument, "buf is NULL");
        }
        // SAFETY: the caller provides `len` writable bytes of host memory at `buf`.
        let dst = unsafe { std::slice::from_raw_parts_mut(buf, len) };
        // Encoded in place: no copy of the state in memory; nothing written on failure.
        *out = state::encode_into(&opt.inner.read(), dst)?;
        Ok(())
    })
}

/// Loads state from the host buffer `buf` of `len` bytes holding a complete file written by
/// `lomo_state_serialize` or `lomo_state_save`; exactly as `lomo_state_load` (same checks,
/// statuses and guarantees; `opt` is unchanged on failure). The buffer is only read during the
/// call. `opt` and `buf` must not be NULL.
///
/// # Safety
/// If `opt` is NULL, the call returns `LOMO_STATUS_NULL_ARGUMENT`; otherwise `opt` must come from
/// `lomo_optimizer_new` and must not be passed to `lomo_optimizer_free` before this call returns.
/// If `buf` is NULL (even with `len` 0), the call returns `LOMO_STATUS_NULL_ARGUMENT`; otherwise
/// `buf` must point to `len` readable bytes of host memory that no one writes during the call.
#[no_mangle]
pub unsafe extern "C" fn lomo_state_deserialize(
    opt: *mut lomo_optimizer,
    buf: *const u8,
    len: usize,
) -> Status {
    guard(|| {
        // SAFETY: a non-NULL `opt` is a live optimizer from lomo_optimizer_new.
        let opt = unsafe { deref(opt, "opt") }?;
        if buf.is_null() {
            bail!(NullArgument, "buf is NULL");
        }
        // SAFETY: the caller provides `len` readable bytes at `buf` for the call's duration.
        let bytes = unsafe { std::slice::from_raw_parts(buf, len) };
        state::load_bytes(&mut opt.inner.write(), bytes)
    })
}

/// Fills `*out` with the optimizer's memory per device and in total: the library's own state and
/// workspace bytes, the caller's parameter bytes, and what AdamW with f32 master weights would
/// need for the same parameters (see `lomo_device_memory`). Set `out->struct_size` to
/// `sizeof(lomo_memory_stats)` first. Never synchronizes. Not thread-safe with other calls on
/// `opt` except `lomo_grad_submit`.
///
/// # Safety
/// If `opt` or `out` is NULL, the call returns `LOMO_STATUS_NULL_ARGUMENT`; otherwise `opt` must
/// come from `lomo_optimizer_new` and must not be passed to `lomo_optimizer_free` before this call
/// returns, and `out` must point to a writable `lomo_memory_stats` (`sizeof(lomo_memory_stats)`
/// host bytes).
#[no_mangle]
pub unsafe extern "C" fn lomo_memory_stats_get(
    opt: *const lomo_optimizer,
    out: *mut lomo_memory_stats,
) -> Status {
    guard(|| {
        // SAFETY: non-NULL pointers are valid per the documented contract.
        let (opt, out) = unsafe { (deref(opt, "opt")?, deref_mut(out, "out")?) };
        check_struct_size(
            "lomo_memory_stats",
            out.struct_size,
            std::mem::size_of::<lomo_memory_stats>(),
        )?;
        *out = lomo_memory_stats::from_core(&memory::memory_stats(&opt.inner.read()));
        Ok(())
    })
}
