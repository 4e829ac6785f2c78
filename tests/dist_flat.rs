//! Flat pieces (`LOMO_LAYOUT_FLAT`: DeepSpeed ZeRO-3, FSDP1) and gradients the library reduces
//! itself (`LOMO_GRAD_ALL_REDUCE`, `LOMO_GRAD_REDUCE_SCATTER`), threads as ranks through the C
//! ABI (`notes/distributed.md` §7, T1): after every step the assembled pieces equal one rank
//! holding the whole tensors and submitting the average of the ranks' gradients — LOMO bit for
//! bit (dyadic inputs: every reduction is exact), AdaLomo within f32 rounding — with uneven and
//! empty pieces, pieces cutting rows (one row spread over three ranks), every option; every rank
//! agrees on the step's scalars; replicas stay bitwise equal; HSDP (replicate × shard groups).
//! Plus: LOMO's per-element policy exchanges one record per phase end (no per-tensor traffic).
//! Failures and refusals are in `dist_flat_errors.rs`.

mod common;

use common::dist::*;
use common::*;
use lomo::ffi::dist::*;

fn compare(c: &Case, n: usize) {
    let (whole, whole_info) = run(c, 0);
    let (pieces, infos) = run(c, n);
    let what = format!(
        "n={n} alg={} dtype={} clip={} value={} wd={} sr={} dyn={} static={} carry={} inf={:?} \
         flat={} grad_mode={} per_element={}",
        c.algorithm,
        c.dtype,
        c.clip_norm,
        c.clip_value,
        c.wd,
        c.stochastic,
        c.dynamic,
        c.static_scale,
        c.carry,
        c.inf,
        c.flat,
        c.grad_mode,
        c.per_element
    );
    for step in 0..STEPS {
        for (i, (w, p)) in whole[step].iter().zip(&pieces[step]).enumerate() {
            for (k, (a, b)) in w.iter().zip(p).enumerate() {
                let ok = if c.algorithm == 0 {
                    a.to_bits() == b.to_bits()
                } else {
                    ulps(c.dtype, *a, *b) <= 1.0 || (a - b).abs() <= 1e-7 + 1e-6 * a.abs()
                };
                assert!(
                    ok,
                    "{what}: step {step} tensor {i} element {k}: whole {a}, pieces {b}"
                );
            }
        }
        let w = whole_info[0][step];
        for (r, info) in infos.iter().enumerate() {
            let i = info[step];
            let norm_ok = if c.algorithm == 0 || c.grad_mode != LOMO_GRAD_REDUCED {
                i.grad_norm.to_bits() == w.grad_norm.to_bits()
            } else {
                (i.grad_norm.is_nan() && w.grad_norm.is_nan())
                    || (i.grad_norm - w.grad_norm).abs() <= 1e-6 * w.grad_norm.abs()
            };
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
                    i.clip_coef.to_bits()
                ),
                (
                    w.step,
                    w.skipped,
                    w.overflow,
                    w.loss_scale.to_bits(),
                    w.next_loss_scale.to_bits(),
                    w.clip_coef.to_bits()
                ),
                "{what}: step {step} rank {r}: diagnostics differ from one rank's"
            );
        }
    }
}

/// The options every layout is run with (on top of `base`).
fn variants(base: &Case) -> Vec<Case> {
    vec![
        base.clone(),
        Case {
            clip_norm: 0.5,
            wd: 0.1,
            clip_value: 0.3,
            carry: true,
            ..base.clone()
        },
        Case {
            dtype: BF16,
            stochastic: true,
            static_scale: true,
            ..base.clone()
        },
        Case {
            dtype: F16,
            wd: 0.05,
            ..base.clone()
        },
        Case {
            dynamic: true,
            clip_norm: 1.0,
            inf: Some((1, 6)),
            ..base.clone()
        },
        Case {
            dynamic: true,
            inf: Some((2, 0)),
            ..base.clone()
        },
    ]
}

#[test]
fn flat_pieces_equal_one_rank() {
    for algorithm in [0, 1] {
        let base = Case {
            flat: true,
            ..case(algorithm)
        };
        for c in variants(&base) {
            for n in 1..=4 {
                compare(&c, n);
            }
        }
    }
}

#[test]
fn reduce_scatter_equals_one_rank_on_the_average() {
    for algorithm in [0, 1] {
        let base = Case {
            grad_mode: LOMO_GRAD_REDUCE_SCATTER,
            ..case(algorithm)
        };
        for c in variants(&base) {
            for n in 1..=4 {
                compare(&c, n);
            }
        }
    }
}

#[test]
fn all_reduce_replicas_equal_one_rank_on_the_average() {
    for algorithm in [0, 1] {
        let base = Case {
            grad_mode: LOMO_GRAD_ALL_REDUCE,
            ..case(algorithm)
        };
        for c in variants(&base) {
            for n in 1..=4 {
                compare(&c, n);
            }
        }
    }
}

