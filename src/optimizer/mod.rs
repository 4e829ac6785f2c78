//! Core layer: the optimizer — registry, groups and the loss scaler; the step state machine is
//! in `step`.
//!
//! Protocol (design.md §3): `begin(Norm)` → submits accumulate Σg² → `end` forms the clip
//! coefficient and the overflow decision; `begin(Update)` → each submit updates its parameter in
//! place → `end` advances the loss scaler and the step counter. `submit` takes `&self` and may run
//! on several threads at once (each parameter has its own lock); everything else takes `&mut self`.

use std::collections::{BTreeMap, HashMap};

use crate::backend::cuda::abi::LomoStep;
use crate::backend::cuda::device::ParamSpec;
use crate::backend::cuda::passes::Shape;
use crate::backend::cuda::side::CudaSide;
use crate::backend::RawBuf;
use crate::config::{Algorithm, Config, LossScaleMode};
use crate::error::{bail, Result};
use crate::param::{Device, Param, ParamDesc};
use crate::scaler::LossScaler;

mod accum;
mod dist;
mod grad;
mod step;
pub(crate) use step::BATCH_CHUNK;
mod strides;

pub use accum::{AccumBuf, AccumBuffer, AccumReduction, AccumSettings};
pub use dist::ShardDesc;

/// The two kinds of backward pass in a step.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Gradients only contribute to the global norm and the overflow check.
    Norm = 0,
    /// Gradients update their parameters.
    Update = 1,
    /// Gradients are added into their parameters' accumulation buffers (`lomo_accum_enable`):
    /// a micro-batch before the step's own NORM/UPDATE phases. Nothing is updated.
    Accumulate = 2,
}

impl TryFrom<u32> for Phase {
    type Error = crate::error::Error;
    fn try_from(v: u32) -> Result<Phase> {
        match v {
            0 => Ok(Phase::Norm),
            1 => Ok(Phase::Update),
            2 => Ok(Phase::Accumulate),
            _ => bail!(
                InvalidArgument,
                "unknown phase {v} (expected 0=NORM, 1=UPDATE, 2=ACCUMULATE)"
            ),
        }
    }
}

/// Where the optimizer is within a step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StepState {
    Idle,
    Norm,
    /// A NORM phase ended; an UPDATE phase must follow.
    NormDone(NormResult),
    Update {
        lr: f64,
        norm: Option<NormResult>,
    },
    /// An ACCUMULATE phase (gradient accumulation) is active.
    Accumulate,
}

/// What a NORM phase found.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NormResult {
    pub sum_sq: f64,
    pub overflow: bool,
    pub coef: f32,
}

/// Per-group hyperparameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Group {
    pub lr_multiplier: f64,
    pub weight_decay: f64,
}

/// Diagnostics of the last completed phase / step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepInfo {
    /// Completed, applied UPDATE phases (AdaLomo's t of the last update).
    pub step: u64,
    /// Global norm of the unscaled gradients from the last NORM phase (NaN if none or overflow).
    pub grad_norm: f32,
    /// Clip coefficient used by the last UPDATE phase (1 when norm clipping is off).
    pub clip_coef: f32,
    /// Loss scale the last step's gradients were multiplied by.
    pub loss_scale: f32,
    /// Loss scale for the next step.
    pub next_loss_scale: f32,
    /// A non-finite gradient was seen in the last step.
    pub overflow: bool,
    /// The last step was skipped entirely (overflow found in its NORM phase).
    pub skipped: bool,
    pub skipped_total: u64,
    /// Gradients submitted in the last phase, and how many of them were non-finite.
    pub grads_submitted: u32,
    pub grads_nonfinite: u32,
}

impl StepInfo {
    /// Diagnostics from the CUDA backend's step record (`kernels/step.cu` fills its `info_*`
    /// fields); `submitted` is counted on the host.
    fn from_device(s: &LomoStep, submitted: u32) -> StepInfo {
        StepInfo {
            step: s.info_step,
            grad_norm: s.info_grad_norm,
            clip_coef: s.info_clip_coef,
            loss_scale: s.info_loss_scale,
            next_loss_scale: s.info_next_loss_scale,
            overflow: s.info_overflow != 0,
            skipped: s.info_skipped != 0,
            skipped_total: s.skipped_total,
            grads_submitted: submitted,
            grads_nonfinite: s.info_nonfinite,
        }
    }

