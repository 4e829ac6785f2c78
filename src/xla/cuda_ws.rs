//! XLA FFI layer, CUDA platform: the device of a call and its pooled workspaces.
//!
//! **Device.** The device that owns a call's result buffer (`cuPointerGetAttribute`, device
//! ordinal) gets one process-wide launcher (`side::shared_launcher_for_pointer`): created at the
//! first call, working in the device's primary context (pushed per call and popped, so XLA's
//! current context is left alone). Under `LOMO_CUDA_EMULATE=1` it is the host emulation.
//!
//! **Workspaces.** A call needs a `LomoStep` record, one `LomoTensor` per tensor, the passes'
//! workspaces (partials; AdaLomo's new rows or v, r_i, c_j, column partials) and, rarely, a copy
//! of a gradient that shares memory with a result. They come from a process-wide pool keyed by
//! (device, stream, sizes), allocated through the launcher at the first call of that key and
//! never freed (like the Host platform's pool, their total is bounded by the distinct tensor
//! shapes of the model). A call takes a workspace out of the pool and puts it back when its
//! launches are enqueued, before they run: the next call on the same stream may then reuse it
//! because the stream orders the two calls' kernels, while a call on another stream has a
//! different key and never sees it. Concurrent calls (any streams) each hold their own. So steady
//! state allocates nothing and makes no XLA or driver call besides the launches themselves.
//!
//! Why not `XLA_FFI_DeviceMemory_Allocate`: it would cost two API calls per buffer per call,
//! XLA's stream-ordered reuse of memory freed at the end of a handler is not observable without
//! a GPU (this work has none), and the fake XLA of the tests would have to emulate it. A stream
//! address that XLA destroys and later reuses for a new stream would map to the old pool entry;
//! XLA keeps its compute streams for the life of the client, so this does not arise.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::Arc;

use once_cell::sync::Lazy;
use parking_lot::Mutex;

use super::frame::{XResult, XlaError};
use crate::backend::cuda::abi::{DevPtr, LomoStep, LomoTensor};
use crate::backend::cuda::launcher::Launcher;
use crate::backend::cuda::passes::{self, Bufs, Sizes};
use crate::backend::cuda::side;
use crate::error::Error;

/// The device of a call.
#[derive(Clone, Debug)]
pub struct Dev {
    pub ordinal: i32,
    pub launcher: Arc<dyn Launcher>,
    pub max_blocks: u32,
    pub max_smem: u32,
}

/// An error of the CUDA backend as an XLA error naming the op and the platform.
pub fn cuda_error(op: &str, e: Error) -> XlaError {
    let mut x = XlaError::from(e);
    x.message = format!("lomo {op} (CUDA platform): {}", x.message);
    x
}

impl Dev {
    /// The device that owns `buffer` (device memory of this call) and its launcher.
    pub fn of(buffer: *mut c_void, op: &str) -> XResult<Dev> {
        let (ordinal, launcher) =
            side::shared_launcher_for_pointer(buffer as u64).map_err(|e| cuda_error(op, e))?;
        Ok(Dev {
            ordinal,
            max_blocks: passes::max_blocks(&*launcher),
            max_smem: launcher.max_smem(),
            launcher,
        })
    }
}

/// What a call needs besides XLA's buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Need {
    /// `LomoTensor` records after the one `LomoStep`.
    pub tensors: u32,
    /// The passes' workspaces (the state fields are ignored: state is XLA's).
    pub sizes: Sizes,
    /// Bytes for a gradient copy (0: none).
    pub scratch: usize,
}

/// One call's device memory (carved from one allocation).
#[derive(Clone, Copy, Debug)]
pub struct Workspace {
    pub step: DevPtr,
    pub tensors: DevPtr,
    /// State fields are 0 (the caller fills in XLA's state buffers).
    pub bufs: Bufs,
    pub scratch: DevPtr,
}

impl Workspace {
    /// The record of tensor `i`.
    pub fn tensor(&self, i: usize) -> DevPtr {
        self.tensors + (i * std::mem::size_of::<LomoTensor>()) as DevPtr
    }
}

type Key = (i32, usize, Need);

static POOL: Lazy<Mutex<HashMap<Key, Vec<Workspace>>>> = Lazy::new(|| Mutex::new(HashMap::new()));

/// Sub-buffers start on this boundary (as cuMemAlloc's results do, at least).
const ALIGN: usize = 256;

fn allocate(dev: &Dev, need: &Need) -> crate::error::Result<Workspace> {
    let s = &need.sizes;
    let records =
        std::mem::size_of::<LomoStep>() + need.tensors as usize * std::mem::size_of::<LomoTensor>();
    let parts = [
        records,
        s.partials,
        s.ws_a,
        s.ws_r,
        s.ws_c,
        s.col_part,
        need.scratch,
    ];
    // Checked: sizes saturate for shapes past the address space; that is out of memory.
    let total = parts.iter().try_fold(0usize, |t, b| {
        b.checked_next_multiple_of(ALIGN)
            .and_then(|b| t.checked_add(b))
    });
    let Some(total) = total else {
        return Err(crate::alloc::out_of_memory(
            parts.iter().map(|&b| b as u128).sum(),
            "an XLA call's device workspace",
        ));
    };
    let base = dev.launcher.alloc(total)?;
    let mut at = base;
    let mut carve = |bytes: usize| -> DevPtr {
        if bytes == 0 {
            return 0;
        }
        let p = at;
        at += bytes.next_multiple_of(ALIGN) as DevPtr;
        p
    };
    let step = carve(records);
    Ok(Workspace {
        step,
        tensors: step + std::mem::size_of::<LomoStep>() as DevPtr,
        bufs: Bufs {
            partials: carve(s.partials),
            state_a: 0,
            state_b: 0,
            ws_a: carve(s.ws_a),
            ws_r: carve(s.ws_r),
            ws_c: carve(s.ws_c),
            col_part: carve(s.col_part),
        },
        scratch: carve(need.scratch),
    })
}

/// A workspace taken from the pool for one call; back into the pool on drop.
pub struct Pooled {
    key: Key,
    pub ws: Workspace,
}

impl Pooled {
    /// A workspace for `need` on `stream` of `dev` (allocated at the first call of this key).
    pub fn take(dev: &Dev, stream: usize, mut need: Need, op: &str) -> XResult<Pooled> {
        need.sizes.state_a = 0;
        need.sizes.state_b = 0;
        let key = (dev.ordinal, stream, need);
        let cached = POOL.lock().get_mut(&key).and_then(|v| v.pop());
        let ws = match cached {
            Some(ws) => ws,
            None => allocate(dev, &need).map_err(|e| cuda_error(op, e))?,
        };
        Ok(Pooled { key, ws })
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        POOL.lock().entry(self.key).or_default().push(self.ws);
    }
}

/// Workspaces in the pool now for `stream` (tests: steady state allocates nothing).
pub fn pooled_on(stream: usize) -> usize {
    POOL.lock()
        .iter()
        .filter(|(k, _)| k.1 == stream)
        .map(|(_, v)| v.len())
        .sum()
}
