//! CPU backend: [`CpuStep`], the [`Backend`] implementation over host memory. Its step record is
//! a handful of host values ([`HostStep`]) that the caller formed (the optimizer from its own
//! state, an XLA Host handler from its operands); its tensor records are [`CpuTensor`] fields.
//! The passes are [`super::norm`], [`super::lomo`] and [`super::adalomo`]; the scalars come from
//! [`crate::backend::scalars`]. Nothing here allocates.

use super::adalomo::{self, AdaWorkspace, ApplyArgs, StateViewMut, Stats, StatsArgs};
use super::convert::RoundCtx;
use super::{lomo, norm};
use crate::backend::interface::{Backend, PhaseBegin, TensorUpdate};
use crate::backend::{scalars, GradXform, RawBuf};
use crate::config::Config;
use crate::error::Result;

/// The per-step scalars of the CPU backend, as host values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HostStep {
    /// inv_scale (both phases), value clip and clip coefficient (UPDATE).
    pub xf: GradXform,
    /// UPDATE: the step's learning rate, before the group multiplier.
    pub lr: f64,
    /// UPDATE: AdaLomo's t (≥ 1) and the stochastic-rounding step.
    pub step: u64,
    /// UPDATE: the NORM phase found an overflow; no tensor changes.
    pub skip: bool,
}

/// The CPU backend in one call: the configuration and the host step record.
#[derive(Clone, Copy, Debug)]
pub struct CpuStep<'c> {
    /// Read: rounding, seed and AdaLomo's eps1, eps2, clip_threshold, decay_rate (the value
    /// clip is in `host.xf`; lr multiplier and weight decay come per tensor).
    pub cfg: &'c Config,
    pub host: HostStep,
}

/// AdaLomo's part of a [`CpuTensor`]: the state (updated only when the gradient is finite) and
/// the workspace holding pass A's results until pass C.
#[derive(Debug)]
pub struct CpuAda<'a> {
    pub state: StateViewMut<'a>,
    pub ws: &'a mut AdaWorkspace,
    /// Σp² carried from the previous apply (replaces the read of p for RMS(p)).
    pub carried_sum_sq: Option<f64>,
    /// Pass A's results.
    pub stats: Stats,
    /// Pass C ran (the state and the parameter changed).
    pub applied: bool,
    /// Σp² of the written values when pass C ran with `carry`.
    pub written_sum_sq: Option<f64>,
}

impl<'a> CpuAda<'a> {
    pub fn new(
        state: StateViewMut<'a>,
        ws: &'a mut AdaWorkspace,
        carried_sum_sq: Option<f64>,
    ) -> CpuAda<'a> {
        CpuAda {
            state,
            ws,
            carried_sum_sq,
            stats: Stats {
                finite: true,
                sum_u_sq: 0.0,
                sum_p_sq: 0.0,
            },
            applied: false,
            written_sum_sq: None,
        }
    }
}

/// One tensor on the CPU: the parameter, AdaLomo's state and workspace, and the tensor record.
#[derive(Debug)]
pub struct CpuTensor<'a> {
    /// The parameter (a gradient-only NORM pass may pass any buffer of the gradient's length).
    pub param: RawBuf,
    /// AdaLomo state and workspace (None for LOMO and NORM-only tensors).
    pub ada: Option<CpuAda<'a>>,
    /// Record: NORM's Σ(g·inv_scale)² over a finite gradient (0 otherwise).
    pub sum_sq: f64,
    /// Record: the gradient was finite (true until a pass finds otherwise).
    pub finite: bool,
}

impl<'a> CpuTensor<'a> {
    pub fn new(param: RawBuf, ada: Option<CpuAda<'a>>) -> CpuTensor<'a> {
        CpuTensor {
            param,
            ada,
            sum_sq: 0.0,
            finite: true,
        }
    }
}

impl CpuStep<'_> {
    fn round(&self, u: &TensorUpdate) -> RoundCtx {
        RoundCtx {
            mode: self.cfg.rounding,
            seed: self.cfg.seed,
            step: self.host.step,
            param_id: u.param_id,
        }
    }

    /// The tensor's lr after the group multiplier (f64, as lomo-optim forms it).
    fn lr(&self, u: &TensorUpdate) -> f64 {
        self.host.lr * u.lr_multiplier
    }
}

