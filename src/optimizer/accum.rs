//! Core layer: gradient accumulation (`lomo_accum_enable`, `LOMO_PHASE_ACCUMULATE`).
//!
//! With accumulation on, every parameter owns a buffer (f32, or the parameter's dtype). A step
//! over `k` micro-batches is `k − 1` ACCUMULATE phases followed by the step's own phases (NORM
//! and UPDATE, or UPDATE), whose backward is the last micro-batch:
//!
//! ```text
//! ACCUMULATE (micro-batch 1..k−1)  submit: acc ← g (first) or acc ← acc + g
//! NORM   (micro-batch k)           submit: acc ← (acc + g)·m, then the NORM pass reads acc
//! UPDATE (micro-batch k again)     submit: the UPDATE pass reads acc (completed by NORM; the
//!                                  submitted gradient is that of the same micro-batch and is
//!                                  not read again) — or, without NORM, acc ← (acc + g)·m first
//! step_end                         parameters with accumulated gradients that received none
//!                                  in this phase run their pass from acc alone
//! ```
//!
//! `m` is 1 for `LOMO_ACCUM_SUM` and `1/k` for `LOMO_ACCUM_MEAN`. Loss scale, clipping (over the
//! accumulated gradients), value clipping and the non-finite checks are those of one step on
//! the completed buffers: the step equals one step on the summed (averaged) gradient, and a
//! non-finite value in any micro-batch propagates into the buffer, so the step overflows as a
//! whole. A step without ACCUMULATE phases (k = 1) does not touch the buffers.
//!
//! Buffers are never saved: checkpoints are refused while accumulated gradients are pending.
//! CPU parameters only for now; distributed optimizers are refused.

use super::{Optimizer, Phase, StepState};
use crate::backend::{AccumOp, RawBuf};
use crate::dtype::DType;
use crate::error::{bail, Result};
use crate::orchestrate;
use crate::param::{Device, ParamInner};

/// The dtype of the accumulation buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccumBuffer {
    /// f32 (4 bytes per element): sums rounded once per micro-batch in f32.
    F32,
    /// The parameter's dtype (2 bytes per element for f16/bf16): each partial sum is rounded to
    /// it; an f16 sum beyond 65504 becomes infinite and the step overflows.
    ParamDtype,
}

/// How the micro-batches' gradients combine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccumReduction {
    /// Σ of the micro-batch gradients (the trainer divides its loss by k itself).
    Sum,
    /// Σ / k, k the number of micro-batches of the step (its ACCUMULATE phases + 1).
    Mean,
}

/// The accumulation options of an optimizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AccumSettings {
    pub buffer: AccumBuffer,
    pub reduction: AccumReduction,
}

impl AccumSettings {
    fn dtype_for(&self, param: DType) -> DType {
        match self.buffer {
            AccumBuffer::F32 => DType::F32,
            AccumBuffer::ParamDtype => param,
        }
    }
}

/// Storage of one buffer.
#[derive(Debug)]
enum Store {
    F32(Vec<f32>),
    Half(Vec<u16>, DType),
}

/// One parameter's accumulation buffer.
#[derive(Debug)]
pub struct AccumBuf {
    store: Store,
    /// Holds gradients of the current step.
    pub pending: bool,
    /// Completed (all micro-batches in, reduction applied): the passes read it as the gradient.
    pub complete: bool,
}

impl AccumBuf {
    /// A buffer of `numel` elements of `dtype` (allocated, zero; OutOfMemory on failure).
    pub fn new(numel: usize, dtype: DType) -> Result<AccumBuf> {
        let what = "a gradient accumulation buffer";
        let store = match dtype {
            DType::F32 => Store::F32(crate::alloc::zeros(numel, what)?),
            d => Store::Half(crate::alloc::zeros(numel, what)?, d),
        };
        Ok(AccumBuf {
            store,
            pending: false,
            complete: false,
        })
    }

