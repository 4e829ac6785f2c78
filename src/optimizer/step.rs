//! Core layer: the optimizer's step protocol — `begin`, `submit`, `end`, `cancel` — over the
//! one orchestration of [`crate::orchestrate`], on the CPU backend
//! ([`crate::backend::cpu::step::CpuStep`], the host values of this optimizer's step) or the
//! CUDA backend ([`crate::backend::cuda::step::CudaStep`], its device step record).

use super::grad;
use super::{NormResult, Optimizer, Phase, StepInfo, StepState};
use crate::backend::cpu::step::{CpuAda, CpuPiece, CpuStep, CpuTensor, HostStep};
use crate::backend::{PhaseBegin, RawBuf, TensorUpdate};
use crate::config::NonFinitePolicy;
use crate::dist::{GradMode, Layout};
use crate::dtype::DType;
use crate::error::{bail, Result};
use crate::orchestrate::{self, PhaseTotals, TensorPass};
use crate::param::{ParamInner, PARAM_FLAG_CARRY_RMS};
use smallvec::SmallVec;

/// The error of batch entry `k` after `applied` entries of the batch ran: as it is when none did,
/// else with the entries that were applied named (they count as submitted in this phase).
fn partial(e: crate::error::Error, k: usize, applied: usize) -> crate::error::Error {
    if applied == 0 {
        return e;
    }
    crate::error::Error::new(
        e.status(),
        format!(
            "batch entry {k}: {} (this entry's parameter is unchanged; {applied} other entries \
             of the batch ran before it and were applied: they count as submitted in this phase)",
            e.message()
        ),
    )
}

/// Entries of a `lomo_grad_submit_batch` handed to the backend at once (their multi-tensor
/// launches group within such a run); the run's arrays live on the stack.
pub(crate) const BATCH_CHUNK: usize = 64;
type Chunk<T> = SmallVec<[T; BATCH_CHUNK]>;

impl Optimizer {
    /// Starts a phase. `lr` is used by UPDATE phases only.
    pub fn begin(&mut self, phase: Phase, lr: f64) -> Result<()> {
        self.begin_on(phase, lr, 0)
    }

    /// [`Optimizer::begin`] with the caller's CUDA stream (ignored for CPU parameters).
    pub fn begin_on(&mut self, phase: Phase, lr: f64, stream: usize) -> Result<()> {
        self.accum_check_begin(phase)?;
        let next = match (phase, self.state) {
            (Phase::Accumulate, StepState::Idle) => StepState::Accumulate,
            (Phase::Norm, StepState::Idle) => StepState::Norm,
            (Phase::Norm, StepState::NormDone(_)) => {
                bail!(
                    PhaseError,
                    "a NORM phase already ended in this step: begin the UPDATE phase"
                )
            }
            (Phase::Update, StepState::Idle) if self.config.clip_grad_norm > 0.0 => bail!(
                PhaseError,
                "clip_grad_norm is set: every step needs a NORM phase (lomo_step_begin(NORM) ... \
                 lomo_step_end) before its UPDATE phase"
            ),
            (Phase::Update, StepState::Idle) => StepState::Update { lr, norm: None },
            (Phase::Update, StepState::NormDone(n)) => StepState::Update { lr, norm: Some(n) },
            (Phase::Accumulate, StepState::NormDone(_)) => bail!(
                PhaseError,
                "a NORM phase already ended in this step: ACCUMULATE phases come before it"
            ),
            (_, StepState::Norm | StepState::Update { .. } | StepState::Accumulate) => {
                bail!(
                    PhaseError,
                    "a phase is already active: call lomo_step_end first"
                )
            }
        };
        if phase == Phase::Update && !(lr.is_finite() && lr >= 0.0) {
            bail!(InvalidArgument, "lr must be finite and >= 0, got {lr}");
        }
        if phase == Phase::Accumulate {
            // Only the buffers change: nothing of the step record.
            self.epoch += 1;
            self.state = next;
            return Ok(());
        }
        let begin = PhaseBegin {
            update: phase == Phase::Update,
            after_norm: matches!(next, StepState::Update { norm: Some(_), .. }),
            lr,
        };
        match &self.cuda {
            Some(side) => orchestrate::begin(&side.step(stream), &begin)?,
            None => orchestrate::begin(&self.cpu_step(next), &begin)?,
        }
        self.epoch += 1;
        self.state = next;
        Ok(())
    }

