//! The step protocol on CUDA parameters (emulated launcher), where the clip coefficient and the
//! skip decision live on the device: a cancelled step's NORM results must not leak into the
//! next step, exactly as on the CPU.

mod common;

use common::*;
use lomo::ffi::optimizer::lomo_step_cancel;

const NORM: u32 = 0;
const UPDATE: u32 = 1;

/// One optimizer per device with the same parameter and configuration.
fn pair(cfg: &lomo::ffi::types::lomo_config) -> Vec<(Opt, Buf)> {
    std::env::set_var("LOMO_CUDA_EMULATE", "1");
    [-1, 0]
        .into_iter()
        .map(|device| {
            let opt = Opt::new(cfg).unwrap();
            let mut p = Buf::new(F32, &Rng::new(3).vec(64, 1.0));
            opt.register_on("w", p.ptr(), F32, &[8, 8], device, 0, 0)
                .unwrap();
            (opt, p)
        })
        .collect()
}

fn run_phase(opt: &Opt, phase: u32, g: &[f32]) {
    let mut g = Buf::new(F32, g);
    opt.begin(phase, 0.05).unwrap();
    opt.submit(0, g.ptr(), F32).unwrap();
    opt.end().unwrap();
}

#[test]
fn a_cancelled_overflowing_norm_phase_does_not_skip_the_next_step() {
    for algorithm in [0, 1] {
        let mut cfg = config(algorithm);
        cfg.loss_scale_mode = 2;
        cfg.loss_scale = 1024.0;
        for (opt, p) in pair(&cfg) {
            let before = p.values();
            let mut bad = vec![0.5f32; 64];
            bad[7] = f32::INFINITY;
            // NORM finds an overflow, then the trainer abandons the step.
            run_phase(&opt, NORM, &bad);
            // SAFETY: live handle.
            check(unsafe { lomo_step_cancel(opt.0) }).unwrap();
            // A step without a NORM phase (allowed: no norm clipping) must apply.
            run_phase(&opt, UPDATE, &[0.5f32 * 1024.0; 64]);
            let info = opt.info();
            assert_eq!(info.skipped, 0, "algorithm {algorithm}: {info:?}");
            assert_eq!(info.step, 1);
            assert_eq!(info.clip_coef, 1.0);
            assert!(info.grad_norm.is_nan(), "no NORM phase in this step");
            assert_ne!(p.values(), before, "the update was applied");
        }
    }
}

#[test]
fn cancelling_keeps_the_device_counters() {
    let cfg = config(1);
    let runs: Vec<_> = pair(&cfg)
        .into_iter()
        .map(|(opt, p)| {
            run_phase(&opt, UPDATE, &[0.1; 64]);
            opt.begin(UPDATE, 0.05).unwrap();
            // SAFETY: live handle.
            check(unsafe { lomo_step_cancel(opt.0) }).unwrap();
            run_phase(&opt, UPDATE, &[0.2; 64]);
            (opt.info(), p.values())
        })
        .collect();
    let ((a, pa), (b, pb)) = (&runs[0], &runs[1]);
    assert_eq!((a.step, a.skipped_total), (2, 0));
    assert_eq!((b.step, b.skipped_total), (2, 0));
    for (x, y) in pa.iter().zip(pb) {
        assert!(
            (x - y).abs() <= 2e-6 * x.abs().max(y.abs()) + 1e-7,
            "{x} vs {y}"
        );
    }
}
