//! CUDA backend: the device-side optimizer state seen from the host, between steps —
//! checkpoints (state tensors, step counters and loss scaler copied through the host) and
//! memory accounting. Nothing here is on the step path; every read waits for the stream of the
//! latest launch and every write completes before it returns.

use super::abi::*;
use super::device::DeviceOpt;
use crate::error::{bail, Result};

/// The step counters and the dynamic loss-scaler state kept in the device's `LomoStep`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DeviceCounters {
    pub steps: u64,
    pub skipped_total: u64,
    pub scale: f64,
    pub cur_hysteresis: u32,
    pub cur_iter: u64,
    pub last_overflow_iter: i64,
}

/// Bytes of one `LomoStep`, the distributed scratch and the tensor records' capacity.
fn records_bytes(cap: usize) -> u64 {
    (std::mem::size_of::<LomoStep>()
        + 8 * super::step::SCRATCH_F64
        + cap * std::mem::size_of::<LomoTensor>()) as u64
}

/// The bytes of `v` (f32 has no padding, and u8 no alignment).
fn f32_bytes_mut(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: `v` is `4 * v.len()` initialized bytes, and every byte pattern is a valid f32.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), 4 * v.len()) }
}

fn f32_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: `v` is `4 * v.len()` initialized bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), 4 * v.len()) }
}

impl DeviceOpt {
    /// The state buffers of parameter `idx` with their element counts: (row or vector state,
    /// column state). A buffer is 0 when nothing was allocated (LOMO, empty parameters), whose
    /// state stays zero.
    fn state_buffers(&self, idx: usize) -> [(DevPtr, u64); 2] {
        let t = &self.params[idx].tensor;
        let (shape, b) = (t.layout.shape, t.bufs);
        if shape.factored {
            [(b.state_a, shape.rows), (b.state_b, shape.cols)]
        } else {
            [(b.state_a, shape.numel), (0, 0)]
        }
    }

    /// Copies parameter `idx`'s AdaLomo state back: (row or vector state, column state), with
    /// the lengths of the CPU backend's state (`AdaState`).
    pub fn read_state(&self, idx: usize, stream: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let mut out = [Vec::new(), Vec::new()];
        for (o, (ptr, n)) in out.iter_mut().zip(self.state_buffers(idx)) {
            let mut v = crate::alloc::zeros::<f32>(n as usize, "a copy of the CUDA state")?;
            if n > 0 && ptr != 0 {
                self.launcher
                    .copy_to_host(f32_bytes_mut(&mut v), ptr, stream)?;
            }
            *o = v;
        }
        let [a, b] = out;
        Ok((a, b))
    }

    /// Overwrites parameter `idx`'s AdaLomo state (lengths as [`DeviceOpt::read_state`]
    /// returns them) and forgets its carried Σp² (recomputed at the next step).
    pub fn write_state(&self, idx: usize, a: &[f32], b: &[f32]) -> Result<()> {
        for (src, (ptr, n)) in [a, b].into_iter().zip(self.state_buffers(idx)) {
            if src.len() as u64 != n {
                bail!(
                    InvalidArgument,
                    "state of CUDA parameter {idx}: {} values given, {n} expected",
                    src.len()
                );
            }
            if n > 0 && ptr != 0 {
                self.launcher.copy_from_host(ptr, f32_bytes(src))?;
            }
        }
        let field = std::mem::offset_of!(LomoTensor, carried_valid);
        let at = self.tensors + (idx * std::mem::size_of::<LomoTensor>() + field) as u64;
        self.launcher.copy_from_host(at, &0u32.to_ne_bytes())
    }

    /// The step counters and loss-scaler state (synchronizes with `stream`).
    pub fn counters(&self, stream: usize) -> Result<DeviceCounters> {
        let s = self.read_step(stream)?;
        Ok(DeviceCounters {
            steps: s.steps,
            skipped_total: s.skipped_total,
            scale: s.scale,
            cur_hysteresis: s.cur_hysteresis,
            cur_iter: s.cur_iter,
            last_overflow_iter: s.last_overflow_iter,
        })
    }

    /// Replaces the step counters and loss-scaler state between steps; the diagnostics then
    /// describe the restored position (as after creation).
    pub fn restore_counters(&self, c: &DeviceCounters, stream: usize) -> Result<()> {
        let old = self.read_step(stream)?;
        let scale = c.scale as f32;
        let s = LomoStep {
            steps: c.steps,
            skipped_total: c.skipped_total,
            scale: c.scale,
            cur_hysteresis: c.cur_hysteresis,
            cur_iter: c.cur_iter,
            last_overflow_iter: c.last_overflow_iter,
            inv_scale: (1.0 / c.scale) as f32,
            scale_f32: scale,
            coef: 1.0,
            skip: 0,
            has_norm: 0,
            info_step: c.steps,
            info_grad_norm: f32::NAN,
            info_clip_coef: 1.0,
            info_loss_scale: scale,
            info_next_loss_scale: scale,
            info_overflow: 0,
            info_skipped: 0,
            info_nonfinite: 0,
            ..old
        };
        self.launcher.copy_from_host(self.step, as_bytes(&s))
    }

    /// Device bytes of parameter `idx`: (optimizer state, workspaces).
    pub fn param_memory(&self, idx: usize) -> (u64, u64) {
        let t = &self.params[idx].tensor;
        let s = t.layout.sizes();
        let piece = t.piece.map_or(0, |p| 8 * p.len);
        (s.state() as u64, (s.workspace() + piece) as u64)
    }

    /// Device bytes of the per-optimizer records (the step record and the tensor records).
    pub fn records_bytes(&self) -> u64 {
        records_bytes(self.cap)
    }
}