/// LOMO with the per-element policy and no NORM phase: pieces of every layout equal one rank,
/// and a step exchanges only the phase-end records (the agreement record and `[Σg², nf]`), no
/// per-tensor non-finite flag.
#[test]
fn per_element_lomo_pieces_exchange_one_record_per_phase() {
    for (flat, cols) in [(false, false), (false, true), (true, false)] {
        let base = Case {
            per_element: true,
            flat,
            cols,
            ..case(0)
        };
        for c in [
            base.clone(),
            Case {
                dynamic: true,
                inf: Some((1, 2)),
                ..base.clone()
            },
            Case {
                dtype: BF16,
                stochastic: true,
                wd: 0.1,
                clip_value: 0.3,
                inf: Some((2, 6)),
                ..base.clone()
            },
        ] {
            for n in 1..=4 {
                compare(&c, n);
            }
        }
    }
    // The count: one rank's collectives over the steps of a run.
    for per_element in [false, true] {
        let c = Case {
            per_element,
            flat: true,
            ..case(0)
        };
        let calls = count_calls(&c, 2);
        let per_step = if per_element {
            2
        } else {
            2 + SHAPES.len() as u64
        };
        assert_eq!(calls, per_step * STEPS as u64, "per_element {per_element}");
    }
}

/// Collectives one rank enters in [`run`]-like steps of `c` on `n` ranks (both ranks enter the
/// same ones).
fn count_calls(c: &Case, n: usize) -> u64 {
    let group = Group::new(n);
    let mut rng = Rng::new(3);
    let params: Vec<Vec<f32>> = SHAPES
        .iter()
        .map(|s| dyadic(&mut rng, rows_cols(s).0 * rows_cols(s).1))
        .collect();
    std::thread::scope(|s| {
        for r in 0..n {
            let (group, params) = (group.clone(), &params);
            s.spawn(move || {
                let opt = Opt::new(&cfg_of(c)).unwrap();
                let comm = add_comm(&opt, &group, r);
                let mut bufs = Vec::new();
                let mut lens = Vec::new();
                for (i, shape) in SHAPES.iter().enumerate() {
                    let numel = params[i].len();
                    let (a, b) = flat_split(numel, n, r);
                    let mut buf = Buf::new(F32, &params[i][a..b]);
                    let id = opt
                        .register(&format!("p{i}"), buf.ptr(), F32, &[(b - a) as i64], 0)
                        .unwrap();
                    shard(&opt, id, LOMO_LAYOUT_FLAT, shape, a as i64, comm, 0).unwrap();
                    bufs.push(buf);
                    lens.push(b - a);
                }
                dist_set(&opt, comm, LOMO_DIST_CHECK).unwrap();
                for _ in 0..STEPS {
                    opt.begin(UPDATE, 0.1).unwrap();
                    for (i, &len) in lens.iter().enumerate() {
                        let mut g = Buf::new(F32, &vec![0.25; len]);
                        opt.submit(i as u32, g.ptr(), F32).unwrap();
                    }
                    opt.end().unwrap();
                }
            });
        }
    });
    let total = *group.calls.lock();
    total / n as u64
}

/// HSDP: 2 replicas × 2 flat pieces (4 threads). Each piece's gradient is averaged over its
/// replicate group (`LOMO_GRAD_ALL_REDUCE`, `grad_comm` ≠ `piece_comm`), the statistics and the
/// phase records go over the shard group: both replicas equal one rank on the average gradient.
#[test]
fn hsdp_flat_pieces_with_all_reduce_equal_one_rank() {
    for algorithm in [0, 1] {
        for c in [
            case(algorithm),
            Case {
                clip_norm: 0.5,
                wd: 0.1,
                clip_value: 0.3,
                ..case(algorithm)
            },
            Case {
                dynamic: true,
                inf: Some((1, 1)),
                ..case(algorithm)
            },
        ] {
            hsdp(&c);
        }
    }
}

