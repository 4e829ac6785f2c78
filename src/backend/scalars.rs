//! Backend layer: the per-tensor scalars every backend derives the same way.
//!
//! lomo-optim computes derived scalars in double precision and rounds them to f32, except where a
//! 0-dim f32 tensor takes part (`reference/semantics.md` §2.4, §3.3); these functions reproduce
//! that exactly, so the CPU backend, the CUDA finalize kernel and the tests agree.

/// LOMO: `(decay, neg_lr)` with `p ← fma(x, neg_lr, p · decay)`.
pub fn lomo_scalars(lr: f64, weight_decay: f64) -> (f32, f32) {
    ((1.0 - lr * weight_decay) as f32, (-lr) as f32)
}

/// AdaLomo: β2t = 1 − t^decay_rate in double; returns `(beta, one_minus_beta)` as f32.
pub fn adalomo_beta(step: u64, decay_rate: f64) -> (f32, f32) {
    let beta = 1.0 - (step as f64).powf(decay_rate);
    (beta as f32, (1.0 - beta) as f32)
}

/// AdaLomo's parameter RMS: `‖p‖₂ / sqrt(numel)` with lomo-optim's f32 rounding.
pub fn param_rms(sum_sq: f64, numel: usize) -> f32 {
    (sum_sq.sqrt() as f32) / ((numel as f64).sqrt() as f32)
}

/// AdaLomo: `(decay, neg_lr)` for the relative step `lr · max(eps2, rms)`.
///
/// When the RMS wins, lomo-optim works with a 0-dim f32 tensor (f32 products); when `eps2` wins
/// it works with Python floats (double products rounded once).
pub fn adalomo_scalars(lr: f64, weight_decay: f64, eps2: f64, rms: f32) -> (f32, f32) {
    if (rms as f64) > eps2 {
        let lr_eff = (lr as f32) * rms;
        let decay = 1.0f32 - lr_eff * (weight_decay as f32);
        let decay = if weight_decay > 0.0 { decay } else { 1.0 };
        (decay, -lr_eff)
    } else {
        let lr_eff = lr * eps2;
        ((1.0 - lr_eff * weight_decay) as f32, (-lr_eff) as f32)
    }
}

/// AdaLomo's update-RMS clip divisor `max(1, RMS(u) / clip_threshold)` from Σu².
pub fn update_clip(sum_u_sq: f64, numel: usize, clip_threshold: f64) -> f32 {
    let rms = (sum_u_sq.sqrt() as f32) / ((numel as f64).sqrt() as f32);
    (rms / clip_threshold as f32).max(1.0)
}

/// The global-norm clip coefficient `min(1, C / (‖g‖ + 1e-6))` in f32, as lomo-optim forms it.
pub fn clip_coef(total_sum_sq: f64, clip_grad_norm: f64) -> f32 {
    let total = total_sum_sq.sqrt() as f32;
    ((clip_grad_norm as f32) / (total + 1e-6f32)).min(1.0)
}
