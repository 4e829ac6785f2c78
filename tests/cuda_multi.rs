//! Multi-tensor launches on the emulated CUDA backend (`LOMO_CUDA_EMULATE=1`):
//! `lomo_grad_submit_batch` against the same gradients submitted one by one — parameters and
//! step diagnostics bit for bit, for LOMO (NORM phase, pre-check, stochastic rounding, a
//! non-finite gradient, mixed dtypes and sizes on both sides of the small-tensor bound) and
//! AdaLomo — and the launches per step of a Llama-shaped registration, counted by the backend
//! (`lomo_cuda_launch_count`) and checked against the rule: small whole tensors (at most 8192
//! elements) share one launch per 24 and per dtype (pair), everything else one per tensor.

mod common;

use std::ffi::c_void;

use common::*;
use lomo::ffi::batch::{lomo_cuda_launch_count, lomo_grad_submit_batch};

fn emulate() {
    std::env::set_var("LOMO_CUDA_EMULATE", "1");
}

fn launches(opt: &Opt) -> u64 {
    let mut n = 0u64;
    // SAFETY: live handle, valid out pointer.
    check(unsafe { lomo_cuda_launch_count(opt.0, &mut n) }).unwrap();
    n
}

fn submit_batch(opt: &Opt, ids: &[u32], grads: &mut [Buf]) -> Result<(), Failure> {
    let ptrs: Vec<*const c_void> = grads.iter_mut().map(|g| g.ptr() as *const c_void).collect();
    let dtypes: Vec<u32> = grads.iter().map(|g| g.dtype).collect();
    let counts: Vec<u64> = grads.iter().map(|g| g.len() as u64).collect();
    // SAFETY: live handle; arrays of ids.len() entries; gradient buffers of the registered sizes.
    check(unsafe {
        lomo_grad_submit_batch(
            opt.0,
            ids.len(),
            ids.as_ptr(),
            ptrs.as_ptr(),
            dtypes.as_ptr(),
            counts.as_ptr(),
            std::ptr::null_mut(),
        )
    })
}

/// (shape, parameter dtype, gradient dtype): small tensors of 1–8192 elements (1–4 blocks),
/// mixed dtypes, and tensors past the bound (8193 elements, 5 blocks; 40000).
fn tensors() -> Vec<(Vec<i64>, u32, u32)> {
    vec![
        (vec![1], F32, F32),
        (vec![7], F32, F32),
        (vec![100], BF16, BF16),
        (vec![3, 5, 7], F32, F32),
        (vec![2048], F32, BF16),
        (vec![2049], F32, F32),
        (vec![64, 64], BF16, BF16),
        (vec![8192], F32, F32),
        (vec![8193], F32, F32),
        (vec![200, 200], F32, F32),
        (vec![31], F16, F32),
        (vec![100], BF16, BF16),
        (vec![5], F32, F32),
    ]
}

/// Parameters after every step, step diagnostics (step, skipped, overflow, and the bits of the
/// norm, clip coefficient and next loss scale) and launches of every step.
type Run = (
    Vec<Vec<Vec<f32>>>,
    Vec<(u64, u32, u32, u32, u32, u32)>,
    Vec<u64>,
);

/// Runs 4 steps on one CUDA optimizer, submitting one by one or as one batch per phase; returns
/// the parameters and infos after every step, and the launches of each step.
fn run(cfg: &lomo::ffi::types::lomo_config, batch: bool) -> Run {
    emulate();
    let opt = Opt::new(cfg).unwrap();
    let mut rng = Rng::new(3);
    let specs = tensors();
    let mut bufs: Vec<Buf> = specs
        .iter()
        .map(|(s, pd, _)| Buf::new(*pd, &rng.vec(s.iter().product::<i64>() as usize, 1.0)))
        .collect();
    let ids: Vec<u32> = specs
        .iter()
        .enumerate()
        .map(|(i, (s, pd, _))| {
            opt.register_on(&format!("p{i}"), bufs[i].ptr(), *pd, s, 0, 0, 0)
                .unwrap()
        })
        .collect();
    let (mut hist, mut infos, mut counts) = (Vec::new(), Vec::new(), Vec::new());
    for step in 0..4 {
        let scale = opt.loss_scale();
        let mut grads: Vec<Buf> = specs
            .iter()
            .enumerate()
            .map(|(i, (s, _, gd))| {
                let mut g = rng.vec(s.iter().product::<i64>() as usize, 0.3 * scale);
                if step == 2 && i == 3 {
                    g[4] = f32::INFINITY;
                }
                Buf::new(*gd, &g)
            })
            .collect();
        let before = launches(&opt);
        let phases: &[u32] = if cfg.clip_grad_norm > 0.0 {
            &[0, 1]
        } else {
            &[1]
        };
        for &phase in phases {
            opt.begin(phase, 0.05).unwrap();
            if batch {
                submit_batch(&opt, &ids, &mut grads).unwrap();
            } else {
                for (i, g) in grads.iter_mut().enumerate() {
                    opt.submit(ids[i], g.ptr(), g.dtype).unwrap();
                }
            }
            opt.end().unwrap();
        }
        counts.push(launches(&opt) - before);
        let i = opt.info();
        infos.push((
            i.step,
            i.skipped,
            i.overflow,
            i.grad_norm.to_bits(),
            i.clip_coef.to_bits(),
            i.next_loss_scale.to_bits(),
        ));
        hist.push(bufs.iter().map(|b| b.values()).collect());
    }
    (hist, infos, counts)
}