    /// Diagnostics before any phase has run (after creation or a state load).
    fn fresh(step: u64, skipped_total: u64, scale: f32) -> StepInfo {
        StepInfo {
            step,
            grad_norm: f32::NAN,
            clip_coef: 1.0,
            loss_scale: scale,
            next_loss_scale: scale,
            overflow: false,
            skipped: false,
            skipped_total,
            grads_submitted: 0,
            grads_nonfinite: 0,
        }
    }
}

/// A LOMO or AdaLomo optimizer over caller-owned parameter buffers.
#[derive(Debug)]
pub struct Optimizer {
    pub(crate) config: Config,
    pub(crate) groups: BTreeMap<u32, Group>,
    pub(crate) params: Vec<Param>,
    names: HashMap<String, u32>,
    pub(crate) scaler: LossScaler,
    pub(crate) state: StepState,
    /// Incremented by every `begin`; a parameter's epoch equal to it means "already submitted".
    epoch: u64,
    /// Applied UPDATE phases so far.
    pub(crate) steps: u64,
    pub(crate) skipped_total: u64,
    info: StepInfo,
    /// The device side when the parameters live on a CUDA device (all on one device).
    cuda: Option<CudaSide>,
    /// Communicators, the norm group and the agreement check (`lomo_comm_add`, `lomo_dist_set`).
    pub(crate) dist: crate::dist::Dist,
    /// Gradient accumulation options (`lomo_accum_enable`), when on.
    accum: Option<AccumSettings>,
    /// ACCUMULATE phases completed in the current step.
    pub(crate) accum_micro: u32,
}

