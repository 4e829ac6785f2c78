//! Core layer: what one submitted gradient does to its parameter, per phase and algorithm.
//!
//! Scalars are derived here (through `backend::scalars`); the passes run in the backend.
//! [`lomo_tensor`] and [`adalomo_tensor`] update one tensor with explicit state, so the registry
//! path ([`run`]) and functional callers (the XLA handlers) share one implementation.

use crate::backend::cpu::adalomo::{self, AdaWorkspace, ApplyArgs, StateViewMut, StatsArgs};
use crate::backend::cpu::convert::RoundCtx;
use crate::backend::cpu::{lomo, norm};
use crate::backend::{scalars, GradXform, RawBuf};
use crate::config::{Algorithm, Config};
use crate::param::{Param, ParamInner, PARAM_FLAG_CARRY_RMS};

/// The per-phase context of one submission.
#[derive(Clone, Copy, Debug)]
pub enum Phase {
    Norm {
        inv_scale: f32,
    },
    Update {
        /// The NORM phase found an overflow: nothing is applied in this step.
        skip: bool,
        /// A clean NORM phase already checked every gradient for non-finite values.
        prechecked: bool,
        xf: GradXform,
        /// Group-adjusted learning rate and weight decay.
        lr: f64,
        weight_decay: f64,
        /// AdaLomo's t for this update (≥ 1).
        step: u64,
        param_id: u32,
    },
}

/// Runs one submission; records `sum_sq` and `finite` in `inner`.
pub fn run(cfg: &Config, param: &Param, inner: &mut ParamInner, grad: &RawBuf, phase: &Phase) {
    inner.sum_sq = 0.0;
    inner.finite = true;
    if param.numel() == 0 {
        return;
    }
    match *phase {
        Phase::Norm { inv_scale } => {
            let (s, finite) = norm::grad_sum_sq(grad, inv_scale);
            inner.sum_sq = s;
            inner.finite = finite;
        }
        Phase::Update { skip: true, .. } => {}
        Phase::Update {
            prechecked,
            xf,
            lr,
            weight_decay,
            step,
            param_id,
            ..
        } => {
            let round = RoundCtx {
                mode: cfg.rounding,
                seed: cfg.seed,
                step,
                param_id,
            };
            let t = TensorStep {
                xf,
                lr,
                weight_decay,
                step,
                round,
            };
            inner.finite = match cfg.algorithm {
                Algorithm::Lomo => lomo_tensor(&param.buf, grad, &t, !prechecked),
                Algorithm::Adalomo => {
                    let ada = inner
                        .ada
                        .as_mut()
                        .expect("AdaLomo parameters carry AdaLomo state");
                    let carry = param.flags & PARAM_FLAG_CARRY_RMS != 0;
                    let carried = if carry { ada.carried_psq } else { None };
                    let out = adalomo_tensor(
                        cfg,
                        &param.buf,
                        grad,
                        ada.state.as_view_mut(),
                        &mut ada.ws,
                        &t,
                        carry,
                        carried,
                    );
                    if let Some(written) = out.written_sum_sq {
                        ada.carried_psq = Some(written);
                    }
                    out.finite
                }
            };
        }
    }
}

/// The scalars of one tensor's update.
#[derive(Clone, Copy, Debug)]
pub struct TensorStep {
    pub xf: GradXform,
    /// Learning rate and weight decay after group adjustment.
    pub lr: f64,
    pub weight_decay: f64,
    /// Update step t (≥ 1).
    pub step: u64,
    pub round: RoundCtx,
}

/// LOMO on one tensor; returns whether the step was clean: the gradient finite (if not, nothing
/// was written when `precheck` is set, and only finite tiles otherwise), the scalars finite (if
/// not, nothing was written) and no new value overflowing the dtype (such elements keep their
/// old value). Never writes a non-finite element.
pub fn lomo_tensor(param: &RawBuf, grad: &RawBuf, t: &TensorStep, precheck: bool) -> bool {
    if param.numel == 0 {
        return true;
    }
    if precheck && !norm::grad_all_finite(grad) {
        return false;
    }
    let (decay, neg_lr) = scalars::lomo_scalars(t.lr, t.weight_decay);
    if !(decay.is_finite() && neg_lr.is_finite()) {
        return false; // lr · weight_decay or lr overflows f32
    }
    lomo::lomo_update(
        param,
        grad,
        &lomo::LomoArgs {
            xf: t.xf,
            decay,
            neg_lr,
            round: t.round,
        },
    )
}

/// What [`adalomo_tensor`] did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdaOutcome {
    /// False: the gradient had a non-finite element, or the f32 statistics or scalars it gives
    /// overflow (neither state nor parameter changed; `written_sum_sq` is None), or some new
    /// values overflow the parameter's dtype (those elements keep their old values).
    pub finite: bool,
    /// Σp² of the written parameter, when `carry` was requested and the update was applied.
    pub written_sum_sq: Option<f64>,
}

/// AdaLomo on one tensor with explicit state and workspace. `carried_sum_sq` replaces the read
/// of p for RMS(p) when given; `carry` asks for Σp² of the written values.
#[allow(clippy::too_many_arguments)]
pub fn adalomo_tensor(
    cfg: &Config,
    param: &RawBuf,
    grad: &RawBuf,
    state: StateViewMut<'_>,
    ws: &mut AdaWorkspace,
    t: &TensorStep,
    carry: bool,
    carried_sum_sq: Option<f64>,
) -> AdaOutcome {
    let n = param.numel;
    if n == 0 {
        return AdaOutcome {
            finite: true,
            written_sum_sq: carry.then_some(0.0),
        };
    }
    let (beta, one_minus_beta) = scalars::adalomo_beta(t.step, cfg.decay_rate);
    let need_psq = carried_sum_sq.is_none();
    let st = StatsArgs {
        xf: t.xf,
        beta,
        one_minus_beta,
        eps1: cfg.eps1 as f32,
        need_psq,
    };
    let stats = adalomo::stats(param, grad, state.as_view(), ws, &st);
    if !stats.finite {
        return AdaOutcome {
            finite: false,
            written_sum_sq: None,
        };
    }
    let sum_p_sq = carried_sum_sq.unwrap_or(stats.sum_p_sq);
    let rms = scalars::param_rms(sum_p_sq, n);
    let (decay, neg_lr) = scalars::adalomo_scalars(t.lr, t.weight_decay, cfg.eps2, rms);
    let inv_clip = 1.0 / scalars::update_clip(stats.sum_u_sq, n, cfg.clip_threshold);
    // Finite gradients can still overflow the f32 statistics (g² for |g/S| ≳ 1.8e19, Σp² for
    // parameters above ~1.8e19) or the scalars: that step would write NaN or silently zero
    // updates, so it is refused like a non-finite gradient, before anything changes.
    let clean = stats.sum_u_sq.is_finite()
        && rms.is_finite()
        && ws.new_state_finite()
        && decay.is_finite()
        && neg_lr.is_finite()
        && inv_clip.is_finite();
    if !clean {
        return AdaOutcome {
            finite: false,
            written_sum_sq: None,
        };
    }
    adalomo::commit(state, ws);
    let args = ApplyArgs {
        xf: t.xf,
        inv_clip,
        decay,
        neg_lr,
        round: t.round,
        carry,
    };
    let (written, no_overflow) = adalomo::apply(param, grad, ws, &args);
    AdaOutcome {
        finite: no_overflow,
        written_sum_sq: carry.then_some(written),
    }
}