fn ada<'t, 'a>(t: &'t mut CpuTensor<'a>) -> &'t mut CpuAda<'a> {
    t.ada.as_mut().expect("AdaLomo tensors carry AdaLomo state")
}

impl Backend for CpuStep<'_> {
    type Tensor<'t> = CpuTensor<'t>;

    fn phase_begin(&self, _begin: &PhaseBegin) -> Result<()> {
        Ok(())
    }

    fn norm(&self, t: &mut CpuTensor<'_>, g: &RawBuf) -> Result<()> {
        if g.numel > 0 {
            (t.sum_sq, t.finite) = norm::grad_sum_sq(g, self.host.xf.inv_scale);
        }
        Ok(())
    }

    fn check_finite(&self, t: &mut CpuTensor<'_>, g: &RawBuf) -> Result<()> {
        if g.numel > 0 && !self.host.skip {
            t.finite = norm::grad_all_finite(g);
        }
        Ok(())
    }

    fn lomo(&self, t: &mut CpuTensor<'_>, g: &RawBuf, u: &TensorUpdate) -> Result<()> {
        if t.param.numel == 0 || self.host.skip || !t.finite {
            return Ok(());
        }
        let (decay, neg_lr) = scalars::lomo_scalars(self.lr(u), u.weight_decay);
        if !(decay.is_finite() && neg_lr.is_finite()) {
            t.finite = false; // lr · weight_decay or lr overflows f32: nothing is written
            return Ok(());
        }
        let args = lomo::LomoArgs {
            xf: self.host.xf,
            decay,
            neg_lr,
            round: self.round(u),
        };
        t.finite = lomo::lomo_update(&t.param, g, &args);
        Ok(())
    }

    fn ada_stats(&self, t: &mut CpuTensor<'_>, g: &RawBuf, _u: &TensorUpdate) -> Result<()> {
        if t.param.numel == 0 || self.host.skip {
            return Ok(());
        }
        let (beta, one_minus_beta) = scalars::adalomo_beta(self.host.step, self.cfg.decay_rate);
        let param = t.param;
        let a = ada(t);
        let st = StatsArgs {
            xf: self.host.xf,
            beta,
            one_minus_beta,
            eps1: self.cfg.eps1 as f32,
            need_psq: a.carried_sum_sq.is_none(),
        };
        a.stats = adalomo::stats(&param, g, a.state.as_view(), a.ws, &st);
        t.finite = a.stats.finite;
        Ok(())
    }

    fn ada_apply(&self, t: &mut CpuTensor<'_>, g: &RawBuf, u: &TensorUpdate) -> Result<()> {
        let n = t.param.numel;
        if n == 0 || self.host.skip || !t.finite {
            return Ok(());
        }
        let param = t.param;
        let a = ada(t);
        let sum_p_sq = a.carried_sum_sq.unwrap_or(a.stats.sum_p_sq);
        let rms = scalars::param_rms(sum_p_sq, n);
        let (decay, neg_lr) =
            scalars::adalomo_scalars(self.lr(u), u.weight_decay, self.cfg.eps2, rms);
        let inv_clip = 1.0 / scalars::update_clip(a.stats.sum_u_sq, n, self.cfg.clip_threshold);
        // Finite gradients can still overflow the f32 statistics (g² for |g/S| ≳ 1.8e19, Σp² for
        // parameters above ~1.8e19) or the scalars: that step would write NaN or silently zero
        // updates, so it is refused like a non-finite gradient, before anything changes.
        let clean = a.stats.sum_u_sq.is_finite()
            && rms.is_finite()
            && a.ws.new_state_finite()
            && decay.is_finite()
            && neg_lr.is_finite()
            && inv_clip.is_finite();
        if !clean {
            t.finite = false;
            return Ok(());
        }
        adalomo::commit(a.state.reborrow(), a.ws);
        let args = ApplyArgs {
            xf: self.host.xf,
            inv_clip,
            decay,
            neg_lr,
            round: self.round(u),
            carry: u.carry,
        };
        let (written, no_overflow) = adalomo::apply(&param, g, a.ws, &args);
        a.applied = true;
        a.written_sum_sq = u.carry.then_some(written);
        // Elements whose new value would overflow the dtype kept their old value: reported.
        t.finite = no_overflow;
        Ok(())
    }

    fn phase_end(&self, _update: bool) -> Result<()> {
        Ok(())
    }
}
