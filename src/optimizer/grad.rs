//! Core layer: gradients the library reduces itself (`LOMO_GRAD_ALL_REDUCE`,
//! `LOMO_GRAD_REDUCE_SCATTER`; `notes/distributed.md` §4.2, §5), before the step's passes see
//! them. The caller's gradient buffer is only read: the reduction runs on the library's scratch
//! ([`crate::dist::GradScratch`]), through the communicator's callbacks, in the gradient's dtype
//! (SUM), and the sum is divided by the group size there (f32 arithmetic, rounded to the dtype):
//! the passes then get the average, exactly as if the caller had submitted it. CUDA parameters
//! ([`reduce_device`]) do the same on the device scratch of the CUDA side, every copy, the
//! callbacks' collectives and the division enqueued on the caller's stream; nothing waits.

use std::ffi::c_void;
use std::ptr::null_mut;

use crate::backend::cpu::convert::divide_in_place;
use crate::backend::cuda::side::CudaSide;
use crate::backend::RawBuf;
use crate::dist::{Dist, GradMode, Shard};
use crate::error::Result;

/// The gradient the passes get for a piece in mode `s.grad_mode`: `g` itself (`REDUCED`), or
/// the average over `s.grad_comm` in `bufs.1` (`ALL_REDUCE`: `g` is this rank's gradient of the
/// piece; `REDUCE_SCATTER`: `g` is this rank's gradient of the whole tensor, `local` elements
/// of its partition come back). `bufs` is the locked scratch. Fails with `CommError` when a
/// callback fails, before anything changed.
pub(super) fn reduce(
    dist: &Dist,
    s: &Shard,
    g: RawBuf,
    local: usize,
    bufs: &mut (Vec<f32>, Vec<f32>),
    name: &str,
) -> Result<RawBuf> {
    let Some(comm) = s.grad_comm.map(|c| &dist.comms[c as usize]) else {
        return Ok(g);
    };
    let (dtype, size) = (g.dtype, g.dtype.size());
    let code = dtype as u32;
    let recv = bufs.1.as_mut_ptr() as usize;
    let n = comm.size as f32;
    match s.grad_mode {
        GradMode::Reduced => Ok(g),
        GradMode::AllReduce => {
            let out = RawBuf {
                addr: recv,
                dtype,
                numel: g.numel,
            };
            if g.numel == 0 {
                return Ok(out);
            }
            debug_assert!(bufs.1.len() * 4 >= g.bytes());
            // SAFETY: `g` is the caller's readable gradient of `g.numel` elements (validated by
            // the core); the scratch holds at least as many bytes (sized at
            // lomo_param_set_shard) and does not overlap it.
            unsafe {
                std::ptr::copy_nonoverlapping(g.addr as *const u8, recv as *mut u8, g.bytes())
            };
            // SAFETY: the scratch holds `g.numel` elements of the dtype (copied above), locked
            // by the caller for this submission.
            unsafe { comm.all_reduce_grad(recv as *mut c_void, g.numel, code, null_mut(), name)? };
            divide_in_place(&out, n);
            Ok(out)
        }
        GradMode::ReduceScatter => {
            let total = s.part * comm.size as usize;
            let out = RawBuf {
                addr: recv,
                dtype,
                numel: local,
            };
            if total == 0 {
                return Ok(out);
            }
            let send = if total == g.numel {
                g.addr
            } else {
                // A zero-padded copy: the partitions are `s.part` elements each.
                debug_assert!(bufs.0.len() * 4 >= total * size);
                let pad = bufs.0.as_mut_ptr() as *mut u8;
                // SAFETY: the scratch holds `total × size` bytes (sized at lomo_param_set_shard,
                // `total > g.numel`); `g` is the caller's readable gradient, not overlapping it.
                unsafe {
                    std::ptr::copy_nonoverlapping(g.addr as *const u8, pad, g.bytes());
                    std::ptr::write_bytes(pad.add(g.bytes()), 0, (total - g.numel) * size);
                }
                pad as usize
            };
            // SAFETY: `send` holds `total = part × size` elements (the caller's gradient when it
            // has exactly that many, else the padded copy), `recv` at least `part` (sized at
            // lomo_param_set_shard); the scratch is locked by the caller.
            unsafe {
                comm.reduce_scatter_grad(
                    send as *const c_void,
                    recv as *mut c_void,
                    s.part,
                    code,
                    null_mut(),
                    name,
                )?
            };
            divide_in_place(&out, n);
            Ok(out)
        }
    }
}

/// [`reduce`] for a CUDA parameter: the same reduction on the CUDA side's device scratch
/// (`side.grad_scratch()`, sized at `lomo_param_set_shard`), the caller's gradient `g` (device
/// memory, only read) copied there on `stream` — or read in place by a reduce-scatter that
/// divides evenly —, the callbacks handed the device buffers and `stream`, the division by the
/// group size one kernel on `stream` after them. Nothing waits for the device; the next submit
/// on `stream` reuses the scratch after the passes of this one (submits with library-reduced
/// gradients must be ordered on one stream).
#[allow(clippy::too_many_arguments)]
pub(super) fn reduce_device(
    dist: &Dist,
    s: &Shard,
    g: RawBuf,
    local: usize,
    side: &CudaSide,
    stream: usize,
    name: &str,
) -> Result<RawBuf> {
    let Some(comm) = s.grad_comm.map(|c| &dist.comms[c as usize]) else {
        return Ok(g);
    };
    side.check_grad(&g, "the gradient")?;
    let dtype = g.dtype;
    let code = dtype as u32;
    let (send_buf, recv) = side.grad_scratch();
    let n = comm.size as f32;
    let st = stream as *mut c_void;
    match s.grad_mode {
        GradMode::Reduced => Ok(g),
        GradMode::AllReduce => {
            let out = RawBuf {
                addr: recv as usize,
                dtype,
                numel: g.numel,
            };
            if g.numel == 0 {
                return Ok(out);
            }
            side.copy_device(recv, g.addr as u64, g.bytes(), stream)?;
            // SAFETY: device scratch of at least `g.numel` elements of the dtype (sized at
            // lomo_param_set_shard), written by the copy above on `stream`, which the callback
            // receives to order its collective; nothing else uses it during the submission.
            unsafe { comm.all_reduce_grad(recv as *mut c_void, g.numel, code, st, name)? };
            if n != 1.0 {
                side.scale(&out, n, false, stream)?;
            }
            Ok(out)
        }
        GradMode::ReduceScatter => {
            let total = s.part * comm.size as usize;
            let out = RawBuf {
                addr: recv as usize,
                dtype,
                numel: local,
            };
            if total == 0 {
                return Ok(out);
            }
            let send = if total == g.numel {
                g.addr as u64
            } else {
                // A zero-padded copy on the device: the partitions are `s.part` elements each.
                side.copy_device(send_buf, g.addr as u64, g.bytes(), stream)?;
                let tail = RawBuf {
                    addr: (send_buf + g.bytes() as u64) as usize,
                    dtype,
                    numel: total - g.numel,
                };
                side.scale(&tail, 1.0, true, stream)?;
                send_buf
            };
            // SAFETY: `send` holds `total` elements (the caller's gradient when it has exactly
            // that many, else the padded device copy), `recv` at least `part` (sized at
            // lomo_param_set_shard), device memory ordered on `stream`, which the callback gets.
            unsafe {
                comm.reduce_scatter_grad(
                    send as *const c_void,
                    recv as *mut c_void,
                    s.part,
                    code,
                    st,
                    name,
                )?
            };
            if n != 1.0 {
                side.scale(&out, n, false, stream)?;
            }
            Ok(out)
        }
    }
}
