//! Core layer: optimizer configuration, its documented defaults and its validation.
//!
//! Defaults follow lomo-optim 0.1.1 (`reference/semantics.md` §2.1, §3.1), except that LOMO's
//! dynamic loss scaling starts at 2^16 and grows back (design.md §4).

use crate::error::{bail, Error, Result};

/// The smallest positive normal f32 (2^-126), as f64: the lower bound of every positive
/// configuration value the step uses in f32.
pub(crate) const MIN_NORMAL: f64 = f32::MIN_POSITIVE as f64;

/// Which update rule the optimizer applies.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// Fused SGD with decoupled weight decay (LOMO).
    Lomo = 0,
    /// Factored second moment, grouped update normalization, relative step size (AdaLomo).
    Adalomo = 1,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Lomo => "lomo",
            Algorithm::Adalomo => "adalomo",
        }
    }
}

impl TryFrom<u32> for Algorithm {
    type Error = Error;
    fn try_from(v: u32) -> Result<Algorithm> {
        match v {
            0 => Ok(Algorithm::Lomo),
            1 => Ok(Algorithm::Adalomo),
            _ => Err(Error::invalid(format!(
                "unknown algorithm {v} (expected 0=LOMO, 1=ADALOMO)"
            ))),
        }
    }
}

/// How gradients are scaled.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LossScaleMode {
    /// Scale 1; non-finite gradients are still never applied.
    None = 0,
    /// A fixed scale (`loss_scale`).
    Static = 1,
    /// Back off on overflow, grow back after `scale_window` clean steps.
    Dynamic = 2,
}

impl TryFrom<u32> for LossScaleMode {
    type Error = Error;
    fn try_from(v: u32) -> Result<LossScaleMode> {
        match v {
            0 => Ok(LossScaleMode::None),
            1 => Ok(LossScaleMode::Static),
            2 => Ok(LossScaleMode::Dynamic),
            _ => Err(Error::invalid(format!(
                "unknown loss_scale_mode {v} (expected 0=NONE, 1=STATIC, 2=DYNAMIC)"
            ))),
        }
    }
}

/// How f32 results are written back into f16/bf16 parameters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rounding {
    /// Round to nearest, ties to even (what `Tensor.copy_` does).
    Nearest = 0,
    /// Stochastic rounding from a counter-based generator (seed, step, parameter, element).
    Stochastic = 1,
}

impl TryFrom<u32> for Rounding {
    type Error = Error;
    fn try_from(v: u32) -> Result<Rounding> {
        match v {
            0 => Ok(Rounding::Nearest),
            1 => Ok(Rounding::Stochastic),
            _ => Err(Error::invalid(format!(
                "unknown rounding {v} (expected 0=NEAREST, 1=STOCHASTIC)"
            ))),
        }
    }
}

/// What LOMO does with a gradient holding a non-finite element when no NORM phase of the step
/// checked it (with a NORM phase, the whole step is skipped whatever the policy).
///
/// * `PerTensor` (default, exact): the tensor is left untouched. On the CPU this costs an extra
///   read of the gradient (the pre-check) before the update pass, because the update cannot be
///   rolled back once written.
/// * `PerElement` (one pass, opt-in): the update is applied to every element whose gradient is
///   finite; an element whose gradient is ±inf or NaN keeps its old value. No non-finite value
///   is ever written either way, and the tensor still counts as non-finite in the step
///   (`grads_nonfinite`, `overflow`, the dynamic loss scale backs off), but the tensor's other
///   elements did change. CPU backend, whole tensors and pieces of distributed tensors (a piece
///   then needs no per-tensor agreement with the other ranks: one record per phase end; each
///   rank counts its own non-finite pieces); CUDA parameters keep the per-tensor check (CUDA
///   refuses the policy at registration). AdaLomo
///   needs the whole gradient's statistics before any element changes, so the policy does not
///   apply to it.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NonFinitePolicy {
    /// The tensor is left as it was (two reads of the gradient on the CPU).
    PerTensor = 0,
    /// Only the elements with a non-finite gradient keep their value (one pass).
    PerElement = 1,
}