impl Optimizer {
    pub fn new(config: Config) -> Result<Optimizer> {
        config.validate()?;
        let scaler = LossScaler::new(&config);
        let mut groups = BTreeMap::new();
        groups.insert(
            0,
            Group {
                lr_multiplier: 1.0,
                weight_decay: config.weight_decay,
            },
        );
        let scale = scaler.scale() as f32;
        Ok(Optimizer {
            config,
            groups,
            params: Vec::new(),
            names: HashMap::new(),
            scaler,
            state: StepState::Idle,
            epoch: 0,
            steps: 0,
            skipped_total: 0,
            info: StepInfo::fresh(0, 0, scale),
            cuda: None,
            dist: crate::dist::Dist::default(),
            accum: None,
            accum_micro: 0,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// Sets (or creates) a group's lr multiplier and weight decay.
    pub fn group_set(&mut self, group: u32, lr_multiplier: f64, weight_decay: f64) -> Result<()> {
        if !(lr_multiplier.is_finite() && lr_multiplier >= 0.0) {
            bail!(
                InvalidArgument,
                "group {group}: lr multiplier must be finite and >= 0, got {lr_multiplier}"
            );
        }
        if !(weight_decay.is_finite() && weight_decay >= 0.0) {
            bail!(
                InvalidArgument,
                "group {group}: weight decay must be finite and >= 0, got {weight_decay}"
            );
        }
        self.groups.insert(
            group,
            Group {
                lr_multiplier,
                weight_decay,
            },
        );
        Ok(())
    }

    pub fn group_get(&self, group: u32) -> Result<Group> {
        match self.groups.get(&group) {
            Some(g) => Ok(*g),
            None => bail!(
                InvalidArgument,
                "group {group} does not exist (create it with lomo_group_set)"
            ),
        }
    }

    /// Registers a parameter between steps; returns its id (ids are dense, from 0).
    pub fn register(&mut self, desc: &ParamDesc<'_>) -> Result<u32> {
        if self.state != StepState::Idle {
            bail!(
                PhaseError,
                "parameters can only be registered between steps"
            );
        }
        if self.names.contains_key(desc.name) {
            bail!(
                InvalidArgument,
                "a parameter named '{}' is already registered",
                desc.name
            );
        }
        self.group_get(desc.group)?;
        let on_cpu = self.params.iter().any(|p| p.device == Device::Cpu);
        match desc.device {
            Device::Cuda(n) if on_cpu => bail!(
                DeviceMismatch,
                "parameter '{}' is on CUDA device {n}, but this optimizer already has CPU \
                 parameters: one optimizer's parameters must all be on one device",
                desc.name
            ),
            Device::Cuda(_)
                if self.config.nonfinite == crate::config::NonFinitePolicy::PerElement =>
            {
                bail!(
                    Unsupported,
                    "parameter '{}' is on CUDA, but this optimizer's nonfinite_policy is \
                     PER_ELEMENT, which only the CPU backend implements so far",
                    desc.name
                )
            }
            Device::Cpu if self.cuda.is_some() => bail!(
                DeviceMismatch,
                "parameter '{}' is on the CPU, but this optimizer already has CUDA parameters: \
                 one optimizer's parameters must all be on one device",
                desc.name
            ),
            _ => {}
        }
        if self.params.len() >= u32::MAX as usize {
            bail!(InvalidArgument, "too many parameters");
        }
        // Room for the new entry first, so that nothing after the allocations below can fail:
        // a registration that fails (out of memory included) leaves the registry as it was.
        crate::alloc::reserve(&mut self.params, 1, "the parameter registry")?;
        self.names
            .try_reserve(1)
            .map_err(|_| crate::alloc::out_of_memory(64, "the parameter registry"))?;
        let mut param = Param::new(desc, self.config.algorithm)?;
        let (accum, numel) = (self.accum, param.numel());
        if desc.device == Device::Cpu {
            param.inner.get_mut().accum = accum::buffer_for(accum, None, numel, desc.dtype)?;
        }
        let id = self.params.len() as u32;
        if let Device::Cuda(n) = desc.device {
            let mut created = None;
            let side = match self.cuda.as_mut() {
                Some(s) => s,
                None => created.insert(CudaSide::new(n, &self.config)?),
            };
            let spec = ParamSpec {
                param_id: id,
                p: param.buf.addr as u64,
                dtype: param.buf.dtype,
                shape: Shape::new(
                    param.numel() as u64,
                    param.rows as u64,
                    param.cols as u64,
                    param.factored,
                ),
            };
            param.inner.get_mut().accum = accum::buffer_for(accum, Some(side), numel, desc.dtype)?;
            side.register(n, &spec)?;
            if created.is_some() {
                self.cuda = created;
            }
        }
        self.names.insert(param.name.clone(), id);
        self.params.push(param);
        Ok(id)
    }

    /// The id of the parameter registered under `name`.
    pub fn param_id(&self, name: &str) -> Option<u32> {
        self.names.get(name).copied()
    }

    /// The scale the trainer multiplies its loss by before the next backward, as the host knows
    /// it: exact for CPU parameters and fixed scales; see [`Optimizer::try_loss_scale`] for a
    /// dynamic scale of CUDA parameters (it lives on the device).
    pub fn loss_scale(&self) -> f64 {
        self.scaler.scale()
    }

    /// As [`Optimizer::loss_scale`]; with dynamic scaling of CUDA parameters the scale lives on
    /// the device and is read from there (synchronizes). A fixed scale never needs the device.
    pub fn try_loss_scale(&self) -> Result<f64> {
        match &self.cuda {
            Some(side) if self.config.loss_scale_mode == LossScaleMode::Dynamic => {
                side.loss_scale()
            }
            _ => Ok(self.scaler.scale()),
        }
    }

    /// Host-side diagnostics (CPU parameters; see [`Optimizer::try_step_info`] for CUDA).
    pub fn step_info(&self) -> StepInfo {
        self.info
    }

    /// Diagnostics of the last phase and step; for CUDA parameters they are read from the
    /// device (synchronizes).
    pub fn try_step_info(&self) -> Result<StepInfo> {
        match &self.cuda {
            Some(side) => Ok(StepInfo::from_device(
                &side.step_record()?,
                self.info.grads_submitted,
            )),
            None => Ok(self.info),
        }
    }

    /// The device side, when the parameters live on a CUDA device.
    pub(crate) fn cuda(&self) -> Option<&CudaSide> {
        self.cuda.as_ref()
    }

    /// Device address of the f32 loss scale for the next backward (CUDA parameters only).
    pub fn cuda_loss_scale_ptr(&self) -> Result<u64> {
        match &self.cuda {
            Some(side) => Ok(side.loss_scale_ptr()),
            None => bail!(
                Unsupported,
                "the optimizer has no CUDA parameters (register one before asking for device pointers)"
            ),
        }
    }

    /// Whether the parameters live on a CUDA device.
    pub fn is_cuda(&self) -> bool {
        self.cuda.is_some()
    }

    /// The caller buffer of parameter `id` (used by state I/O and tests).
    pub fn param_buf(&self, id: u32) -> Option<RawBuf> {
        self.params.get(id as usize).map(|p| p.buf)
    }

    /// Replaces the step counters and the loss scaler (after a state load); the diagnostics
    /// then describe the restored position.
    pub(crate) fn restore_counters(&mut self, steps: u64, skipped_total: u64, scaler: LossScaler) {
        self.steps = steps;
        self.skipped_total = skipped_total;
        self.scaler = scaler;
        let scale = self.scaler.scale() as f32;
        self.info = StepInfo::fresh(steps, skipped_total, scale);
    }

    pub fn algorithm(&self) -> Algorithm {
        self.config.algorithm
    }
}