fn hsdp(c: &Case) {
    let (whole, _) = run(c, 0);
    let Data {
        sizes,
        params0,
        grads,
        deltas,
    } = data();
    let shard_groups = [Group::new(2), Group::new(2)];
    let rep_groups = [Group::new(2), Group::new(2)];
    let results: Vec<(usize, History)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4)
            .map(|t| {
                let (d, sh) = (t / 2, t % 2);
                let (sg, rg) = (shard_groups[d].clone(), rep_groups[sh].clone());
                let (sizes, params0, grads, deltas) = (&sizes, &params0, &grads, &deltas);
                s.spawn(move || {
                    let opt = Opt::new(&cfg_of(c)).unwrap();
                    let piece_comm = add_comm(&opt, &sg, sh);
                    let grad_comm = add_comm(&opt, &rg, d);
                    let mut bufs = Vec::new();
                    let mut ranges = Vec::new();
                    for (i, shape) in SHAPES.iter().enumerate() {
                        let (a, b) = flat_split(sizes[i], 2, sh);
                        let mut buf = Buf::new(c.dtype, &params0[i][a..b]);
                        let id = opt
                            .register(&format!("p{i}"), buf.ptr(), c.dtype, &[(b - a) as i64], 0)
                            .unwrap();
                        let grad = (LOMO_GRAD_ALL_REDUCE, grad_comm);
                        shard_grad(
                            &opt,
                            id,
                            LOMO_LAYOUT_FLAT,
                            shape,
                            a as i64,
                            piece_comm,
                            grad,
                            0,
                        )
                        .unwrap();
                        bufs.push(buf);
                        ranges.push((a, b));
                    }
                    dist_set(&opt, piece_comm, LOMO_DIST_CHECK).unwrap();
                    let sign = if d == 0 { 1.0 } else { -1.0 };
                    let mut history = Vec::new();
                    for (step, g) in grads.iter().enumerate() {
                        let scale = opt.loss_scale();
                        let phases: &[u32] = if c.clip_norm > 0.0 {
                            &[NORM, UPDATE]
                        } else {
                            &[UPDATE]
                        };
                        for &phase in phases {
                            opt.begin(phase, [0.05f32, 0.02, 0.1][step % 3]).unwrap();
                            for (i, &(a, b)) in ranges.iter().enumerate() {
                                let mid = sizes[i] / 2;
                                let v: Vec<f32> = (a..b)
                                    .map(|k| {
                                        if c.inf == Some((step, i)) && d == 0 && k == mid {
                                            f32::INFINITY
                                        } else {
                                            (g[i][k] + sign * deltas[step][i][k]) * scale
                                        }
                                    })
                                    .collect();
                                let mut gb = Buf::new(c.dtype, &v);
                                opt.submit(i as u32, gb.ptr(), c.dtype).unwrap();
                            }
                            opt.end().unwrap();
                        }
                        history.push(bufs.iter().map(|b| b.values()).collect::<Vec<_>>());
                    }
                    (sh, history)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (t, (sh, history)) in results.iter().enumerate() {
        for (step, tensors) in history.iter().enumerate() {
            for (i, vals) in tensors.iter().enumerate() {
                let (a, _) = flat_split(sizes[i], 2, *sh);
                for (k, v) in vals.iter().enumerate() {
                    let w = whole[step][i][a + k];
                    let ok = if c.algorithm == 0 {
                        w.to_bits() == v.to_bits()
                    } else {
                        ulps(c.dtype, w, *v) <= 1.0 || (w - v).abs() <= 1e-7 + 1e-6 * w.abs()
                    };
                    assert!(
                        ok,
                        "alg {} thread {t} step {step} tensor {i} element {}: whole {w}, {v}",
                        c.algorithm,
                        a + k
                    );
                }
            }
        }
    }
}

/// A flat piece long enough to be applied in several chunks on the CPU pool (bf16, stochastic
/// rounding, carried RMS): 2 ranks equal one rank within one bf16 ulp.
#[test]
fn long_flat_pieces_equal_one_rank() {
    let (rows, cols) = (600usize, 257usize);
    let numel = rows * cols;
    let mut rng = Rng::new(8);
    let p0 = dyadic(&mut rng, numel);
    let gs: Vec<Vec<f32>> = (0..3).map(|_| dyadic(&mut rng, numel)).collect();
    let c = Case {
        dtype: BF16,
        stochastic: true,
        carry: true,
        ..case(1)
    };
    let go = |n: usize| -> Vec<f32> {
        let group = Group::new(n.max(1));
        let pieces: Vec<Vec<f32>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..n.max(1))
                .map(|r| {
                    let (group, p0, gs, c) = (group.clone(), &p0, &gs, &c);
                    s.spawn(move || {
                        let opt = Opt::new(&cfg_of(c)).unwrap();
                        let (a, b) = if n == 0 {
                            (0, numel)
                        } else {
                            flat_split(numel, n, r)
                        };
                        let mut p = Buf::new(c.dtype, &p0[a..b]);
                        let shape = [rows as i64, cols as i64];
                        let id = if n == 0 {
                            opt.register_flags("w", p.ptr(), c.dtype, &shape, 0, 1)
                                .unwrap()
                        } else {
                            let comm = add_comm(&opt, &group, r);
                            let id = opt
                                .register_flags("w", p.ptr(), c.dtype, &[(b - a) as i64], 0, 1)
                                .unwrap();
                            shard(&opt, id, LOMO_LAYOUT_FLAT, &shape, a as i64, comm, 0).unwrap();
                            id
                        };
                        for g in gs {
                            let mut gb = Buf::new(c.dtype, &g[a..b]);
                            opt.begin(UPDATE, 0.05).unwrap();
                            opt.submit(id, gb.ptr(), c.dtype).unwrap();
                            opt.end().unwrap();
                        }
                        p.values()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        pieces.concat()
    };
    let (whole, split) = (go(0), go(2));
    for (k, (a, b)) in whole.iter().zip(&split).enumerate() {
        assert!(
            ulps(BF16, *a, *b) <= 1.0,
            "element {k}: whole {a}, pieces {b}"
        );
    }
}
