//! Core layer: gradients the library reduces itself (`LOMO_GRAD_ALL_REDUCE`,
//! `LOMO_GRAD_REDUCE_SCATTER`; `notes/distributed.md` §4.2, §5), before the step's passes see
//! them. The caller's gradient buffer is only read: the reduction runs on the library's scratch
//! ([`crate::dist::GradScratch`]), through the communicator's callbacks, in the gradient's dtype
//! (SUM), and the sum is divided by the group size there (f32 arithmetic, rounded to the dtype):
//! the passes then get the average, exactly as if the caller had submitted it.

use std::ffi::c_void;

use crate::backend::cpu::convert::divide_in_place;
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
            unsafe { comm.all_reduce_grad(recv as *mut c_void, g.numel, code, name)? };
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
                    name,
                )?
            };
            divide_in_place(&out, n);
            Ok(out)
        }
    }
}
