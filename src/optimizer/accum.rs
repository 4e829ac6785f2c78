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
//! Buffers live where the parameters do (host memory, or device memory of the parameters' CUDA
//! device, where every pass is enqueued on the caller's stream). They are never saved:
//! checkpoints are refused while accumulated gradients are pending.
//!
//! Distributed optimizers (`lomo_dist_set`, `lomo_param_set_shard`): the buffer holds what the
//! rank submits for the piece — the reduced gradient of the piece (`LOMO_GRAD_REDUCED`), this
//! rank's gradient of the piece (`LOMO_GRAD_ALL_REDUCE`: the buffer has the piece's elements)
//! or this rank's gradient of the whole tensor (`LOMO_GRAD_REDUCE_SCATTER`: the buffer has the
//! global tensor's elements, not the partition's). The library reduces only the completed
//! buffer, once per NORM/UPDATE phase as in a step without accumulation: `k` micro-batches
//! cost one collective per tensor and phase, not `k`, and the sum (mean) of the micro-batches
//! averaged over the ranks is the gradient of one rank on the concatenated global batch. The
//! passes of pieces in the step's NORM/UPDATE phases run at the phase's end in id order
//! (`accum_flush`), so the ranks' collectives match whichever micro-batch brought each
//! gradient; every rank must have accumulated gradients for the same parameters (as every
//! rank submits the same parameters in a step without accumulation). The micro-batch count is
//! part of the `LOMO_DIST_CHECK` agreement record.

use super::{Optimizer, Phase, StepState};
use crate::backend::cuda::accum::DevBuf;
use crate::backend::cuda::side::CudaSide;
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
    /// Device memory of a CUDA parameter's device.
    Device(DevBuf, DType, usize),
}