impl TryFrom<u32> for NonFinitePolicy {
    type Error = Error;
    fn try_from(v: u32) -> Result<NonFinitePolicy> {
        match v {
            0 => Ok(NonFinitePolicy::PerTensor),
            1 => Ok(NonFinitePolicy::PerElement),
            _ => Err(Error::invalid(format!(
                "unknown nonfinite_policy {v} (expected 0=PER_TENSOR, 1=PER_ELEMENT)"
            ))),
        }
    }
}

/// The validated configuration of one optimizer.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub algorithm: Algorithm,
    /// Decoupled weight decay of group 0 (p ← p·(1 − lr·wd) before the step). 0 = off.
    pub weight_decay: f64,
    /// Global gradient-norm clipping threshold; 0 = off. When on, every step needs a NORM phase.
    pub clip_grad_norm: f64,
    /// Element-wise gradient clipping to [−v, v]; 0 = off.
    pub clip_grad_value: f64,
    pub loss_scale_mode: LossScaleMode,
    /// The static scale, or the initial dynamic scale.
    pub loss_scale: f64,
    /// Dynamic scaling: factor of each back-off and growth.
    pub scale_factor: f64,
    /// Dynamic scaling: clean steps between two growths.
    pub scale_window: u32,
    /// Dynamic scaling: the scale never goes below this.
    pub min_loss_scale: f64,
    /// Dynamic scaling: overflows tolerated before a back-off (DeepSpeed's `delayed_shift`).
    pub hysteresis: u32,
    /// AdaLomo: added to every squared gradient element before the row/column means.
    pub eps1: f64,
    /// AdaLomo: lower bound of the parameter RMS in the relative step size.
    pub eps2: f64,
    /// AdaLomo: the update is divided by max(1, RMS(update)/clip_threshold).
    pub clip_threshold: f64,
    /// AdaLomo: β2t = 1 − t^decay_rate.
    pub decay_rate: f64,
    pub rounding: Rounding,
    /// Seed of the stochastic-rounding generator.
    pub seed: u64,
    /// LOMO without a NORM phase: what a non-finite gradient element does to its tensor.
    pub nonfinite: NonFinitePolicy,
}

impl Config {
    /// lomo-optim's defaults for the algorithm (see the header for the list).
    pub fn defaults(algorithm: Algorithm) -> Config {
        let (mode, scale) = match algorithm {
            Algorithm::Lomo => (LossScaleMode::None, 65536.0),
            Algorithm::Adalomo => (LossScaleMode::Static, 1024.0),
        };
        Config {
            algorithm,
            weight_decay: 0.0,
            clip_grad_norm: 0.0,
            clip_grad_value: 0.0,
            loss_scale_mode: mode,
            loss_scale: scale,
            scale_factor: 2.0,
            scale_window: 1000,
            min_loss_scale: 1.0,
            hysteresis: 1,
            eps1: 1e-30,
            eps2: 1e-3,
            clip_threshold: 1.0,
            decay_rate: -0.8,
            rounding: Rounding::Nearest,
            seed: 0,
            nonfinite: NonFinitePolicy::PerTensor,
        }
    }

