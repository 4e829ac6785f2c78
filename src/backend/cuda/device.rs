//! CUDA backend: one optimizer's CUDA parameters — device records, workspaces and launch
//! geometry — over any [`Launcher`].
//!
//! Everything a step needs lives in device memory allocated here at registration: one
//! `LomoStep` (lr, loss scale, clip coefficient, skip/overflow flags, step counter, the dynamic
//! scaler), one `LomoTensor` per parameter (Σg², flags, AdaLomo scalars, carried Σp²) and each
//! parameter's state and workspace. A phase is a handful of launches on the caller's stream and
//! never waits for the device; only [`DeviceOpt::read_step`] (diagnostics) copies back.
//!
//! The passes of one tensor (geometry, workspace sizes, launches: NORM 1, LOMO UPDATE 1 or 2,
//! AdaLomo UPDATE 3 or 2) are in [`super::passes`], the backend interface over them and the step
//! kernels in [`super::step`]; the order of the calls is the core's (`crate::orchestrate`). This
//! module owns the memory: [`DeviceOpt::step`] and [`DeviceOpt::tensor`] hand it to a step.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::abi::*;
use super::launcher::{Counting, Launcher};
use super::passes::{self, Bufs, Layout, Records, Shape, Sizes, Tensor};
use super::step::{CudaStep, CudaTensor, StepRecord};
use crate::backend::RawBuf;
use crate::config::{Algorithm, Config};
use crate::dtype::DType;
use crate::error::{bail, Result};

/// What registering a CUDA parameter takes.
#[derive(Clone, Copy, Debug)]
pub struct ParamSpec {
    /// The optimizer's id of the parameter (ids arrive densely, in order).
    pub param_id: u32,
    /// The caller's device buffer.
    pub p: DevPtr,
    pub dtype: DType,
    pub shape: Shape,
}

/// A CUDA parameter: its passes (layout, buffers allocated at registration).
#[derive(Debug)]
pub(super) struct DevParam {
    pub(super) tensor: Tensor,
}

/// The device side of one optimizer (all of its parameters on one device).
#[derive(Debug)]
pub struct DeviceOpt {
    pub(super) launcher: Arc<dyn Launcher>,
    pub(super) cfg: Config,
    pub(super) step: DevPtr,
    pub(super) tensors: DevPtr,
    pub(super) cap: usize,
    pub(super) params: Vec<DevParam>,
    pub(super) allocs: Vec<DevPtr>,
    pub(super) max_blocks: u32,
    /// Distributed steps: the phase record and a staging area (`step::SCRATCH_F64` f64).
    pub(super) scratch: DevPtr,
    /// The stream of the latest launch: read-backs and re-allocations wait for it.
    last_stream: AtomicUsize,
    /// Counts the launches of this optimizer (`launcher` is it).
    counting: Arc<Counting>,
}

impl Drop for DeviceOpt {
    fn drop(&mut self) {
        for &p in &self.allocs {
            self.launcher.free(p);
        }
        self.launcher.free(self.step);
        self.launcher.free(self.tensors);
        self.launcher.free(self.scratch);
    }
}

impl DeviceOpt {
    pub fn new(launcher: Arc<dyn Launcher>, cfg: &Config) -> Result<DeviceOpt> {
        let counting = Arc::new(Counting::new(launcher));
        let launcher: Arc<dyn Launcher> = counting.clone();
        let step = launcher.alloc(std::mem::size_of::<LomoStep>())?;
        let scale = cfg.initial_scale();
        let init = LomoStep {
            inv_scale: (1.0 / scale) as f32,
            coef: 1.0,
            scale,
            cur_hysteresis: cfg.hysteresis.max(1),
            last_overflow_iter: -1,
            info_grad_norm: f32::NAN,
            info_clip_coef: 1.0,
            info_loss_scale: scale as f32,
            info_next_loss_scale: scale as f32,
            scale_f32: scale as f32,
            ..LomoStep::default()
        };
        let cap = 16;
        let records = cap * std::mem::size_of::<LomoTensor>();
        // On failure, free what was allocated (the launcher may outlive this optimizer).
        let tensors = (|| {
            launcher.copy_from_host(step, as_bytes(&init))?;
            let zeros = crate::alloc::zeros::<u8>(records, "the CUDA tensor records")?;
            let tensors = launcher.alloc(records)?;
            if let Err(e) = launcher.copy_from_host(tensors, &zeros) {
                launcher.free(tensors);
                return Err(e);
            }
            Ok(tensors)
        })();
        let tensors = match tensors {
            Ok(t) => t,
            Err(e) => {
                launcher.free(step);
                return Err(e);
            }
        };
        let scratch = match launcher.alloc(8 * super::step::SCRATCH_F64) {
            Ok(p) => p,
            Err(e) => {
                launcher.free(step);
                launcher.free(tensors);
                return Err(e);
            }
        };
        let max_blocks = passes::max_blocks(&*launcher);
        Ok(DeviceOpt {
            launcher,
            cfg: cfg.clone(),
            step,
            tensors,
            cap,
            params: Vec::new(),
            allocs: Vec::new(),
            max_blocks,
            scratch,
            last_stream: AtomicUsize::new(0),
            counting,
        })
    }

