//! Core layer: the loss scaler (none, static, or dynamic with hysteresis).
//!
//! The dynamic rule is DeepSpeed's current `DynamicLossScaler.update_scale`
//! (`reference/semantics.md` §4) with two fixes: it is called after every step, so the scale grows
//! back (lomo-optim never calls it with `overflow = false`, bug B7), and reaching the minimum scale
//! is not an error (the step is skipped and reported, the run goes on).

use crate::config::{Config, LossScaleMode};

/// Loss-scaler state; everything here is saved in checkpoints.
#[derive(Clone, Debug, PartialEq)]
pub struct LossScaler {
    pub mode: LossScaleMode,
    pub scale: f64,
    pub factor: f64,
    pub window: u32,
    pub min_scale: f64,
    pub hysteresis: u32,
    /// Overflows still tolerated before the next back-off.
    pub cur_hysteresis: u32,
    /// Number of `update` calls so far.
    pub cur_iter: u64,
    /// `cur_iter` of the last overflow, or -1.
    pub last_overflow_iter: i64,
}

impl LossScaler {
    pub fn new(cfg: &Config) -> LossScaler {
        LossScaler {
            mode: cfg.loss_scale_mode,
            scale: cfg.initial_scale(),
            factor: cfg.scale_factor,
            window: cfg.scale_window,
            min_scale: cfg.min_loss_scale,
            hysteresis: cfg.hysteresis.max(1),
            cur_hysteresis: cfg.hysteresis.max(1),
            cur_iter: 0,
            last_overflow_iter: -1,
        }
    }

    /// The scale the trainer multiplies its loss by (1 when scaling is off).
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Advances the scaler after a step; `overflow` says whether a non-finite gradient was seen.
    pub fn update(&mut self, overflow: bool) {
        if self.mode != LossScaleMode::Dynamic {
            return;
        }
        if overflow {
            if self.hysteresis == 1 || self.cur_hysteresis == 1 {
                self.scale = (self.scale / self.factor).max(self.min_scale);
            } else {
                self.cur_hysteresis -= 1;
            }
            self.last_overflow_iter = self.cur_iter as i64;
        } else {
            let stable = self.cur_iter as i64 - self.last_overflow_iter - 1;
            if stable > 0 && stable % self.window as i64 == 0 {
                self.cur_hysteresis = self.hysteresis;
                // Never past the largest f32: an infinite scale makes every gradient infinite,
                // and backing off from infinity stays infinite — every later step skipped.
                if ((self.scale * self.factor) as f32).is_finite() {
                    self.scale *= self.factor;
                }
            }
        }
        self.cur_iter += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Algorithm;

    fn dynamic(window: u32, hysteresis: u32) -> LossScaler {
        let mut c = Config::defaults(Algorithm::Lomo);
        c.loss_scale_mode = LossScaleMode::Dynamic;
        c.scale_window = window;
        c.hysteresis = hysteresis;
        LossScaler::new(&c)
    }

    #[test]
    fn static_and_none_never_change() {
        let mut s = LossScaler::new(&Config::defaults(Algorithm::Adalomo));
        s.update(true);
        s.update(false);
        assert_eq!(s.scale(), 1024.0);
        let s = LossScaler::new(&Config::defaults(Algorithm::Lomo));
        assert_eq!(s.scale(), 1.0);
    }

    #[test]
    fn growth_stops_below_the_largest_f32() {
        let mut s = dynamic(1, 1);
        for _ in 0..400 {
            s.update(false);
        }
        assert_eq!(s.scale(), 2f64.powi(127));
        s.update(true);
        assert_eq!(s.scale(), 2f64.powi(126));
    }

    #[test]
    fn backs_off_and_floors() {
        let mut s = dynamic(1000, 1);
        for _ in 0..20 {
            s.update(true);
        }
        assert_eq!(s.scale(), 1.0);
    }
}