    /// The buffer as the passes address it. Writes through it need the parameter's lock (held
    /// by the caller, who has `&mut self`).
    pub fn raw(&mut self) -> RawBuf {
        match &mut self.store {
            Store::F32(v) => RawBuf {
                addr: v.as_mut_ptr() as usize,
                dtype: DType::F32,
                numel: v.len(),
            },
            Store::Half(v, d) => RawBuf {
                addr: v.as_mut_ptr() as usize,
                dtype: *d,
                numel: v.len(),
            },
        }
    }

    pub fn bytes(&self) -> u64 {
        match &self.store {
            Store::F32(v) => 4 * v.len() as u64,
            Store::Half(v, _) => 2 * v.len() as u64,
        }
    }
}

impl Optimizer {
    /// Turns gradient accumulation on (or changes its options): allocates a buffer for every
    /// registered parameter (and, from now on, for each one registered later). Only between
    /// steps with no accumulated gradients pending; CPU parameters only; not for distributed
    /// optimizers. On failure (out of memory included) nothing changes.
    pub fn accum_enable(&mut self, settings: AccumSettings) -> Result<()> {
        self.accum_check_idle("lomo_accum_enable")?;
        self.accum_check_supported()?;
        if let Some(p) = self.params.iter().find(|p| p.device != Device::Cpu) {
            bail!(
                Unsupported,
                "parameter '{}' is on CUDA: gradient accumulation buffers are implemented for CPU \
                 parameters only so far",
                p.name
            );
        }
        let same_dtypes = self.accum.is_some_and(|a| a.buffer == settings.buffer);
        if !same_dtypes {
            // Every buffer first, then the swap: a failed allocation changes nothing.
            let mut bufs = crate::alloc::with_capacity(self.params.len(), "accumulation")?;
            for p in &self.params {
                bufs.push(AccumBuf::new(p.numel(), settings.dtype_for(p.buf.dtype))?);
            }
            for (p, b) in self.params.iter().zip(bufs) {
                p.inner.lock().accum = Some(b);
            }
        }
        self.accum = Some(settings);
        Ok(())
    }

    /// Turns accumulation off and frees the buffers (between steps, nothing pending).
    pub fn accum_disable(&mut self) -> Result<()> {
        self.accum_check_idle("lomo_accum_disable")?;
        for p in &self.params {
            p.inner.lock().accum = None;
        }
        self.accum = None;
        Ok(())
    }

    /// The accumulation options, when on.
    pub fn accum_settings(&self) -> Option<AccumSettings> {
        self.accum
    }

    /// ACCUMULATE phases completed in the current step (micro-batches whose gradients wait).
    pub fn accum_pending(&self) -> u32 {
        self.accum_micro
    }

    fn accum_check_idle(&self, what: &str) -> Result<()> {
        if self.state != StepState::Idle || self.accum_micro > 0 {
            bail!(
                PhaseError,
                "{what} is only possible between steps with no accumulated gradients pending \
                 (finish the step, or lomo_step_cancel)"
            );
        }
        Ok(())
    }

    fn accum_check_supported(&self) -> Result<()> {
        if self.dist.norm_comm.is_some() || self.params.iter().any(|p| p.shard.is_some()) {
            bail!(
                Unsupported,
                "gradient accumulation is not supported for distributed optimizers \
                 (lomo_dist_set, lomo_param_set_shard) yet"
            );
        }
        Ok(())
    }

    /// The checks of `lomo_step_begin` for accumulation, before anything changes.
    pub(super) fn accum_check_begin(&self, phase: Phase) -> Result<()> {
        if phase == Phase::Accumulate {
            if self.accum.is_none() {
                bail!(
                    PhaseError,
                    "LOMO_PHASE_ACCUMULATE needs accumulation buffers: call lomo_accum_enable \
                     first"
                );
            }
            if self.state != StepState::Idle {
                bail!(
                    PhaseError,
                    "ACCUMULATE phases come before the step's NORM and UPDATE phases (a phase is \
                     active or a NORM phase already ended)"
                );
            }
        }
        if phase == Phase::Accumulate || self.accum_micro > 0 {
            self.accum_check_supported()?;
        }
        Ok(())
    }

