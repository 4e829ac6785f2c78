//! Core layer: memory accounting — what the optimizer holds per device, and what AdamW would
//! need for the same parameters.
//!
//! AdamW reference (mixed-precision accounting of Rajbhandari et al., "ZeRO: Memory
//! Optimizations Toward Training Trillion Parameter Models", SC 2020, §3.1): besides the
//! parameters themselves, AdamW keeps per element the first and second moments in f32
//! (4 + 4 bytes), an f32 master copy when the parameter is f16/bf16 (4 bytes; an f32 parameter
//! is its own master), and a gradient buffer in the parameter's dtype, because its step runs
//! after backward and needs every gradient at once. For bf16 parameters that is 14 bytes per
//! element (ZeRO's 2 + 12), for f32 parameters 12. LOMO and AdaLomo need no gradient buffers of
//! their own (the trainer's gradient lives only until it is submitted), so they are not counted;
//! the opt-in gradient accumulation buffers (`lomo_accum_enable`) are, as workspace.

use crate::dtype::DType;
use crate::optimizer::Optimizer;
use crate::param::Device;

/// Bytes AdamW with f32 master weights needs for `numel` elements of `dtype`, excluding the
/// parameters themselves (see the module docs).
pub fn adamw_bytes(numel: usize, dtype: DType) -> u64 {
    let master = if dtype == DType::F32 { 0 } else { 4 };
    // Saturating: registered shapes fit 64 bits at 4 bytes per element, not always at 14.
    (numel as u64).saturating_mul(4 + 4 + master + dtype.size() as u64)
}

/// Memory of the parameters on one device (or of all of them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceMemory {
    pub params: u64,
    pub elements: u64,
    /// The caller's parameter buffers (not owned by the optimizer).
    pub param_bytes: u64,
    /// Optimizer state owned by the library (AdaLomo's second-moment estimates).
    pub state_bytes: u64,
    /// Scratch memory owned by the library, sized at registration, and the gradient
    /// accumulation buffers (`lomo_accum_enable`).
    pub workspace_bytes: u64,
    /// What AdamW would need for the same parameters ([`adamw_bytes`]).
    pub adamw_bytes: u64,
}

impl DeviceMemory {
    fn add(&mut self, o: &DeviceMemory) {
        self.params = self.params.saturating_add(o.params);
        self.elements = self.elements.saturating_add(o.elements);
        self.param_bytes = self.param_bytes.saturating_add(o.param_bytes);
        self.state_bytes = self.state_bytes.saturating_add(o.state_bytes);
        self.workspace_bytes = self.workspace_bytes.saturating_add(o.workspace_bytes);
        self.adamw_bytes = self.adamw_bytes.saturating_add(o.adamw_bytes);
    }
}

/// Totals plus one entry per device that holds parameters (the CPU first, then CUDA ordinals
/// in increasing order).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MemoryStats {
    pub total: DeviceMemory,
    pub devices: Vec<(Device, DeviceMemory)>,
}

fn device_key(d: Device) -> i64 {
    d.raw() as i64
}

/// Accounts every registered parameter of `opt`. CUDA parameters report the device memory
/// allocated for them at registration; the CUDA device's entry also carries the step and tensor
/// records shared by its parameters (as workspace).
pub fn memory_stats(opt: &Optimizer) -> MemoryStats {
    let mut stats = MemoryStats::default();
    for (id, p) in opt.params().iter().enumerate() {
        // The gradient accumulation buffer (lomo_accum_enable) is workspace, on any device.
        let accum = p.inner.lock().accum.as_ref().map_or(0, |a| a.bytes());
        let (state, ws) = match (p.device, opt.cuda()) {
            (Device::Cuda(_), Some(side)) => side.param_memory(id as u32),
            _ => {
                let inner = p.inner.lock();
                let (state, ws) = inner
                    .ada
                    .as_ref()
                    .map_or((0, 0), |a| (a.state.bytes() as u64, a.ws.bytes() as u64));
                // A piece's statistics record (lomo_param_set_shard) is workspace too.
                // So is the logical-order scratch of a strided layout (lomo_param_set_strides).
                let strided = inner.strided.as_ref().map_or(0, |s| s.bytes() as u64);
                (state, ws + 8 * inner.dist_rec.len() as u64 + strided)
            }
        };
        let m = DeviceMemory {
            params: 1,
            elements: p.numel() as u64,
            param_bytes: p.buf.bytes() as u64,
            state_bytes: state,
            workspace_bytes: ws + accum,
            adamw_bytes: adamw_bytes(p.numel(), p.buf.dtype),
        };
        add(&mut stats, p.device, &m);
    }
    // The gradient scratch of LOMO_GRAD_ALL_REDUCE / REDUCE_SCATTER pieces of CPU parameters
    // (CUDA parameters': device memory, in the CUDA side's shared bytes below).
    let scratch = opt.dist.scratch.bytes() as u64;
    if scratch > 0 {
        let m = DeviceMemory {
            workspace_bytes: scratch,
            ..DeviceMemory::default()
        };
        add(&mut stats, Device::Cpu, &m);
    }
    if let (Some(side), Some(p)) = (opt.cuda(), opt.params().first()) {
        let records = DeviceMemory {
            workspace_bytes: side.records_bytes(),
            ..DeviceMemory::default()
        };
        add(&mut stats, p.device, &records);
    }
    stats
}

fn add(stats: &mut MemoryStats, device: Device, m: &DeviceMemory) {
    stats.total.add(m);
    let pos = stats
        .devices
        .binary_search_by_key(&device_key(device), |(d, _)| device_key(*d));
    match pos {
        Ok(i) => stats.devices[i].1.add(m),
        Err(i) => stats.devices.insert(i, (device, *m)),
    }
}