    /// Hands over the gradient of parameter `id` (an address of `numel` elements of `dtype`).
    pub fn submit(&self, id: u32, grad_addr: usize, dtype: DType) -> Result<()> {
        self.submit_on(id, grad_addr, dtype, 0)
    }

    /// [`Optimizer::submit`] with the caller's CUDA stream (ignored for CPU parameters).
    pub fn submit_on(&self, id: u32, grad_addr: usize, dtype: DType, stream: usize) -> Result<()> {
        let Some(param) = self.params.get(id as usize) else {
            bail!(
                UnknownParam,
                "no parameter with id {id} ({} registered)",
                self.params.len()
            );
        };
        let grad = param.grad_buf(grad_addr, dtype)?;
        self.submit_buf(id, Some(grad), stream)
    }

    /// [`Optimizer::submit_on`] with a validated gradient of parameter `id`; None (gradient
    /// accumulation) runs the phase's pass from the parameter's accumulated gradient alone.
    pub(super) fn submit_buf(&self, id: u32, grad: Option<RawBuf>, stream: usize) -> Result<()> {
        self.submit_buf_as(id, grad, stream, false)
    }

    /// [`Optimizer::submit_buf`]; `claimed`: a batch already marked the parameter as submitted
    /// in this phase (no duplicate check).
    fn submit_buf_as(
        &self,
        id: u32,
        grad: Option<RawBuf>,
        stream: usize,
        claimed: bool,
    ) -> Result<()> {
        let param = &self.params[id as usize];
        let mut inner = param.inner.lock();
        if !claimed
            && matches!(
                self.state,
                StepState::Norm | StepState::Update { .. } | StepState::Accumulate
            )
            && inner.epoch == self.epoch
        {
            bail!(
                DuplicateGradient,
                "the gradient of '{}' was already submitted in this phase",
                param.name
            );
        }
        let pass = match (self.state, grad) {
            (StepState::Accumulate, Some(g)) => {
                self.accum_add(id, &mut inner, &g, stream)?;
                inner.epoch = self.epoch;
                return Ok(());
            }
            _ => self.pass_for(id)?,
        };
        if let Some(g) = grad.filter(|_| self.accum_defers(param, &inner)) {
            // A piece of a distributed tensor in an accumulated step: the buffer is completed
            // now, the pass (and its collectives) runs at the phase's end in id order.
            self.accum_defer(id, &mut inner, g, stream)?;
            inner.epoch = self.epoch;
            return Ok(());
        }
        self.run_pass(id, &mut inner, grad, pass, stream)
    }