fn config_of(algorithm: u32, clip: f64, stochastic: bool) -> lomo::ffi::types::lomo_config {
    let mut cfg = config(algorithm);
    cfg.clip_grad_norm = clip;
    cfg.clip_grad_value = 0.7;
    cfg.weight_decay = 0.01;
    cfg.rounding = stochastic as u32;
    cfg.seed = 5;
    cfg.loss_scale_mode = 2;
    cfg.loss_scale = 256.0;
    cfg.scale_window = 2;
    cfg
}

#[test]
fn a_batch_equals_separate_submits_bit_for_bit() {
    for algorithm in [0, 1] {
        for clip in [0.0, 1.0] {
            for stochastic in [false, true] {
                let cfg = config_of(algorithm, clip, stochastic);
                let (one, one_info, one_n) = run(&cfg, false);
                let (many, many_info, many_n) = run(&cfg, true);
                let what = format!("algorithm {algorithm} clip {clip} stochastic {stochastic}");
                for step in 0..one.len() {
                    for (t, (a, b)) in one[step].iter().zip(&many[step]).enumerate() {
                        let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                        assert!(same, "{what}: step {step} tensor {t} differs");
                    }
                }
                assert_eq!(one_info, many_info, "{what}: step diagnostics");
                if algorithm == 0 {
                    // 13 tensors, 11 small. NORM and the pre-check group by gradient dtype:
                    // f32 7, bf16 4 → 2 launches + 2 large; the update by dtype pair: f32/f32 6,
                    // bf16/bf16 3 → 2 launches, f32/bf16 and f16/f32 alone, + 2 large = 6.
                    // Separate submits: one launch per tensor and pass. Plus begin and end.
                    let (sep, bat) = if clip > 0.0 {
                        ((13 + 2) + (13 + 2), (4 + 2) + (6 + 2))
                    } else {
                        (13 + 13 + 2, 4 + 6 + 2)
                    };
                    for (s, (&a, &b)) in one_n.iter().zip(&many_n).enumerate() {
                        assert_eq!((a, b), (sep, bat), "{what}: launches of step {s}");
                    }
                } else {
                    // AdaLomo's UPDATE runs one by one; its NORM phase shares launches as
                    // LOMO's (13 → 4).
                    let saved = if clip > 0.0 { 9 } else { 0 };
                    for (s, (&a, &b)) in one_n.iter().zip(&many_n).enumerate() {
                        assert_eq!(a - b, saved, "{what}: launches of step {s}");
                    }
                }
            }
        }
    }
}

