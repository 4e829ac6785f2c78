//! CUDA backend: what the core holds for an optimizer whose parameters live on a CUDA device —
//! the device, the launcher chosen for it and the [`DeviceOpt`] orchestration — and the launcher
//! selection (`LOMO_CUDA_EMULATE=1` picks the host emulation in builds with the
//! `cuda-emulation` feature, i.e. the tests; otherwise the cudarc driver path).

use std::collections::HashMap;
use std::sync::Arc;

use once_cell::sync::Lazy;
use parking_lot::Mutex;

use super::abi::LomoStep;
use super::device::{DeviceOpt, ParamSpec};
use super::launcher::Launcher;
use super::snapshot::DeviceCounters;
use super::step::{CudaStep, CudaTensor};
use crate::backend::RawBuf;
use crate::config::Config;
use crate::error::{bail, Result};

/// Emulated "device" size: grids are sized as on a GPU with this many SMs.
#[cfg(feature = "cuda-emulation")]
const EMU_SMS: u32 = 4;

/// Whether the emulated launcher was requested (`LOMO_CUDA_EMULATE=1`) and is built in (the
/// `cuda-emulation` feature, for tests; a release library ignores the variable).
pub fn emulated() -> bool {
    #[cfg(test)]
    if EMULATE_ON_THIS_THREAD.with(|e| e.get()) {
        return true;
    }
    cfg!(feature = "cuda-emulation") && std::env::var("LOMO_CUDA_EMULATE").is_ok_and(|v| v == "1")
}

/// The host-emulated launcher (tests only).
#[cfg(feature = "cuda-emulation")]
fn emu_launcher() -> Result<Arc<dyn Launcher>> {
    Ok(Arc::new(super::emu::EmuLauncher::new(EMU_SMS)))
}

#[cfg(not(feature = "cuda-emulation"))]
fn emu_launcher() -> Result<Arc<dyn Launcher>> {
    bail!(
        NoCuda,
        "this build has no CUDA emulation (feature \"cuda-emulation\", for tests)"
    )
}

