//! The CUDA backend's orchestration and kernels, run through the emulated launcher (the kernel
//! sources compiled for the host, host memory standing in for device memory, workspaces
//! poisoned with NaN), against the CPU backend: every algorithm, parameter/gradient dtype pair
//! and option, on shapes 1, 31, 4097, 3×4097, 3×5×7, 16×64, 3×4104 and 2×8192, over several steps.
//! Parameters must agree per element after every step (f32: 2e-6 relative; f16/bf16: 1 ulp;
//! reductions run in a different order), with 1e-7 absolute slack near zero; NaN never passes.
//! Optimizer state and step diagnostics are compared too.

mod common;

use std::sync::Arc;

use common::parity::*;
use common::*;
use lomo::backend::cuda::device::{DeviceOpt, ParamSpec};
use lomo::backend::cuda::emu::EmuLauncher;
use lomo::backend::cuda::passes::Shape;
use lomo::backend::{PhaseBegin, RawBuf, TensorUpdate};
use lomo::orchestrate::{self, PhaseTotals, TensorPass};
use lomo::{
    Algorithm, Config, DType, Device, LossScaleMode, Optimizer, ParamDesc, Phase, Rounding,
};

fn dt(code: u32) -> DType {
    DType::try_from(code).unwrap()
}

struct Case {
    cfg: Config,
    p_dtype: u32,
    g_dtype: u32,
    steps: usize,
    carry: bool,
    /// (step, shape index) whose gradient gets an inf (odd steps) or a NaN (even steps).
    inject_inf: Option<(usize, usize)>,
    /// Every other row's gradient is zero and the rest ±1e12 (issue 13: the zero rows' scale
    /// rsqrt(row / mean(row)) underflowed to 1/0 and made their update inf · 0 = NaN).
    zero_rows_next_to_large: bool,
    /// Every other parameter element starts at ±65504, the largest f16, the others at 0
    /// (issue 13: a new value that overflows the dtype keeps its old value; never inf).
    largest_f16_params: bool,
    /// (step, shape index) whose gradient gets elements of ±1e20 (finite; AdaLomo's f32 g²
    /// overflows: refused as overflow before any state changes).
    huge_grad_at: Option<(usize, usize)>,
}