    /// The buffer of a parameter registered now (accumulation on), or None.
    pub(super) fn accum_buf_for(
        &self,
        name: &str,
        device: Device,
        numel: usize,
        dtype: DType,
    ) -> Result<Option<AccumBuf>> {
        let Some(settings) = self.accum else {
            return Ok(None);
        };
        if device != Device::Cpu {
            bail!(
                Unsupported,
                "parameter '{name}' is on CUDA, but gradient accumulation is on \
                 (lomo_accum_enable), which is implemented for CPU parameters only so far"
            );
        }
        Ok(Some(AccumBuf::new(numel, settings.dtype_for(dtype))?))
    }

    /// ACCUMULATE phase: adds the gradient `g` to the parameter's buffer.
    pub(super) fn accum_add(&self, inner: &mut ParamInner, g: &RawBuf) -> Result<()> {
        let Some(acc) = inner.accum.as_mut() else {
            bail!(PhaseError, "the parameter has no accumulation buffer");
        };
        let op = AccumOp {
            keep: acc.pending,
            factor: 1.0,
        };
        orchestrate::accumulate(&self.cpu_step(self.state), &acc.raw(), Some(g), &op)?;
        acc.pending = true;
        Ok(())
    }

    /// NORM/UPDATE phase: the gradient the passes read — `g` itself in a step without
    /// ACCUMULATE phases, else the completed buffer (completed here on first use). `g` is None
    /// for a parameter run from its buffer alone at the phase's end.
    pub(super) fn accum_grad(&self, inner: &mut ParamInner, g: Option<RawBuf>) -> Result<RawBuf> {
        let acc = match inner.accum.as_mut() {
            Some(acc) if self.accum_micro > 0 => acc,
            _ => match g {
                Some(g) => return Ok(g),
                None => bail!(NullArgument, "no gradient and no accumulated gradient"),
            },
        };
        if acc.complete {
            return Ok(acc.raw());
        }
        let factor = match self.accum.map(|a| a.reduction) {
            Some(AccumReduction::Mean) => (1.0 / (self.accum_micro as f64 + 1.0)) as f32,
            _ => 1.0,
        };
        if let (false, 1.0, Some(g)) = (acc.pending, factor, g) {
            // Nothing accumulated and nothing to scale: the gradient as it is.
            return Ok(g);
        }
        let op = AccumOp {
            keep: acc.pending,
            factor,
        };
        orchestrate::accumulate(&self.cpu_step(self.state), &acc.raw(), g.as_ref(), &op)?;
        acc.pending = true;
        acc.complete = true;
        Ok(acc.raw())
    }

    /// At the end of a NORM or UPDATE phase of an accumulated step: the parameters with
    /// accumulated gradients that received none in this phase run their pass from the buffer
    /// (in id order).
    pub(super) fn accum_flush(&self, stream: usize) -> Result<()> {
        if self.accum_micro == 0 {
            return Ok(());
        }
        for id in 0..self.params.len() {
            let waiting = {
                let inner = self.params[id].inner.lock();
                inner.epoch != self.epoch && inner.accum.as_ref().is_some_and(|a| a.pending)
            };
            if waiting {
                self.submit_buf(id as u32, None, stream)?;
            }
        }
        Ok(())
    }

    /// Empties every buffer (after the step's UPDATE phase, or a cancelled step).
    pub(super) fn accum_clear(&mut self) {
        self.accum_micro = 0;
        for p in &self.params {
            if let Some(a) = p.inner.lock().accum.as_mut() {
                a.pending = false;
                a.complete = false;
            }
        }
    }
}
