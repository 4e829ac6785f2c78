//! CUDA backend: gradient accumulation buffers (`lomo_accum_enable`) — the device memory of a
//! buffer ([`DevBuf`]) and the pass over it (`kernels/accum.cu`, one launch on the caller's
//! stream, no host synchronization).

use std::sync::Arc;

use super::abi::DevPtr;
use super::launcher::{Geometry, Launcher};
use super::passes::{self, blocks_for, THREADS};
use super::registry::{pair_name, Module};
use crate::backend::interface::AccumOp;
use crate::backend::RawBuf;
use crate::error::Result;

/// Mirror of `AccumArgs` in `kernels/accum.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AccumArgs {
    pub acc: DevPtr,
    pub g: DevPtr,
    pub n: u64,
    pub factor: f32,
    pub keep: u32,
    pub divisor: f32,
    pub pad: u32,
}

/// Enqueues `op` on the buffer `acc` with the gradient `g` (device memory of the launcher's
/// device, `acc.numel` elements each) on `stream`.
pub fn accumulate(
    l: &dyn Launcher,
    acc: &RawBuf,
    g: Option<&RawBuf>,
    op: &AccumOp,
    stream: usize,
) -> Result<()> {
    let n = acc.numel as u64;
    if n == 0 {
        return Ok(());
    }
    let a = AccumArgs {
        acc: acc.addr as DevPtr,
        g: g.map_or(0, |g| g.addr as DevPtr),
        n,
        factor: op.factor,
        keep: op.keep as u32,
        divisor: 1.0,
        pad: 0,
    };
    // Without a gradient any instantiation reads none: the buffer's own pair.
    let name = pair_name("accum_add", acc.dtype, g.map_or(acc.dtype, |g| g.dtype));
    let geo = Geometry {
        grid: blocks_for(n, THREADS as u64 * 8, passes::max_blocks(l)),
        block: THREADS,
        smem: 0,
    };
    passes::launch(l, Module::Accum, &name, geo, &a, stream)
}

/// Device memory owned by the core (an accumulation buffer), freed on drop.
/// `buf ← buf / divisor` in f32, rounded to its dtype (the average of a gradient the library
/// summed over `divisor` ranks; the CPU's `convert::divide_in_place`, bit for bit), or, with
/// `zero`, `buf ← 0`. One launch on `stream`.
pub fn scale(
    l: &dyn Launcher,
    buf: &RawBuf,
    divisor: f32,
    zero: bool,
    stream: usize,
) -> Result<()> {
    let n = buf.numel as u64;
    if n == 0 {
        return Ok(());
    }
    let a = AccumArgs {
        acc: buf.addr as DevPtr,
        g: 0,
        n,
        factor: 1.0,
        keep: !zero as u32,
        divisor,
        pad: 0,
    };
    let name = pair_name("accum_add", buf.dtype, buf.dtype);
    let geo = Geometry {
        grid: blocks_for(n, THREADS as u64 * 8, passes::max_blocks(l)),
        block: THREADS,
        smem: 0,
    };
    passes::launch(l, Module::Accum, &name, geo, &a, stream)
}

#[derive(Debug)]
pub struct DevBuf {
    pub ptr: DevPtr,
    pub bytes: usize,
    launcher: Arc<dyn Launcher>,
}

impl DevBuf {
    pub fn new(launcher: Arc<dyn Launcher>, bytes: usize) -> Result<DevBuf> {
        let ptr = launcher.alloc(bytes)?;
        Ok(DevBuf {
            ptr,
            bytes,
            launcher,
        })
    }
}

impl Drop for DevBuf {
    fn drop(&mut self) {
        self.launcher.free(self.ptr);
    }
}

#[cfg(all(test, feature = "cuda-emulation"))]
mod tests {
    use super::super::emu;
    use super::*;

    #[test]
    fn argument_mirror_matches_the_kernel() {
        assert_eq!(
            emu::arg_size("accum_add_bf16_f32"),
            std::mem::size_of::<AccumArgs>()
        );
    }
}
