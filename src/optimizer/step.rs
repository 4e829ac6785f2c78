//! Core layer: the optimizer's step protocol — `begin`, `submit`, `end`, `cancel` — for CPU
//! parameters (updated here through [`crate::update`]) and CUDA ones (enqueued on the device
//! through [`crate::backend::cuda::side::CudaSide`]).

use super::{NormResult, Optimizer, Phase, StepInfo, StepState};
use crate::backend::cuda::device::Pass;
use crate::dtype::DType;
use crate::error::{bail, Result};
use crate::update;

impl Optimizer {
    /// Starts a phase. `lr` is used by UPDATE phases only.
    pub fn begin(&mut self, phase: Phase, lr: f64) -> Result<()> {
        self.begin_on(phase, lr, 0)
    }

    /// [`Optimizer::begin`] with the caller's CUDA stream (ignored for CPU parameters).
    pub fn begin_on(&mut self, phase: Phase, lr: f64, stream: usize) -> Result<()> {
        let next = match (phase, self.state) {
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
            (_, StepState::Norm | StepState::Update { .. }) => {
                bail!(
                    PhaseError,
                    "a phase is already active: call lomo_step_end first"
                )
            }
        };
        if phase == Phase::Update && !(lr.is_finite() && lr >= 0.0) {
            bail!(InvalidArgument, "lr must be finite and >= 0, got {lr}");
        }
        if let Some(side) = &self.cuda {
            let after_norm = matches!(next, StepState::Update { norm: Some(_), .. });
            side.begin(phase == Phase::Update, after_norm, lr as f32, stream)?;
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
        let mut inner = param.inner.lock();
        if matches!(self.state, StepState::Norm | StepState::Update { .. })
            && inner.epoch == self.epoch
        {
            bail!(
                DuplicateGradient,
                "the gradient of '{}' was already submitted in this phase",
                param.name
            );
        }
        let ctx = match self.state {
            StepState::Norm => update::Phase::Norm {
                inv_scale: self.inv_scale(),
            },
            StepState::Update { lr, norm } => {
                let group = self.groups[&param.group];
                update::Phase::Update {
                    skip: norm.is_some_and(|n| n.overflow),
                    prechecked: norm.is_some(),
                    xf: self.xform(norm),
                    lr: lr * group.lr_multiplier,
                    weight_decay: group.weight_decay,
                    step: self.steps + 1,
                    param_id: id,
                }
            }
            _ => bail!(
                PhaseError,
                "no phase is active: call lomo_step_begin before submitting gradients"
            ),
        };
        if let Some(side) = &self.cuda {
            let pass = match ctx {
                update::Phase::Norm { .. } => Pass::Norm,
                update::Phase::Update { prechecked, .. } => {
                    let group = self.groups[&param.group];
                    Pass::Update {
                        prechecked,
                        lr_mult: group.lr_multiplier,
                        weight_decay: group.weight_decay,
                    }
                }
            };
            side.submit(id, grad.addr, dtype, pass, stream)?;
            inner.epoch = self.epoch;
            return Ok(());
        }
        inner.epoch = self.epoch;
        update::run(&self.config, param, &mut inner, &grad, &ctx);
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
        if let (Some(side), StepState::Norm | StepState::Update { .. }) = (&self.cuda, self.state) {
            side.end(matches!(self.state, StepState::Update { .. }), stream)?;
        }
        let (submitted, nonfinite, sum_sq) = self.phase_totals();
        match self.state {
            StepState::Norm => {
                let overflow = nonfinite > 0;
                let coef = if self.config.clip_grad_norm > 0.0 && !overflow {
                    crate::backend::scalars::clip_coef(sum_sq, self.config.clip_grad_norm)
                } else {
                    1.0
                };
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
            }
            StepState::Idle | StepState::NormDone(_) => {
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
    pub fn cancel(&mut self) {
        self.state = StepState::Idle;
        self.epoch += 1;
    }

    /// (submitted, non-finite, Σ sum_sq) over the parameters submitted in the current phase, in
    /// id order (deterministic whatever the submission order).
    fn phase_totals(&self) -> (u32, u32, f64) {
        let (mut submitted, mut nonfinite, mut sum_sq) = (0u32, 0u32, 0f64);
        for p in &self.params {
            let inner = p.inner.lock();
            if inner.epoch == self.epoch {
                submitted += 1;
                if inner.finite {
                    sum_sq += inner.sum_sq;
                } else {
                    nonfinite += 1;
                }
            }
        }
        (submitted, nonfinite, sum_sq)
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