/// The launches per step of a Llama-shaped registration (per layer: q, k, v, o [d, d], gate and
/// up [f, d], down [d, f], two norm weights [d]; embedding and head [V, d], final norm [d]),
/// scaled down so that the emulation runs it (d = 128, f = 344, V = 256, 4 layers: the matrices
/// stay past the small-tensor bound, the norms below it). LOMO with a NORM phase, bf16.
#[test]
fn llama_shaped_launches_per_step() {
    emulate();
    let (d, f, v, layers) = (128i64, 344i64, 256i64, 4usize);
    let mut shapes = vec![vec![v, d]];
    for _ in 0..layers {
        shapes.extend([
            vec![d, d],
            vec![d, d],
            vec![d, d],
            vec![d, d],
            vec![f, d],
            vec![f, d],
            vec![d, f],
            vec![d],
            vec![d],
        ]);
    }
    shapes.extend([vec![d], vec![v, d]]);
    let mut cfg = config(0);
    cfg.clip_grad_norm = 1.0;
    for batch in [false, true] {
        let opt = Opt::new(&cfg).unwrap();
        let mut params: Vec<Buf> = shapes
            .iter()
            .map(|s| Buf::new(BF16, &vec![0.5; s.iter().product::<i64>() as usize]))
            .collect();
        let ids: Vec<u32> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                opt.register_on(&format!("p{i}"), params[i].ptr(), BF16, s, 0, 0, 0)
                    .unwrap()
            })
            .collect();
        let mut grads: Vec<Buf> = shapes
            .iter()
            .map(|s| Buf::new(BF16, &vec![0.25; s.iter().product::<i64>() as usize]))
            .collect();
        let before = launches(&opt);
        for phase in [0, 1] {
            opt.begin(phase, 0.01).unwrap();
            if batch {
                submit_batch(&opt, &ids, &mut grads).unwrap();
            } else {
                for (i, g) in grads.iter_mut().enumerate() {
                    opt.submit(ids[i], g.ptr(), BF16).unwrap();
                }
            }
            opt.end().unwrap();
        }
        let n = launches(&opt) - before;
        let (tensors, small) = (shapes.len() as u64, 2 * layers as u64 + 1);
        // Per phase: begin + end, and one launch per tensor, or per large tensor plus one per
        // 24 small ones.
        let expect = if batch {
            2 * (2 + tensors - small + small.div_ceil(24))
        } else {
            2 * (2 + tensors)
        };
        assert_eq!(n, expect, "batch {batch}: launches per step");
        println!(
            "Llama-shaped ({} tensors), LOMO + NORM phase: {n} launches per step (batch {batch})",
            tensors
        );
    }
}

/// With gradient accumulation on, batches go through the accumulation buffers exactly as
/// separate submits: two ACCUMULATE micro-batches and the step's own phases, as one batch per
/// phase or one by one — the same parameters bit for bit.
#[test]
fn a_batch_with_gradient_accumulation_equals_separate_submits() {
    use lomo::ffi::accum::lomo_accum_enable;
    emulate();
    for algorithm in [0, 1] {
        let cfg = config_of(algorithm, 1.0, false);
        let mut results = Vec::new();
        for batch in [false, true] {
            let opt = Opt::new(&cfg).unwrap();
            let mut rng = Rng::new(9);
            let specs = tensors();
            let mut bufs: Vec<Buf> = specs
                .iter()
                .map(|(s, pd, _)| Buf::new(*pd, &rng.vec(s.iter().product::<i64>() as usize, 1.0)))
                .collect();
            let ids: Vec<u32> = specs
                .iter()
                .enumerate()
                .map(|(i, (s, pd, _))| {
                    opt.register_on(&format!("p{i}"), bufs[i].ptr(), *pd, s, 0, 0, 0)
                        .unwrap()
                })
                .collect();
            // SAFETY: live handle; f32 buffers, summed.
            check(unsafe { lomo_accum_enable(opt.0, 0, 0) }).unwrap();
            for _step in 0..2 {
                let scale = opt.loss_scale();
                let micro: Vec<Vec<Buf>> = (0..3)
                    .map(|_| {
                        specs
                            .iter()
                            .map(|(s, _, gd)| {
                                let n = s.iter().product::<i64>() as usize;
                                Buf::new(*gd, &rng.vec(n, 0.1 * scale))
                            })
                            .collect()
                    })
                    .collect();
                let mut micro = micro;
                let phases: [&[u32]; 3] = [&[2], &[2], &[0, 1]];
                for (m, grads) in micro.iter_mut().enumerate() {
                    for &phase in phases[m] {
                        opt.begin(phase, 0.05).unwrap();
                        if batch {
                            submit_batch(&opt, &ids, grads).unwrap();
                        } else {
                            for (i, g) in grads.iter_mut().enumerate() {
                                opt.submit(ids[i], g.ptr(), g.dtype).unwrap();
                            }
                        }
                        opt.end().unwrap();
                    }
                }
            }
            results.push((
                bufs.iter().map(|b| b.values()).collect::<Vec<_>>(),
                opt.info().grad_norm,
            ));
        }
        let (one, many) = (&results[0], &results[1]);
        assert_eq!(
            one.1.to_bits(),
            many.1.to_bits(),
            "algorithm {algorithm}: norm"
        );
        for (t, (a, b)) in one.0.iter().zip(&many.0).enumerate() {
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "algorithm {algorithm}: tensor {t} differs");
        }
    }
}