#[cfg(test)]
thread_local! {
    static EMULATE_ON_THIS_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Unit tests: [`emulated`] is true on the calling thread while the guard lives. The library's
/// unit tests run on parallel threads of one process, so the process-wide `LOMO_CUDA_EMULATE`
/// would change the others (e.g. the no-driver checks).
#[cfg(test)]
pub fn emulate_on_this_thread() -> EmulationGuard {
    EMULATE_ON_THIS_THREAD.with(|e| e.set(true));
    EmulationGuard(())
}

/// Ends [`emulate_on_this_thread`] on drop.
#[cfg(test)]
pub struct EmulationGuard(());

#[cfg(test)]
impl Drop for EmulationGuard {
    fn drop(&mut self) {
        EMULATE_ON_THIS_THREAD.with(|e| e.set(false));
    }
}

/// A launcher for CUDA device `ordinal`: under emulation a fresh one; on a real device the
/// process-wide one (see `shared_launcher`).
pub fn launcher_for(ordinal: i32) -> Result<Arc<dyn Launcher>> {
    if emulated() {
        return emu_launcher();
    }
    shared_launcher(false, ordinal)
}

#[cfg(feature = "cuda")]
fn driver_launcher(ordinal: i32) -> Result<Arc<dyn Launcher>> {
    Ok(Arc::new(super::driver::DriverLauncher::new(ordinal)?))
}

#[cfg(not(feature = "cuda"))]
fn driver_launcher(ordinal: i32) -> Result<Arc<dyn Launcher>> {
    bail!(NoCuda, "CUDA device {ordinal} requested, but this build has no CUDA backend (feature \"cuda\" is off)")
}

/// Process-wide launchers by (emulated, ordinal).
type SharedLaunchers = HashMap<(bool, i32), Arc<dyn Launcher>>;
static SHARED: Lazy<Mutex<SharedLaunchers>> = Lazy::new(|| Mutex::new(HashMap::new()));

/// The process-wide launcher of device `ordinal`, created at first use and kept for the life of
/// the process. A real device's launcher holds a retain on the device's primary context, so the
/// modules loaded into it stay valid however many optimizers come and go (were the last retain
/// released, the context could be destroyed and the cached kernel handles would dangle); it
/// also spares each optimizer the device queries.
fn shared_launcher(emu: bool, ordinal: i32) -> Result<Arc<dyn Launcher>> {
    let mut shared = SHARED.lock();
    if let Some(l) = shared.get(&(emu, ordinal)) {
        return Ok(l.clone());
    }
    let l = if emu {
        emu_launcher()?
    } else {
        driver_launcher(ordinal)?
    };
    shared.insert((emu, ordinal), l.clone());
    Ok(l)
}

/// The process-wide launcher of the device that owns device memory at `ptr`, and its ordinal:
/// for callers without an optimizer (the XLA handlers), where creating a launcher per call
/// would be too slow. Under emulation every pointer belongs to device 0.
pub fn shared_launcher_for_pointer(ptr: u64) -> Result<(i32, Arc<dyn Launcher>)> {
    let emu = emulated();
    let ordinal = if emu { 0 } else { pointer_device(ptr)? };
    Ok((ordinal, shared_launcher(emu, ordinal)?))
}

#[cfg(feature = "cuda")]
fn pointer_device(ptr: u64) -> Result<i32> {
    super::driver::pointer_device(ptr)
}

#[cfg(not(feature = "cuda"))]
fn pointer_device(_ptr: u64) -> Result<i32> {
    bail!(
        NoCuda,
        "this build has no CUDA backend (feature \"cuda\" is off)"
    )
}

/// Whether CUDA parameters can be registered (emulation, or a driver with a device).
pub fn available() -> bool {
    if emulated() {
        return true;
    }
    #[cfg(feature = "cuda")]
    {
        super::driver::device_count() > 0
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

/// The CUDA half of an optimizer.
#[derive(Debug)]
pub struct CudaSide {
    pub ordinal: i32,
    pub dev: DeviceOpt,
    /// Device index of each optimizer parameter id.
    index: Vec<usize>,
    /// Where gradients reduced by the library land (`LOMO_GRAD_ALL_REDUCE`,
    /// `LOMO_GRAD_REDUCE_SCATTER`), device memory shared by the parameters: (send, recv), as
    /// `crate::dist::GradScratch` on the host; sized at `lomo_param_set_shard`.
    grad_scratch: (Option<super::accum::DevBuf>, Option<super::accum::DevBuf>),
}

impl CudaSide {
    pub fn new(ordinal: i32, cfg: &Config) -> Result<CudaSide> {
        let launcher = launcher_for(ordinal)?;
        Ok(CudaSide {
            ordinal,
            dev: DeviceOpt::new(launcher, cfg)?,
            index: Vec::new(),
            grad_scratch: (None, None),
        })
    }

    /// Registers parameter `spec.param_id` of CUDA device `ordinal` (ids arrive densely, in
    /// order).
    pub fn register(&mut self, ordinal: i32, spec: &ParamSpec) -> Result<()> {
        if ordinal != self.ordinal {
            bail!(DeviceMismatch, "all CUDA parameters of one optimizer must be on one device: this one has device {} and the new one device {ordinal}", self.ordinal);
        }
        debug_assert_eq!(spec.param_id as usize, self.index.len());
        crate::alloc::reserve(&mut self.index, 1, "the CUDA parameter index")?;
        let i = self.dev.register(spec)?;
        self.index.push(i);
        Ok(())
    }

    /// The CUDA backend of this optimizer on `stream` (see [`DeviceOpt::step`]).
    pub fn step(&self, stream: usize) -> CudaStep<'_> {
        self.dev.step(stream)
    }

    /// Parameter `id` as the passes see it, with its gradient checked (see
    /// [`DeviceOpt::tensor`]).
    pub fn tensor(&self, id: u32, g: &RawBuf) -> Result<CudaTensor> {
        self.dev.tensor(self.index[id as usize], g)
    }

    /// Declares parameter `id` a piece of rows or columns, or the whole tensor (see [`DeviceOpt::set_shard`]).
    pub fn set_shard(
        &mut self,
        id: u32,
        piece: Option<super::piece::PieceSpec>,
        norm_duplicate: bool,
    ) -> Result<()> {
        self.dev
            .set_shard(self.index[id as usize], piece, norm_duplicate)
    }

    /// Grows the device gradient scratch to at least `send` and `recv` bytes (allocated before
    /// the old one is freed: on failure nothing changed). Waits for the device when it grows
    /// (between steps only).
    pub fn reserve_grad_scratch(&mut self, send: usize, recv: usize) -> Result<()> {
        let have = |b: &Option<super::accum::DevBuf>| b.as_ref().map_or(0, |b| b.bytes);
        let grow = |b: &Option<super::accum::DevBuf>, n: usize| -> Result<_> {
            Ok(if n > have(b) {
                Some(self.alloc_buffer(n)?)
            } else {
                None
            })
        };
        let (s, r) = (
            grow(&self.grad_scratch.0, send)?,
            grow(&self.grad_scratch.1, recv)?,
        );
        if s.is_some() || r.is_some() {
            // Kernels of an earlier step may still read the old buffers.
            self.dev.read_step(self.dev.last_stream())?;
        }
        if let Some(s) = s {
            self.grad_scratch.0 = Some(s);
        }
        if let Some(r) = r {
            self.grad_scratch.1 = Some(r);
        }
        Ok(())
    }

    /// Device addresses of the gradient scratch (send, recv; 0 when not allocated).
    pub fn grad_scratch(&self) -> (u64, u64) {
        let at = |b: &Option<super::accum::DevBuf>| b.as_ref().map_or(0, |b| b.ptr);
        (at(&self.grad_scratch.0), at(&self.grad_scratch.1))
    }

    /// Enqueues a copy of `bytes` bytes of device memory on `stream`.
    pub fn copy_device(&self, dst: u64, src: u64, bytes: usize, stream: usize) -> Result<()> {
        self.dev.launcher.copy_device(dst, src, bytes, stream)
    }

    /// Checks that `g` is device memory of its size on this optimizer's device.
    pub fn check_grad(&self, g: &RawBuf, what: &str) -> Result<()> {
        self.dev
            .launcher
            .check_buffer(g.addr as u64, g.bytes() as u64, what)
    }

    /// Enqueues `buf ← buf / divisor` (or `buf ← 0` with `zero`) on `stream`
    /// ([`super::accum::scale`]).
    pub fn scale(&self, buf: &RawBuf, divisor: f32, zero: bool, stream: usize) -> Result<()> {
        super::accum::scale(&*self.dev.launcher, buf, divisor, zero, stream)
    }

    /// The device step record (diagnostics, counters, scaler), copied back after the stream of
    /// the latest launch (synchronizes). The core turns it into its `StepInfo`.
    pub fn step_record(&self) -> Result<LomoStep> {
        self.dev.read_step(self.dev.last_stream())
    }

    /// Kernels this optimizer has launched so far (diagnostics: launches per step).
    pub fn launches(&self) -> u64 {
        self.dev.launches()
    }

    /// Device address of the f32 loss scale for the next backward.
    pub fn loss_scale_ptr(&self) -> u64 {
        self.dev.loss_scale_ptr()
    }

    /// The loss scale for the next backward (synchronizes).
    pub fn loss_scale(&self) -> Result<f64> {
        Ok(self.dev.read_step(self.dev.last_stream())?.scale)
    }

    /// Parameter `id`'s AdaLomo state, copied to the host (see [`DeviceOpt::read_state`]).
    pub fn read_state(&self, id: u32) -> Result<(Vec<f32>, Vec<f32>)> {
        self.dev
            .read_state(self.index[id as usize], self.dev.last_stream())
    }

    /// Overwrites parameter `id`'s AdaLomo state from the host.
    pub fn write_state(&self, id: u32, a: &[f32], b: &[f32]) -> Result<()> {
        self.dev.write_state(self.index[id as usize], a, b)
    }

    /// Step counters and loss-scaler state (synchronizes).
    pub fn counters(&self) -> Result<DeviceCounters> {
        self.dev.counters(self.dev.last_stream())
    }

    /// Replaces the step counters and loss-scaler state (synchronizes).
    pub fn restore_counters(&self, c: &DeviceCounters) -> Result<()> {
        self.dev.restore_counters(c, self.dev.last_stream())
    }

    /// Device bytes of parameter `id`: (optimizer state, workspaces).
    pub fn param_memory(&self, id: u32) -> (u64, u64) {
        self.dev.param_memory(self.index[id as usize])
    }

    /// A gradient accumulation buffer of `bytes` bytes on this device (contents unspecified).
    pub fn alloc_buffer(&self, bytes: usize) -> Result<super::accum::DevBuf> {
        super::accum::DevBuf::new(self.dev.launcher.clone(), bytes)
    }

    /// Device bytes shared by all parameters (step and tensor records, the gradient scratch).
    pub fn records_bytes(&self) -> u64 {
        let held = |b: &Option<super::accum::DevBuf>| b.as_ref().map_or(0, |b| b.bytes as u64);
        self.dev.records_bytes() + held(&self.grad_scratch.0) + held(&self.grad_scratch.1)
    }
}