    /// The phase's pass of parameter `id` (locked: `inner`) on `grad`, or on its accumulated
    /// gradient alone (None).
    pub(super) fn run_pass(
        &self,
        id: u32,
        inner: &mut ParamInner,
        grad: Option<RawBuf>,
        pass: TensorPass,
        stream: usize,
    ) -> Result<()> {
        let param = &self.params[id as usize];
        let grad = self.accum_grad(id, inner, grad, stream)?;
        let algorithm = self.config.algorithm;
        let shard = param.shard.filter(|s| s.layout != Layout::Full);
        let piece_comm = shard
            .and_then(|s| s.piece_comm)
            .map(|c| &self.dist.comms[c as usize]);
        if let Some(side) = &self.cuda {
            // A gradient the library reduces: averaged into the device scratch on `stream`
            // first (the lock only orders submitting threads; the device orders by stream).
            let reduced = param.shard.filter(|s| s.grad_mode != GradMode::Reduced);
            let _scratch = reduced.map(|_| self.dist.scratch.bufs.lock());
            let grad = match reduced {
                Some(s) => grad::reduce_device(
                    &self.dist,
                    &s,
                    grad,
                    param.numel(),
                    side,
                    stream,
                    &param.name,
                )?,
                None => grad,
            };
            let mut t = side.tensor(id, &grad)?;
            let b = side.step(stream);
            orchestrate::tensor(&b, algorithm, &mut t, &grad, &pass, piece_comm)?;
            inner.epoch = self.epoch;
            return Ok(());
        }
        let carry = matches!(pass, TensorPass::Update(u) if u.carry);
        // A gradient the library reduces (ALL_REDUCE, REDUCE_SCATTER; CPU parameters) is
        // averaged into the scratch first, which stays locked until the passes are done with it.
        let reduced = param.shard.filter(|s| s.grad_mode != GradMode::Reduced);
        let mut scratch = reduced.map(|_| self.dist.scratch.bufs.lock());
        let grad = match (reduced, scratch.as_deref_mut()) {
            (Some(s), Some(bufs)) => {
                grad::reduce(&self.dist, &s, grad, param.numel(), bufs, &param.name)?
            }
            _ => grad,
        };
        let inner = &mut *inner;
        // A non-contiguous AdaLomo layout: the step runs on logical-order copies (the parameter
        // only in UPDATE phases), and the written parameter is copied back below.
        let update = matches!(pass, TensorPass::Update(_));
        let (pbuf, grad) = match inner.strided.as_mut() {
            Some(s) => {
                let (p, g) = s.gather(update.then_some(&param.buf), &grad);
                (p.unwrap_or(param.buf), g)
            }
            None => (param.buf, grad),
        };
        let ada = inner.ada.as_mut().map(|a| {
            let carried = if carry { a.carried_psq } else { None };
            CpuAda::new(a.state.as_view_mut(), &mut a.ws, carried)
        });
        let mut t = CpuTensor::new(pbuf, ada);
        t.piece = shard.map(|s| CpuPiece {
            global_numel: s.global_numel,
            global_rows: s.global_rows,
            elem_offset: s.elem_offset,
            cols_of: (s.layout == Layout::Cols).then_some(s.global_cols),
            flat: s.layout == Layout::Flat && param.factored,
            record: &mut inner.dist_rec[..],
            round: 0,
            row_mean: 0.0,
        });
        let b = self.cpu_step(self.state);
        orchestrate::tensor(&b, algorithm, &mut t, &grad, &pass, piece_comm)?;
        let (sum_sq, finite) = (t.sum_sq, t.finite);
        drop(scratch);
        let written = t
            .ada
            .as_ref()
            .filter(|a| a.applied)
            .map(|a| a.written_sum_sq);
        if let (Some(s), Some(_)) = (inner.strided.as_mut(), written) {
            s.scatter(&param.buf);
        }
        inner.epoch = self.epoch;
        inner.sum_sq = sum_sq;
        inner.finite = finite;
        if let (Some(w), Some(a)) = (written, inner.ada.as_mut()) {
            a.carried_psq = w;
        }
        Ok(())
    }

    /// What parameter `id`'s gradient does in the active phase.
    pub(super) fn pass_for(&self, id: u32) -> Result<TensorPass> {
        let param = &self.params[id as usize];
        Ok(match self.state {
            StepState::Norm => TensorPass::Norm,
            StepState::Update { norm, .. } => {
                let group = self.groups[&param.group];
                TensorPass::Update(TensorUpdate {
                    param_id: id,
                    lr_multiplier: group.lr_multiplier,
                    weight_decay: group.weight_decay,
                    prechecked: norm.is_some(),
                    per_element: self.config.nonfinite == NonFinitePolicy::PerElement,
                    carry: param.flags & PARAM_FLAG_CARRY_RMS != 0,
                })
            }
            _ => bail!(
                PhaseError,
                "no phase is active: call lomo_step_begin before submitting gradients"
            ),
        })
    }