    /// Checks every field; the message names the field and the accepted range.
    ///
    /// Beyond "finite and non-negative", the ranges exclude values the f32 arithmetic of a step
    /// would turn into non-finite parameters or silently zero updates (issue 13, kind 4):
    /// every positive value that the step uses as an f32 must be a normal f32 (a smaller one
    /// rounds to 0 or flushes, a larger one to infinity), so `clip_grad_value = 1e-300` cannot
    /// clamp every gradient to 0, `loss_scale = 1e-300` cannot make 1/S infinite, and
    /// AdaLomo's `eps1` and `eps2` must be positive: with `eps1 = 0` a row or column whose
    /// gradient is all zero gives 0/0 = NaN, and with `eps2 = 0` a parameter that is all zero
    /// (zero-initialised biases) has a zero step size and never trains. `eps1` is also at most
    /// 1: it regularises squared gradients (lomo-optim's 1e-30), and large values would both
    /// swamp them and overflow the f32 row and column sums.
    pub fn validate(&self) -> Result<()> {
        fn finite_nonneg(name: &str, v: f64) -> Result<()> {
            if !(v.is_finite() && v >= 0.0) {
                bail!(
                    InvalidArgument,
                    "config.{name} must be finite and >= 0, got {v}"
                );
            }
            Ok(())
        }
        /// A value the step uses as a positive f32.
        fn normal_f32(name: &str, v: f64, why: &str) -> Result<()> {
            if !(v >= MIN_NORMAL && v <= f32::MAX as f64) {
                bail!(
                    InvalidArgument,
                    "config.{name} must be in [{MIN_NORMAL:e}, {:e}] (a normal f32{why}), got {v}",
                    f32::MAX
                );
            }
            Ok(())
        }
        /// 0 (off) or a positive f32.
        fn off_or_normal_f32(name: &str, v: f64) -> Result<()> {
            finite_nonneg(name, v)?;
            if v != 0.0 {
                normal_f32(name, v, "; 0 turns it off")?;
            }
            Ok(())
        }
        finite_nonneg("weight_decay", self.weight_decay)?;
        off_or_normal_f32("clip_grad_norm", self.clip_grad_norm)?;
        off_or_normal_f32("clip_grad_value", self.clip_grad_value)?;
        if self.loss_scale_mode != LossScaleMode::None {
            normal_f32(
                "loss_scale",
                self.loss_scale,
                ", so that 1/loss_scale is finite",
            )?;
        }
        if self.loss_scale_mode == LossScaleMode::Dynamic {
            if !(self.scale_factor.is_finite() && self.scale_factor > 1.0) {
                bail!(
                    InvalidArgument,
                    "config.scale_factor must be > 1, got {}",
                    self.scale_factor
                );
            }
            if self.scale_window == 0 {
                bail!(InvalidArgument, "config.scale_window must be >= 1");
            }
            normal_f32("min_loss_scale", self.min_loss_scale, "")?;
            if self.min_loss_scale > self.loss_scale {
                bail!(
                    InvalidArgument,
                    "config.min_loss_scale ({}) exceeds config.loss_scale ({})",
                    self.min_loss_scale,
                    self.loss_scale
                );
            }
            if self.hysteresis == 0 {
                bail!(InvalidArgument, "config.hysteresis must be >= 1");
            }
        }
        if self.algorithm == Algorithm::Adalomo {
            if !(self.eps1 >= MIN_NORMAL && self.eps1 <= 1.0) {
                bail!(
                    InvalidArgument,
                    "config.eps1 must be in [{MIN_NORMAL:e}, 1] (lomo-optim's default 1e-30): \
                     with 0, a row or column whose gradient is all zero divides 0 by 0; got {}",
                    self.eps1
                );
            }
            if !(self.eps2 >= MIN_NORMAL && self.eps2 <= f32::MAX as f64) {
                bail!(
                    InvalidArgument,
                    "config.eps2 must be in [{MIN_NORMAL:e}, {:e}] (lomo-optim's default 1e-3): \
                     with 0, an all-zero parameter (a zero-initialised bias) has step size 0 \
                     and never trains; got {}",
                    f32::MAX,
                    self.eps2
                );
            }
            normal_f32("clip_threshold", self.clip_threshold, "")?;
            if !(self.decay_rate.is_finite() && self.decay_rate < 0.0) {
                bail!(
                    InvalidArgument,
                    "config.decay_rate must be < 0 (beta2t = 1 - t^decay_rate), got {}",
                    self.decay_rate
                );
            }
        }
        Ok(())
    }

    /// The loss scale a step starts with.
    pub fn initial_scale(&self) -> f64 {
        match self.loss_scale_mode {
            LossScaleMode::None => 1.0,
            _ => self.loss_scale,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        Config::defaults(Algorithm::Lomo).validate().unwrap();
        Config::defaults(Algorithm::Adalomo).validate().unwrap();
        assert_eq!(Config::defaults(Algorithm::Adalomo).initial_scale(), 1024.0);
        assert_eq!(Config::defaults(Algorithm::Lomo).initial_scale(), 1.0);
    }

    #[test]
    fn rejects_bad_fields() {
        let mut c = Config::defaults(Algorithm::Adalomo);
        c.decay_rate = 0.5;
        assert!(c.validate().unwrap_err().message().contains("decay_rate"));
        let mut c = Config::defaults(Algorithm::Lomo);
        c.clip_grad_norm = f64::NAN;
        assert!(c.validate().is_err());
        c.clip_grad_norm = 1.0;
        c.loss_scale_mode = LossScaleMode::Dynamic;
        c.scale_factor = 1.0;
        assert!(c.validate().unwrap_err().message().contains("scale_factor"));
    }
}