fn run(case: &Case) {
    let mut rng = Rng::new(7 + case.p_dtype as u64 * 3 + case.g_dtype as u64);
    let cfg = &case.cfg;
    let mut cpu = Optimizer::new(cfg.clone()).unwrap();
    let launcher = Arc::new(EmuLauncher::new(3));
    let mut dev = DeviceOpt::new(launcher, cfg).unwrap();
    let mut cpu_bufs = Vec::new();
    let mut dev_bufs = Vec::new();
    for (i, shape) in SHAPES.iter().enumerate() {
        let n: i64 = shape.iter().product();
        let mut vals = rng.vec(n as usize, 1.0);
        if case.largest_f16_params {
            // The others start at 0: with RMS(p) ~ 4.6e4, AdaLomo's steps are ~500, and values
            // of order 1 would be differences of such numbers (cancellation).
            for (e, v) in vals.iter_mut().enumerate() {
                *v = [65504.0, 0.0, -65504.0, 0.0][e % 4];
            }
        }
        cpu_bufs.push(Buf::new(case.p_dtype, &vals));
        dev_bufs.push(Buf::new(case.p_dtype, &vals));
        let name = format!("p{i}");
        let desc = ParamDesc {
            name: &name,
            addr: cpu_bufs[i].ptr() as usize,
            dtype: dt(case.p_dtype),
            shape,
            device: Device::Cpu,
            group: 0,
            flags: case.carry as u32,
        };
        let id = cpu.register(&desc).unwrap();
        let factored = shape.len() >= 2;
        let cols = *shape.last().unwrap() as u64;
        let rows = if factored { n as u64 / cols } else { n as u64 };
        let idx = dev
            .register(&ParamSpec {
                param_id: id,
                p: dev_bufs[i].ptr() as u64,
                dtype: dt(case.p_dtype),
                shape: Shape::new(n as u64, rows, cols, factored),
            })
            .unwrap();
        assert_eq!(idx, i);
    }
    let scale = cfg.initial_scale() as f32;
    let norm_phase = cfg.clip_grad_norm > 0.0;
    for step in 0..case.steps {
        let lr = [1e-2f32, 3e-3, 5e-2][step % 3];
        let grads: Vec<Buf> = SHAPES
            .iter()
            .enumerate()
            .map(|(i, shape)| {
                let n: i64 = shape.iter().product();
                let mut g: Vec<f32> = rng.vec(n as usize, 0.5 * scale.min(1e4));
                if case.huge_grad_at == Some((step, i)) {
                    g.iter_mut().step_by(3).for_each(|v| *v = v.signum() * 1e20);
                }
                if case.largest_f16_params {
                    // LOMO's lr·g of up to ~100 pushes some ±65504 past the f16 range.
                    g.iter_mut().for_each(|v| *v *= 3000.0);
                }
                if case.zero_rows_next_to_large {
                    let cols = *shape.last().unwrap() as usize;
                    for (e, v) in g.iter_mut().enumerate() {
                        *v = if (e / cols) % 2 == 0 {
                            0.0
                        } else {
                            v.signum() * 1e12
                        };
                    }
                }
                if case.inject_inf == Some((step, i)) {
                    g[n as usize / 2] = if step % 2 == 0 {
                        f32::NAN
                    } else {
                        f32::INFINITY
                    };
                }
                Buf::new(case.g_dtype, &g)
            })
            .collect();
        let mut grads = grads;
        let phases: &[Phase] = if norm_phase {
            &[Phase::Norm, Phase::Update]
        } else {
            &[Phase::Update]
        };
        for &phase in phases {
            let update = phase == Phase::Update;
            cpu.begin(phase, lr as f64).unwrap();
            // The device side through the core's orchestration, as the optimizer drives it.
            let b = dev.step(0);
            let begin = PhaseBegin {
                update,
                after_norm: norm_phase,
                lr: lr as f64,
            };
            orchestrate::begin(&b, &begin).unwrap();
            for (i, g) in grads.iter_mut().enumerate() {
                cpu.submit(i as u32, g.ptr() as usize, dt(case.g_dtype))
                    .unwrap();
                let pass = if update {
                    TensorPass::Update(TensorUpdate {
                        param_id: i as u32,
                        lr_multiplier: 1.0,
                        weight_decay: cfg.weight_decay,
                        prechecked: norm_phase,
                        per_element: false,
                        carry: case.carry,
                    })
                } else {
                    TensorPass::Norm
                };
                let grad = RawBuf {
                    addr: g.ptr() as usize,
                    dtype: dt(case.g_dtype),
                    numel: g.len(),
                };
                let mut t = dev.tensor(i, &grad).unwrap();
                orchestrate::tensor(&b, cfg.algorithm, &mut t, &grad, &pass, None).unwrap();
            }
            cpu.end().unwrap();
            orchestrate::end(&b, update, PhaseTotals::default(), None).unwrap();
        }
        let what = format!(
            "{} p={} g={} step {step} (carry {}, {:?}, clip_norm {}, clip_value {}, wd {}, {:?})",
            cfg.algorithm.as_str(),
            dt(case.p_dtype).as_str(),
            dt(case.g_dtype).as_str(),
            case.carry,
            cfg.rounding,
            cfg.clip_grad_norm,
            cfg.clip_grad_value,
            cfg.weight_decay,
            cfg.loss_scale_mode
        );
        for (i, (c, d)) in cpu_bufs.iter().zip(&dev_bufs).enumerate() {
            let (cv, dv) = (c.values(), d.values());
            let bad = cv
                .iter()
                .zip(&dv)
                .filter(|(a, b)| !close(case.p_dtype, **a, **b))
                .count();
            if bad > 0 {
                let k = cv
                    .iter()
                    .zip(&dv)
                    .position(|(a, b)| !close(case.p_dtype, *a, *b))
                    .unwrap();
                panic!(
                    "{what}: shape {:?}: {bad} elements differ, first at {k}: cpu {} dev {}",
                    SHAPES[i], cv[k], dv[k]
                );
            }
        }
        resync(&cpu_bufs, &mut dev_bufs);
        let info = cpu.step_info();
        let ds = dev.read_step(0).unwrap();
        assert_eq!(info.step, ds.info_step, "{what}: step");
        assert_eq!(info.overflow, ds.info_overflow != 0, "{what}: overflow");
        assert_eq!(info.skipped, ds.info_skipped != 0, "{what}: skipped");
        assert_eq!(
            info.skipped_total, ds.skipped_total,
            "{what}: skipped_total"
        );
        assert_eq!(info.grads_nonfinite, ds.info_nonfinite, "{what}: nonfinite");
        assert_eq!(info.loss_scale, ds.info_loss_scale, "{what}: loss scale");
        assert_eq!(
            info.next_loss_scale, ds.info_next_loss_scale,
            "{what}: next loss scale"
        );
        assert_eq!(cpu.loss_scale(), ds.scale, "{what}: scale");
        assert_eq!(
            info.grad_norm.is_nan(),
            ds.info_grad_norm.is_nan(),
            "{what}: grad norm"
        );
        if !info.grad_norm.is_nan() {
            assert!(
                (info.grad_norm - ds.info_grad_norm).abs() <= 1e-6 * info.grad_norm.abs(),
                "{what}: grad norm"
            );
        }
        assert!(
            (info.clip_coef - ds.info_clip_coef).abs() <= 1e-6 * info.clip_coef.abs(),
            "{what}: clip coef"
        );
        if cfg.algorithm == Algorithm::Adalomo {
            for (i, shape) in SHAPES.iter().enumerate() {
                let (a, b) = dev.read_state(i, 0).unwrap();
                let cpu_state = cpu_state(&cpu, i);
                let dev_state: Vec<f32> = a.into_iter().chain(b).collect();
                assert_eq!(cpu_state.len(), dev_state.len());
                for (k, (x, y)) in cpu_state.iter().zip(&dev_state).enumerate() {
                    assert!(
                        !y.is_nan() && (x - y).abs() <= 1e-6 * x.abs().max(y.abs()),
                        "{what}: state of {shape:?} at {k}: cpu {x} dev {y}"
                    );
                }
            }
        }
    }
}