    /// Hands over several gradients at once (`lomo_grad_submit_batch`): `entry(k)` for `k` in
    /// `0..n` gives the `(id, address, dtype)` of entry `k` (read more than once, so it must give
    /// the same value each time). The result is that of submitting them one by one in this
    /// order; every check (ids, duplicates in the phase or the batch, buffers, the phase) is made
    /// before anything runs, so a bad entry changes nothing. CUDA parameters: small whole tensors
    /// share multi-tensor launches (NORM, LOMO's pre-check and update), grouped within runs of
    /// [`BATCH_CHUNK`] entries; pieces of distributed tensors and AdaLomo tensors run as single
    /// submits. CPU parameters, and every phase while gradient accumulation is on
    /// (`lomo_accum_enable`): one by one. Allocates nothing on the host (the entries are read
    /// through `entry`, the chunks live on the stack).
    pub fn submit_batch_on(
        &self,
        n: usize,
        entry: impl Fn(usize) -> Result<(u32, usize, DType)>,
        stream: usize,
    ) -> Result<()> {
        for k in 0..n {
            let (id, addr, dtype) = entry(k)?;
            let Some(param) = self.params.get(id as usize) else {
                bail!(
                    UnknownParam,
                    "batch entry {k}: no parameter with id {id} ({} registered)",
                    self.params.len()
                );
            };
            if self.state != StepState::Accumulate {
                self.pass_for(id)?;
            }
            let buf = param.grad_buf(addr, dtype)?;
            for j in 0..k {
                if entry(j)?.0 == id {
                    bail!(
                        DuplicateGradient,
                        "batch entry {k}: the gradient of '{}' appears twice in the batch",
                        param.name
                    );
                }
            }
            if param.inner.lock().epoch == self.epoch {
                bail!(
                    DuplicateGradient,
                    "batch entry {k}: the gradient of '{}' was already submitted in this phase",
                    param.name
                );
            }
            // The device buffer check of every gradient before anything is enqueued.
            if let (Some(side), None) = (&self.cuda, &self.accum) {
                side.tensor(id, &buf)?;
            }
        }
        // CPU parameters, and every step with gradient accumulation on (an ACCUMULATE phase
        // adds into the buffers; the last micro-batch completes them): one by one, each through
        // `submit_on`, after the checks above.
        // Claim every parameter of the batch for this phase, one lock at a time (no lock is
        // held across launches, so no order of batches can deadlock): a submission of one of
        // them from another thread since the checks (a caller's race, `lomo_grad_submit` is
        // thread-safe for different parameters) makes the batch fail with nothing run, and
        // one arriving later is refused — each gradient is applied exactly once.
        self.claim(n, &entry)?;
        let side = match &self.cuda {
            Some(side) if self.accum.is_none() => side,
            _ => return self.run_batch_one_by_one(n, &entry, stream),
        };
        self.run_batch(side, n, &entry, stream)
    }

    /// CPU parameters, and every phase with gradient accumulation on: the claimed entries one by
    /// one through the single-submit path. Entries whose passes call collectives (pieces,
    /// gradients the library reduces) first, in batch order (the collectives' order is that of
    /// separate submits): a collective failing (LOMO_STATUS_COMM_ERROR) in the first of them
    /// leaves the whole batch unapplied. On failure the claims of the entries that did not run
    /// are released and the message says how many ran.
    fn run_batch_one_by_one(
        &self,
        n: usize,
        entry: &impl Fn(usize) -> Result<(u32, usize, DType)>,
        stream: usize,
    ) -> Result<()> {
        let collective = |id: u32| self.params[id as usize].shard.is_some();
        let mut applied = 0;
        for first in [true, false] {
            for k in 0..n {
                let (id, addr, dtype) = entry(k)?;
                if collective(id) != first {
                    continue;
                }
                let run = self.params[id as usize]
                    .grad_buf(addr, dtype)
                    .and_then(|g| self.submit_buf_as(id, Some(g), stream, true));
                if let Err(e) = run {
                    // Entries that ran: the collective ones before k, and in the second round
                    // every collective one and the others before k.
                    let ran = |j: usize, jd: u32| {
                        if first {
                            collective(jd) && j < k
                        } else {
                            collective(jd) || j < k
                        }
                    };
                    self.unclaim_if(n, entry, |j, jd| !ran(j, jd));
                    return Err(partial(e, k, applied));
                }
                applied += 1;
            }
        }
        Ok(())
    }

    /// Marks every parameter of a checked batch as submitted in this phase, or fails with
    /// nothing claimed when one was submitted by another thread since the checks.
    fn claim(&self, n: usize, entry: &impl Fn(usize) -> Result<(u32, usize, DType)>) -> Result<()> {
        for k in 0..n {
            let id = entry(k)?.0;
            let param = &self.params[id as usize];
            let mut inner = param.inner.lock();
            if inner.epoch == self.epoch {
                drop(inner);
                self.unclaim(k, entry);
                bail!(
                    DuplicateGradient,
                    "batch entry {k}: the gradient of '{}' was submitted by another thread \
                     during this batch",
                    param.name
                );
            }
            inner.epoch = self.epoch;
        }
        Ok(())
    }

