//! Shared by the tests of gradient accumulation on distributed optimizers (`dist_accum.rs`,
//! `cuda_dist_accum.rs`): the comparison of accumulating ranks with one rank on the global
//! batch, and the cases it runs.

use super::dist::*;
use super::*;
use lomo::ffi::dist::*;
use lomo::ffi::types::LOMO_DEVICE_CPU;

/// `c` on `n` ranks against one CPU rank without accumulation on the global batch's gradient
/// (ranks on emulated CUDA when `c.device` is 0: AdaLomo within the CPU/CUDA parity tolerance).
pub fn compare(c: &Case, n: usize) {
    if c.device >= 0 {
        std::env::set_var("LOMO_CUDA_EMULATE", "1");
    }
    let one = Case {
        micro: 0,
        accum_mean: false,
        early_late: None,
        reverse_odd: false,
        device: LOMO_DEVICE_CPU,
        ..c.clone()
    };
    let (whole, whole_info) = run(&one, 0);
    let (pieces, infos) = run(c, n);
    let what = format!(
        "n={n} k={} mean={} early_late={:?} reverse={} alg={} dtype={} clip={} value={} wd={} \
         dyn={} inf={:?} cols={} flat={} full={} grad_mode={} device={}",
        c.micro,
        c.accum_mean,
        c.early_late,
        c.reverse_odd,
        c.algorithm,
        c.dtype,
        c.clip_norm,
        c.clip_value,
        c.wd,
        c.dynamic,
        c.inf,
        c.cols,
        c.flat,
        c.full,
        c.grad_mode,
        c.device
    );
    for step in 0..STEPS {
        for (i, (w, p)) in whole[step].iter().zip(&pieces[step]).enumerate() {
            for (k, (a, b)) in w.iter().zip(p).enumerate() {
                let ok = if c.algorithm == 0 {
                    a.to_bits() == b.to_bits()
                } else if c.device >= 0 {
                    super::parity::close(c.dtype, *a, *b)
                } else {
                    ulps(c.dtype, *a, *b) <= 1.0 || (a - b).abs() <= 1e-7 + 1e-6 * a.abs()
                };
                assert!(
                    ok,
                    "{what}: step {step} tensor {i} element {k}: one rank {a}, ranks {b}"
                );
            }
        }
        let w = whole_info[0][step];
        for (r, info) in infos.iter().enumerate() {
            let i = info[step];
            let norm_ok = (i.grad_norm.is_nan() && w.grad_norm.is_nan())
                || (i.grad_norm - w.grad_norm).abs() <= 1e-6 * w.grad_norm.abs();
            assert!(
                norm_ok,
                "{what}: step {step} rank {r}: norm {} vs {}",
                i.grad_norm, w.grad_norm
            );
            assert_eq!(
                (
                    i.step,
                    i.skipped,
                    i.overflow,
                    i.loss_scale.to_bits(),
                    i.next_loss_scale.to_bits(),
                    i.clip_coef.to_bits() == w.clip_coef.to_bits() || c.algorithm == 1,
                    i.grads_submitted,
                ),
                (
                    w.step,
                    w.skipped,
                    w.overflow,
                    w.loss_scale.to_bits(),
                    w.next_loss_scale.to_bits(),
                    true,
                    w.grads_submitted,
                ),
                "{what}: step {step} rank {r}: diagnostics differ from one rank's"
            );
        }
    }
}

/// The layouts: rows, columns, flat pieces, replicas submitting the reduced gradient, replicas
/// reducing it in the library (ALL_REDUCE), partitions reduce-scattering it.
pub fn layouts(algorithm: u32) -> Vec<Case> {
    let base = case(algorithm);
    vec![
        base.clone(),
        Case {
            cols: true,
            ..base.clone()
        },
        Case {
            flat: true,
            ..base.clone()
        },
        Case {
            full: true,
            ..base.clone()
        },
        Case {
            grad_mode: LOMO_GRAD_ALL_REDUCE,
            ..base.clone()
        },
        Case {
            grad_mode: LOMO_GRAD_REDUCE_SCATTER,
            ..base
        },
    ]
}

/// The options every layout is run with, `k` micro-batches.
pub fn variants(base: &Case, k: usize) -> Vec<Case> {
    let base = Case {
        micro: k,
        ..base.clone()
    };
    vec![
        base.clone(),
        Case {
            clip_norm: 0.5,
            wd: 0.1,
            clip_value: 0.3,
            early_late: Some((1, 4)),
            reverse_odd: true,
            ..base.clone()
        },
        Case {
            dtype: BF16,
            stochastic: true,
            static_scale: true,
            accum_mean: true,
            ..base.clone()
        },
        Case {
            dynamic: true,
            clip_norm: 1.0,
            inf: Some((1, 6)),
            reverse_odd: true,
            ..base.clone()
        },
        Case {
            dtype: F16,
            dynamic: true,
            inf: Some((2, 0)),
            early_late: Some((0, 5)),
            ..base
        },
    ]
}