/// The CPU optimizer's AdaLomo state of parameter `i` (row state then column state, or v).
fn cpu_state(cpu: &Optimizer, i: usize) -> Vec<f32> {
    let inner = cpu.params()[i].inner.lock();
    match &inner.ada.as_ref().unwrap().state {
        lomo::backend::cpu::adalomo::AdaState::Factored { row, col } => {
            row.iter().chain(col).copied().collect()
        }
        lomo::backend::cpu::adalomo::AdaState::Vector { v } => v.clone(),
    }
}

fn base(algorithm: Algorithm) -> Config {
    Config::defaults(algorithm)
}

fn case(cfg: Config, p: u32, g: u32) -> Case {
    Case {
        cfg,
        p_dtype: p,
        g_dtype: g,
        steps: 3,
        carry: false,
        inject_inf: None,
        zero_rows_next_to_large: false,
        largest_f16_params: false,
        huge_grad_at: None,
    }
}

fn all_pairs(algorithm: Algorithm) {
    for p in [F32, F16, BF16] {
        for g in [F32, F16, BF16] {
            run(&case(base(algorithm), p, g));
        }
    }
}

/// Option variants on two dtype pairs.
fn options(algorithm: Algorithm) {
    for (p, g) in [(F32, F32), (BF16, BF16), (F16, F32)] {
        let mut c = base(algorithm);
        c.clip_grad_norm = 0.5;
        run(&case(c.clone(), p, g));
        c.clip_grad_value = 0.01;
        c.weight_decay = 0.1;
        run(&case(c, p, g));
        let mut c = base(algorithm);
        c.rounding = Rounding::Stochastic;
        c.seed = 1234;
        c.weight_decay = 0.05;
        run(&case(c, p, g));
        let mut c = base(algorithm);
        c.loss_scale_mode = LossScaleMode::Dynamic;
        c.loss_scale = 1024.0;
        c.scale_window = 2;
        run(&Case {
            steps: 5,
            ..case(c, p, g)
        });
    }
}

fn nonfinite(algorithm: Algorithm) {
    for clip in [0.0, 1.0] {
        for mode in [LossScaleMode::Static, LossScaleMode::Dynamic] {
            let mut c = base(algorithm);
            c.clip_grad_norm = clip;
            c.loss_scale_mode = mode;
            c.loss_scale = 256.0;
            for shape in [0, 3] {
                run(&Case {
                    inject_inf: Some((if shape == 0 { 1 } else { 2 }, shape)),
                    steps: 4,
                    ..case(c.clone(), BF16, F32)
                });
            }
        }
    }
}

#[test]
fn lomo_all_dtype_pairs() {
    all_pairs(Algorithm::Lomo);
}

#[test]
fn lomo_options() {
    options(Algorithm::Lomo);
}

#[test]
fn lomo_nonfinite_gradients() {
    nonfinite(Algorithm::Lomo);
}

#[test]
fn adalomo_all_dtype_pairs() {
    all_pairs(Algorithm::Adalomo);
}

#[test]
fn adalomo_options() {
    options(Algorithm::Adalomo);
}

#[test]
fn adalomo_carried_rms() {
    for (p, g) in [(F32, F32), (BF16, BF16)] {
        run(&Case {
            carry: true,
            steps: 4,
            ..case(base(Algorithm::Adalomo), p, g)
        });
    }
}

#[test]
fn adalomo_zero_rows_next_to_large_rows() {
    let mut c = base(Algorithm::Adalomo);
    c.loss_scale_mode = LossScaleMode::None;
    for (p, g) in [(F32, F32), (BF16, F32)] {
        run(&Case {
            zero_rows_next_to_large: true,
            ..case(c.clone(), p, g)
        });
    }
}

#[test]
fn updates_that_overflow_f16_keep_the_old_values() {
    for algorithm in [Algorithm::Lomo, Algorithm::Adalomo] {
        let mut c = base(algorithm);
        c.loss_scale_mode = LossScaleMode::None;
        for g in [F16, F32] {
            // One step: later ones bring values back near 0 as differences of ~500s.
            run(&Case {
                largest_f16_params: true,
                steps: 1,
                ..case(c.clone(), F16, g)
            });
        }
    }
}

#[test]
fn finite_gradients_whose_statistics_overflow_are_refused() {
    for algorithm in [Algorithm::Lomo, Algorithm::Adalomo] {
        let mut c = base(algorithm);
        c.loss_scale_mode = LossScaleMode::None;
        for (shape, p) in [(0, F32), (3, F32), (2, BF16), (6, F32)] {
            run(&Case {
                huge_grad_at: Some((1, shape)),
                steps: 3,
                ..case(c.clone(), p, F32)
            });
        }
    }
}

#[test]
fn adalomo_nonfinite_gradients() {
    nonfinite(Algorithm::Adalomo);
}