    /// Releases the claims of entries `0..upto` of a batch (their parameters count as not
    /// submitted in this phase again).
    fn unclaim(&self, upto: usize, entry: &impl Fn(usize) -> Result<(u32, usize, DType)>) {
        self.unclaim_if(upto, entry, |_, _| true);
    }

    /// Releases the claims of the entries `k < upto` (of parameter `id`) where `which(k, id)`.
    fn unclaim_if(
        &self,
        upto: usize,
        entry: &impl Fn(usize) -> Result<(u32, usize, DType)>,
        which: impl Fn(usize, u32) -> bool,
    ) {
        for k in 0..upto {
            if let Ok((id, ..)) = entry(k) {
                if which(k, id) {
                    self.params[id as usize].inner.lock().epoch = self.epoch.wrapping_sub(1);
                }
            }
        }
    }

    /// The CUDA passes of a checked and claimed batch: pieces of distributed tensors first (their
    /// statistics' collectives may fail: the first one failing leaves the batch unapplied), one
    /// by one in batch order, then the whole tensors in runs of [`BATCH_CHUNK`]. On failure the
    /// claims of the entries that did not run are released (those that ran, or may have, stay
    /// submitted) and the message says how many ran.
    fn run_batch(
        &self,
        side: &crate::backend::cuda::side::CudaSide,
        n: usize,
        entry: &impl Fn(usize) -> Result<(u32, usize, DType)>,
        stream: usize,
    ) -> Result<()> {
        let b = side.step(stream);
        let algorithm = self.config.algorithm;
        let piece = |id: u32| {
            self.params[id as usize]
                .shard
                .is_some_and(|s| s.layout != Layout::Full)
        };
        let mut applied = 0;
        for k in 0..n {
            let (id, addr, dtype) = entry(k)?;
            if !piece(id) {
                continue;
            }
            let run = || {
                let param = &self.params[id as usize];
                let g = param.grad_buf(addr, dtype)?;
                let mut t = side.tensor(id, &g)?;
                let pass = self.pass_for(id)?;
                let comm = param
                    .shard
                    .and_then(|s| s.piece_comm)
                    .map(|c| &self.dist.comms[c as usize]);
                orchestrate::tensor(&b, algorithm, &mut t, &g, &pass, comm)
            };
            if let Err(e) = run() {
                self.unclaim_if(n, entry, |j, jid| j >= k || !piece(jid));
                return Err(partial(e, k, applied));
            }
            applied += 1;
        }
        let mut k = 0;
        while k < n {
            let first = k;
            let mut ts: Chunk<_> = SmallVec::new();
            let mut gs: Chunk<RawBuf> = SmallVec::new();
            let mut passes: Chunk<TensorPass> = SmallVec::new();
            while k < n && ts.len() < BATCH_CHUNK {
                let (id, addr, dtype) = entry(k)?;
                k += 1;
                if piece(id) {
                    continue;
                }
                let g = self.params[id as usize].grad_buf(addr, dtype)?;
                ts.push(side.tensor(id, &g)?);
                gs.push(g);
                passes.push(self.pass_for(id)?);
            }
            if let Err(e) = orchestrate::batch(&b, algorithm, &mut ts, &gs, &passes) {
                // The entries of this run may have been launched in part: they stay claimed.
                self.unclaim_if(n, entry, |j, jid| j >= k && !piece(jid));
                return Err(partial(e, first, applied));
            }
            applied += ts.len();
        }
        Ok(())
    }

    /// Ends the active phase.
    pub fn end(&mut self) -> Result<()> {
        self.end_on(0)
    }