    /// The device address of the f32 loss scale for the next backward (in the step record).
    pub fn loss_scale_ptr(&self) -> DevPtr {
        self.step + std::mem::offset_of!(LomoStep, scale_f32) as u64
    }

    /// A workspace: contents unspecified (every kernel writes before it reads). Recorded in
    /// `got` (freed by the caller if the registration fails).
    pub(super) fn alloc(&self, bytes: usize, got: &mut Vec<DevPtr>) -> Result<DevPtr> {
        if bytes == 0 {
            return Ok(0);
        }
        let p = self.launcher.alloc(bytes)?;
        got.push(p);
        Ok(p)
    }

    /// Optimizer state: starts at zero (copied from a bounded host buffer of zeros).
    pub(super) fn alloc_zeroed(&self, bytes: usize, got: &mut Vec<DevPtr>) -> Result<DevPtr> {
        let p = self.alloc(bytes, got)?;
        if p != 0 {
            let zeros = crate::alloc::zeros::<u8>(bytes.min(1 << 20), "zeroing device state")?;
            let mut at = 0;
            while at < bytes {
                let n = zeros.len().min(bytes - at);
                self.launcher.copy_from_host(p + at as u64, &zeros[..n])?;
                at += n;
            }
        }
        Ok(p)
    }

    /// A parameter's state and workspace buffers of sizes `s` (each allocation listed in `got`).
    pub(super) fn alloc_bufs(&self, s: &Sizes, got: &mut Vec<DevPtr>) -> Result<Bufs> {
        Ok(Bufs {
            partials: self.alloc(s.partials, got)?,
            state_a: self.alloc_zeroed(s.state_a, got)?,
            state_b: self.alloc_zeroed(s.state_b, got)?,
            ws_a: self.alloc(s.ws_a, got)?,
            ws_r: self.alloc(s.ws_r, got)?,
            ws_c: self.alloc(s.ws_c, got)?,
            col_part: self.alloc(s.col_part, got)?,
        })
    }

    /// Ends an all-or-nothing allocation: on success the optimizer owns the buffers in `got`
    /// from now on (freed with it); on failure they are freed, and the optimizer is as before.
    pub(super) fn settle<T>(&mut self, result: Result<T>, got: Vec<DevPtr>) -> Result<T> {
        match result {
            Ok(v) => {
                self.allocs.extend(got);
                Ok(v)
            }
            Err(e) => {
                for p in got {
                    self.launcher.free(p);
                }
                Err(e)
            }
        }
    }

    pub(super) fn tensor_ptr(&self, i: usize) -> DevPtr {
        self.tensors + (i * std::mem::size_of::<LomoTensor>()) as u64
    }