/// One parameter's accumulation buffer.
#[derive(Debug)]
pub struct AccumBuf {
    store: Store,
    /// Holds gradients of the current step.
    pub pending: bool,
    /// Completed (all micro-batches in, reduction applied): the passes read it as the gradient.
    pub complete: bool,
    /// A piece of a distributed tensor whose gradient arrived in this NORM/UPDATE phase: its
    /// pass waits for the phase's end (`accum_flush`).
    pub deferred: bool,
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
            deferred: false,
        })
    }

    /// A buffer in device memory of `side`'s device (contents unspecified: the first pass of
    /// a step never reads them).
    pub fn on_device(side: &CudaSide, numel: usize, dtype: DType) -> Result<AccumBuf> {
        let buf = side.alloc_buffer(numel * dtype.size())?;
        Ok(AccumBuf {
            store: Store::Device(buf, dtype, numel),
            pending: false,
            complete: false,
            deferred: false,
        })
    }

    /// The buffer as the passes address it. Writes through it need the parameter's lock (held
    /// by the caller, who has `&mut self`).
    pub fn raw(&mut self) -> RawBuf {
        match &mut self.store {
            Store::Device(b, d, n) => RawBuf {
                addr: b.ptr as usize,
                dtype: *d,
                numel: *n,
            },
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

    /// Elements of the buffer.
    pub fn numel(&self) -> usize {
        match &self.store {
            Store::F32(v) => v.len(),
            Store::Half(v, _) => v.len(),
            Store::Device(_, _, n) => *n,
        }
    }

    pub fn bytes(&self) -> u64 {
        match &self.store {
            Store::F32(v) => 4 * v.len() as u64,
            Store::Half(v, _) => 2 * v.len() as u64,
            Store::Device(b, _, _) => b.bytes as u64,
        }
    }
}

/// The buffer of a parameter registered while accumulation is `settings` (None: off): in host
/// memory, or on `side`'s device for a CUDA parameter.
pub(super) fn buffer_for(
    settings: Option<AccumSettings>,
    side: Option<&CudaSide>,
    numel: usize,
    dtype: DType,
) -> Result<Option<AccumBuf>> {
    let Some(s) = settings else {
        return Ok(None);
    };
    let dtype = s.dtype_for(dtype);
    Ok(Some(match side {
        Some(side) => AccumBuf::on_device(side, numel, dtype)?,
        None => AccumBuf::new(numel, dtype)?,
    }))
}

impl Optimizer {
    /// Turns gradient accumulation on (or changes its options): allocates a buffer for every
    /// registered parameter (and, from now on, for each one registered later), where the
    /// parameter lives. Only between steps with no accumulated gradients pending; not for
    /// distributed optimizers. On failure (out of memory included) nothing changes.
    pub fn accum_enable(&mut self, settings: AccumSettings) -> Result<()> {
        self.accum_check_idle("lomo_accum_enable")?;
        let same_dtypes = self.accum.is_some_and(|a| a.buffer == settings.buffer);
        if !same_dtypes {
            // Every buffer first, then the swap: a failed allocation changes nothing.
            let mut bufs = crate::alloc::with_capacity(self.params.len(), "accumulation")?;
            for p in &self.params {
                let side = self.cuda.as_ref().filter(|_| p.device != Device::Cpu);
                let b = buffer_for(Some(settings), side, p.grad_numel(), p.buf.dtype)?;
                bufs.extend(b);
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
        Ok(())
    }

    /// One accumulation pass on this optimizer's backend (CUDA: on `stream`).
    fn accum_pass(
        &self,
        acc: &RawBuf,
        g: Option<&RawBuf>,
        op: &AccumOp,
        stream: usize,
    ) -> Result<()> {
        match &self.cuda {
            Some(side) => orchestrate::accumulate(&side.step(stream), acc, g, op),
            None => orchestrate::accumulate(&self.cpu_step(self.state), acc, g, op),
        }
    }

    /// ACCUMULATE phase: adds the gradient `g` of parameter `id` to its buffer.
    pub(super) fn accum_add(
        &self,
        id: u32,
        inner: &mut ParamInner,
        g: &RawBuf,
        stream: usize,
    ) -> Result<()> {
        if let Some(side) = &self.cuda {
            side.tensor(id, g)?; // the gradient is device memory of the parameter's size
        }
        let Some(acc) = inner.accum.as_mut() else {
            bail!(PhaseError, "the parameter has no accumulation buffer");
        };
        let op = AccumOp {
            keep: acc.pending,
            factor: 1.0,
        };
        self.accum_pass(&acc.raw(), Some(g), &op, stream)?;
        acc.pending = true;
        Ok(())
    }

    /// NORM/UPDATE phase: the gradient the passes read — `g` itself in a step without
    /// ACCUMULATE phases, else the completed buffer (completed here on first use). `g` is None
    /// for a parameter run from its buffer alone at the phase's end.
    pub(super) fn accum_grad(
        &self,
        id: u32,
        inner: &mut ParamInner,
        g: Option<RawBuf>,
        stream: usize,
    ) -> Result<RawBuf> {
        self.accum_complete(id, inner, g, false, stream)
    }

    /// [`Optimizer::accum_grad`]; `copy`: the buffer takes `g` even when it could be read as it
    /// is (a deferred pass reads it after the caller's buffer is gone).
    fn accum_complete(
        &self,
        id: u32,
        inner: &mut ParamInner,
        g: Option<RawBuf>,
        copy: bool,
        stream: usize,
    ) -> Result<RawBuf> {
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
        if let Some(g) = g.filter(|_| !acc.pending && factor == 1.0 && !copy) {
            // Nothing accumulated and nothing to scale: the gradient as it is.
            return Ok(g);
        }
        let op = AccumOp {
            keep: acc.pending,
            factor,
        };
        if let (Some(side), Some(g)) = (&self.cuda, &g) {
            side.tensor(id, g)?; // checked before anything is enqueued
        }
        self.accum_pass(&acc.raw(), g.as_ref(), &op, stream)?;
        acc.pending = true;
        acc.complete = true;
        Ok(acc.raw())
    }

    /// Whether parameter `param`'s pass waits for the phase's end: a piece of a distributed
    /// tensor (`lomo_param_set_shard`) in a NORM/UPDATE phase of an accumulated step. Its
    /// pass may enter collectives (the gradient's reduction, a piece's statistics), and ranks
    /// must enter those in the same order whichever micro-batch brought each gradient: the
    /// phase's end runs them in id order.
    pub(super) fn accum_defers(&self, param: &crate::param::Param, inner: &ParamInner) -> bool {
        self.accum_micro > 0 && param.shard.is_some() && inner.accum.is_some()
    }

    /// A deferred submission (see [`Optimizer::accum_defers`]): the buffer is completed with
    /// `g` (copied: the caller's buffer is not read after this call) and the pass is marked
    /// for the phase's end.
    pub(super) fn accum_defer(
        &self,
        id: u32,
        inner: &mut ParamInner,
        g: RawBuf,
        stream: usize,
    ) -> Result<()> {
        self.accum_complete(id, inner, Some(g), true, stream)?;
        if let Some(acc) = inner.accum.as_mut() {
            acc.deferred = true;
        }
        Ok(())
    }

    /// At the end of a NORM or UPDATE phase of an accumulated step, in id order: the deferred
    /// passes of pieces of distributed tensors, and the passes of parameters with accumulated
    /// gradients that received none in this phase, from their buffers. Every rank with the
    /// same pending parameters thus enters the same collectives in the same order. A pass that
    /// fails (`COMM_ERROR`) leaves it and the later ones waiting (a retried `lomo_step_end`
    /// runs them; passes already run are not repeated).
    pub(super) fn accum_flush(&self, stream: usize) -> Result<()> {
        if self.accum_micro == 0 {
            return Ok(());
        }
        for id in 0..self.params.len() {
            let mut inner = self.params[id].inner.lock();
            let waiting = inner
                .accum
                .as_ref()
                .is_some_and(|a| a.deferred || (inner.epoch != self.epoch && a.pending));
            if !waiting {
                continue;
            }
            let pass = self.pass_for(id as u32)?;
            self.run_pass(id as u32, &mut inner, None, pass, stream)?;
            if let Some(a) = inner.accum.as_mut() {
                a.deferred = false;
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
                a.deferred = false;
            }
        }
    }
}