    /// [`Optimizer::end`] with the caller's CUDA stream (ignored for CPU parameters). For CUDA
    /// parameters the clip coefficient, overflow, loss scaler and step counter advance on the
    /// device; the host keeps only the protocol state.
    pub fn end_on(&mut self, stream: usize) -> Result<()> {
        if self.state == StepState::Accumulate {
            self.accum_micro += 1;
            self.state = StepState::Idle;
            return Ok(());
        }
        let update = matches!(self.state, StepState::Update { .. });
        if matches!(self.state, StepState::Norm | StepState::Update { .. }) {
            self.accum_flush(stream)?;
        }
        let totals = if matches!(self.state, StepState::Norm | StepState::Update { .. }) {
            let totals = self.phase_totals();
            let agree = self.agreement(totals.submitted);
            match &self.cuda {
                Some(side) => orchestrate::end(&side.step(stream), update, totals, agree)?,
                None => orchestrate::end(&self.cpu_step(self.state), update, totals, agree)?,
            }
        } else {
            PhaseTotals::default()
        };
        let PhaseTotals {
            submitted,
            nonfinite,
            sum_sq,
        } = totals;
        match self.state {
            StepState::Norm => {
                let decision = orchestrate::norm_decision(&totals, self.config.clip_grad_norm);
                let (overflow, coef) = (decision.overflow, decision.coef);
                self.info.grad_norm = if overflow {
                    f32::NAN
                } else {
                    sum_sq.sqrt() as f32
                };
                self.info.grads_submitted = submitted;
                self.info.grads_nonfinite = nonfinite;
                self.state = StepState::NormDone(NormResult {
                    sum_sq,
                    overflow,
                    coef,
                });
            }
            StepState::Update { norm, .. } => {
                let skipped = norm.is_some_and(|n| n.overflow);
                let overflow = skipped || nonfinite > 0;
                let used_scale = self.scaler.scale() as f32;
                self.scaler.update(overflow);
                if skipped {
                    self.skipped_total += 1;
                } else {
                    self.steps += 1;
                }
                self.info = StepInfo {
                    step: self.steps,
                    grad_norm: norm.map_or(f32::NAN, |_| self.info.grad_norm),
                    clip_coef: if skipped { 0.0 } else { self.xform(norm).coef },
                    loss_scale: used_scale,
                    next_loss_scale: self.scaler.scale() as f32,
                    overflow,
                    skipped,
                    skipped_total: self.skipped_total,
                    grads_submitted: submitted,
                    grads_nonfinite: nonfinite,
                };
                self.state = StepState::Idle;
                self.accum_clear();
            }
            StepState::Idle | StepState::NormDone(_) | StepState::Accumulate => {
                bail!(
                    PhaseError,
                    "no phase is active: lomo_step_end must follow lomo_step_begin"
                )
            }
        }
        Ok(())
    }

    /// Abandons the current step: back to idle without advancing the scaler or the step counter.
    /// Updates already applied in an UPDATE phase stay applied.
    /// Accumulated gradients (`lomo_accum_enable`) of the step are discarded.
    pub fn cancel(&mut self) {
        self.state = StepState::Idle;
        self.epoch += 1;
        self.accum_clear();
    }

    /// The tensor records of the current phase, summed in id order (deterministic whatever the
    /// submission order).
    fn phase_totals(&self) -> PhaseTotals {
        let mut totals = PhaseTotals::default();
        for p in &self.params {
            let inner = p.inner.lock();
            if inner.epoch == self.epoch {
                let duplicate = p.shard.is_some_and(|s| s.norm_duplicate);
                totals.add(inner.finite, if duplicate { 0.0 } else { inner.sum_sq });
            }
        }
        totals
    }

    /// The CPU backend with this optimizer's host step record in state `state`.
    pub(super) fn cpu_step(&self, state: StepState) -> CpuStep<'_> {
        let (lr, norm) = match state {
            StepState::Update { lr, norm } => (lr, norm),
            _ => (0.0, None),
        };
        CpuStep {
            cfg: &self.config,
            host: HostStep {
                xf: self.xform(norm),
                lr,
                step: self.steps + 1,
                skip: norm.is_some_and(|n| n.overflow),
            },
        }
    }

    fn inv_scale(&self) -> f32 {
        (1.0 / self.scaler.scale()) as f32
    }

    fn xform(&self, norm: Option<NormResult>) -> crate::backend::GradXform {
        let v = self.config.clip_grad_value;
        crate::backend::GradXform {
            inv_scale: self.inv_scale(),
            clip_value: if v > 0.0 { v as f32 } else { f32::INFINITY },
            coef: norm.map_or(1.0, |n| n.coef),
        }
    }
}