    /// Registers a parameter (between steps): allocates its record, state and workspaces.
    pub fn register(&mut self, spec: &ParamSpec) -> Result<usize> {
        let p = spec.p;
        self.launcher.check_buffer(
            p,
            spec.shape.numel * spec.dtype.size() as u64,
            "the parameter",
        )?;
        let ada = self.cfg.algorithm == Algorithm::Adalomo;
        let layout = Layout::new(spec.shape, ada, self.max_blocks, self.launcher.max_smem());
        let s = layout.sizes();
        // Everything is allocated before anything is recorded: on failure (out of device memory
        // included) the buffers allocated so far are freed and the optimizer is as it was.
        let mut got = Vec::with_capacity(7);
        let result = (|| {
            crate::alloc::reserve(&mut self.params, 1, "the CUDA parameter list")?;
            crate::alloc::reserve(&mut self.allocs, 7, "the CUDA allocation list")?;
            let bufs = self.alloc_bufs(&s, &mut got)?;
            if self.params.len() == self.cap {
                self.grow()?;
            }
            Ok(bufs)
        })();
        let bufs = self.settle(result, got)?;
        self.params.push(DevParam {
            tensor: Tensor {
                layout,
                bufs,
                p,
                p_dtype: spec.dtype,
                piece: None,
            },
        });
        Ok(self.params.len() - 1)
    }

    /// Doubles the tensor-record array, keeping the records (registration only).
    fn grow(&mut self) -> Result<()> {
        let sz = std::mem::size_of::<LomoTensor>();
        let cap = self.cap * 2;
        let mut old = crate::alloc::zeros::<u8>(cap * sz, "the CUDA tensor records")?;
        self.launcher.copy_to_host(
            &mut old[..self.cap * sz],
            self.tensors,
            self.last_stream.load(Ordering::Relaxed),
        )?;
        let fresh = self.launcher.alloc(cap * sz)?;
        if let Err(e) = self.launcher.copy_from_host(fresh, &old) {
            self.launcher.free(fresh);
            return Err(e);
        }
        self.launcher.free(self.tensors);
        self.tensors = fresh;
        self.cap = cap;
        Ok(())
    }

    fn step_args(&self, phase: u32, lr: f32) -> StepArgs {
        let c = &self.cfg;
        StepArgs {
            step: self.step,
            tensors: self.tensors,
            n_tensors: self.params.len() as u32,
            phase,
            lr,
            loss_scale_mode: c.loss_scale_mode as u32,
            clip_grad_norm: c.clip_grad_norm,
            decay_rate: if c.algorithm == Algorithm::Adalomo {
                c.decay_rate
            } else {
                0.0
            },
            scale_factor: c.scale_factor,
            min_scale: c.min_loss_scale,
            scale_window: c.scale_window,
            hysteresis: c.hysteresis.max(1),
            rec: self.scratch,
            reduced: 0,
            pad: 0,
        }
    }

    /// This optimizer's CUDA backend on `stream` (the stream of the latest launch from now on).
    pub fn step(&self, stream: usize) -> CudaStep<'_> {
        self.last_stream.store(stream, Ordering::Relaxed);
        CudaStep {
            launcher: &*self.launcher,
            cfg: &self.cfg,
            stream,
            record: StepRecord::Optimizer(self.step_args(0, 0.0)),
        }
    }

    /// Parameter `idx` as the passes see it, after checking that the gradient `g` is device
    /// memory of its size.
    pub fn tensor(&self, idx: usize, g: &RawBuf) -> Result<CudaTensor> {
        let Some(dp) = self.params.get(idx) else {
            bail!(UnknownParam, "no CUDA parameter with index {idx}");
        };
        let bytes = dp.tensor.layout.shape.numel * g.dtype.size() as u64;
        self.launcher
            .check_buffer(g.addr as DevPtr, bytes, "the gradient")?;
        Ok(CudaTensor {
            tensor: dp.tensor,
            rec: Records {
                step: self.step,
                t: self.tensor_ptr(idx),
            },
        })
    }

    /// Kernels this optimizer has launched so far.
    pub fn launches(&self) -> u64 {
        self.counting.launches()
    }

    /// The stream of the latest launch (0 before any).
    pub fn last_stream(&self) -> usize {
        self.last_stream.load(Ordering::Relaxed)
    }

    /// Copies the step record back (synchronizes with `stream`).
    pub fn read_step(&self, stream: usize) -> Result<LomoStep> {
        let mut b = vec![0u8; std::mem::size_of::<LomoStep>()];
        self.launcher.copy_to_host(&mut b, self.step, stream)?;
        Ok(from_bytes(&b))
    }
}
