//! Flat pieces (`LOMO_LAYOUT_FLAT`: DeepSpeed ZeRO-3, FSDP1) and gradients the library reduces
//! itself (`LOMO_GRAD_ALL_REDUCE`, `LOMO_GRAD_REDUCE_SCATTER`), threads as ranks through the C
//! ABI (`notes/distributed.md` §7, T1): after every step the assembled pieces equal one rank
//! holding the whole tensors and submitting the average of the ranks' gradients — LOMO bit for
//! bit (dyadic inputs: every reduction is exact), AdaLomo within f32 rounding — with uneven and
//! empty pieces, pieces cutting rows (one row spread over three ranks), every option; every rank
//! agrees on the step's scalars; replicas stay bitwise equal. Plus: LOMO's per-element policy
//! exchanges one record per phase end (no per-tensor traffic), a failing reduce-scatter or
//! gradient all-reduce changes nothing, refused combinations, and ranks that disagree.

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

/// A failing reduce-scatter or gradient all-reduce: LOMO_STATUS_COMM_ERROR on every rank with
/// the callback's code, nothing changed (parameters, state, the step); after a cancel the same
/// step succeeds and equals a run that never failed.
#[test]
fn failing_gradient_collectives_change_nothing() {
    for mode in [LOMO_GRAD_REDUCE_SCATTER, LOMO_GRAD_ALL_REDUCE] {
        for algorithm in [0, 1] {
            let results: Vec<Vec<Vec<f32>>> = [false, true]
                .iter()
                .map(|&fail| {
                    let group = Group::new(2);
                    let sync = std::sync::Barrier::new(2);
                    std::thread::scope(|s| {
                        let hs: Vec<_> = (0..2)
                            .map(|r| {
                                let (group, sync) = (group.clone(), &sync);
                                s.spawn(move || fail_run(&group, sync, r, mode, algorithm, fail))
                            })
                            .collect();
                        hs.into_iter()
                            .map(|h| h.join().unwrap())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            for (r, (straight, retried)) in results[0].iter().zip(&results[1]).enumerate() {
                let same = straight
                    .iter()
                    .zip(retried)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "mode {mode} algorithm {algorithm} rank {r}: the retried step differs"
                );
            }
        }
    }
}

fn fail_run(
    group: &std::sync::Arc<Group>,
    sync: &std::sync::Barrier,
    r: usize,
    mode: u32,
    algorithm: u32,
    fail: bool,
) -> Vec<f32> {
    let opt = Opt::new(&config(algorithm)).unwrap();
    let comm = add_comm(&opt, group, r);
    let numel = 35;
    let full = dyadic(&mut Rng::new(1), numel);
    let (a, b) = if mode == LOMO_GRAD_REDUCE_SCATTER {
        partition(numel, 2, r)
    } else {
        (0, numel)
    };
    let mut p = Buf::new(F32, &full[a..b]);
    let local: Vec<i64> = if mode == LOMO_GRAD_REDUCE_SCATTER {
        vec![(b - a) as i64]
    } else {
        vec![7, 5]
    };
    let id = opt.register("w", p.ptr(), F32, &local, 0).unwrap();
    let (layout, piece) = if mode == LOMO_GRAD_REDUCE_SCATTER {
        (LOMO_LAYOUT_FLAT, comm)
    } else {
        (LOMO_LAYOUT_FULL, LOMO_COMM_NONE)
    };
    let flags = if mode == LOMO_GRAD_ALL_REDUCE && r == 1 {
        LOMO_SHARD_NORM_DUPLICATE
    } else {
        0
    };
    shard_grad(
        &opt,
        id,
        layout,
        &[7, 5],
        a as i64,
        piece,
        (mode, comm),
        flags,
    )
    .unwrap();
    dist_set(&opt, comm, LOMO_DIST_CHECK).unwrap();
    let gvals = dyadic(&mut Rng::new(2 + r as u64), numel);
    let mut g = Buf::new(F32, &gvals);
    let g_before = g.values();
    let before = p.values();
    if fail {
        sync.wait();
        if r == 0 {
            *group.fail.lock() = -5;
        }
        sync.wait();
        opt.begin(UPDATE, 0.1).unwrap();
        let e = opt.submit(id, g.ptr(), F32).unwrap_err();
        assert_eq!(e.status, lomo::Status::CommError as u32, "rank {r}: {e:?}");
        assert!(e.message.contains("-5"), "{}", e.message);
        assert_eq!(
            p.values(),
            before,
            "rank {r}: a failed submit changed the parameter"
        );
        assert_eq!(
            g.values(),
            g_before,
            "rank {r}: the caller's gradient was modified"
        );
        // SAFETY: live handle.
        check(unsafe { lomo::ffi::optimizer::lomo_step_cancel(opt.0) }).unwrap();
        assert_eq!(opt.info().step, 0);
        // Both ranks failed before the flag is cleared.
        sync.wait();
        if r == 0 {
            *group.fail.lock() = 0;
        }
        sync.wait();
    }
    for _ in 0..2 {
        opt.begin(UPDATE, 0.1).unwrap();
        opt.submit(id, g.ptr(), F32).unwrap();
        opt.end().unwrap();
    }
    assert_eq!(
        g.values(),
        g_before,
        "rank {r}: the caller's gradient was modified"
    );
    assert_eq!(opt.info().step, 2);
    p.values()
}

/// Combinations that cannot work are refused at lomo_param_set_shard, before anything changes.
#[test]
fn impossible_gradient_modes_are_refused() {
    let opt = Opt::new(&config(1)).unwrap();
    let group = Group::new(1);
    let comm = add_comm(&opt, &group, 0);
    let bare = add_comm_with(&opt, &group, 0, false);
    let mut w = Buf::new(F32, &[0.5; 35]);
    let id = opt.register("w", w.ptr(), F32, &[35], 0).unwrap();
    let mut m = Buf::new(F32, &[0.5; 35]);
    let mid = opt.register("m", m.ptr(), F32, &[7, 5], 0).unwrap();
    let refused = |id, layout, offset, piece, grad: (u32, u32), needle: &str| {
        let e = shard_grad(&opt, id, layout, &[7, 5], offset, piece, grad, 0).unwrap_err();
        assert_eq!(e.status, lomo::Status::InvalidArgument as u32, "{e:?}");
        assert!(e.message.contains(needle), "{needle}: {}", e.message);
    };
    let rs = LOMO_GRAD_REDUCE_SCATTER;
    refused(id, LOMO_LAYOUT_FLAT, 0, comm, (rs, bare), "reduce_scatter");
    refused(
        id,
        LOMO_LAYOUT_FLAT,
        0,
        comm,
        (rs, LOMO_COMM_NONE),
        "grad_comm",
    );
    refused(
        mid,
        LOMO_LAYOUT_ROWS,
        0,
        comm,
        (rs, comm),
        "LOMO_LAYOUT_FLAT",
    );
    refused(
        mid,
        LOMO_LAYOUT_FULL,
        0,
        LOMO_COMM_NONE,
        (rs, comm),
        "LOMO_LAYOUT_FLAT",
    );
    refused(
        id,
        LOMO_LAYOUT_FLAT,
        0,
        comm,
        (LOMO_GRAD_ALL_REDUCE, comm),
        "piece_comm",
    );
    refused(id, LOMO_LAYOUT_FLAT, 0, comm, (7, comm), "gradient mode");
    refused(
        mid,
        LOMO_LAYOUT_FLAT,
        0,
        comm,
        (LOMO_GRAD_REDUCED, LOMO_COMM_NONE),
        "FLAT",
    );
    let e = shard_grad(
        &opt,
        id,
        LOMO_LAYOUT_FLAT,
        &[7, 5],
        1,
        comm,
        (LOMO_GRAD_REDUCED, LOMO_COMM_NONE),
        0,
    )
    .unwrap_err();
    assert!(e.message.contains("elements"), "{}", e.message);
    // Nothing changed: the parameters still step as whole tensors, and a valid flat piece works.
    opt.begin(UPDATE, 0.1).unwrap();
    let mut g = Buf::new(F32, &[0.25; 35]);
    opt.submit(id, g.ptr(), F32).unwrap();
    opt.submit(mid, g.ptr(), F32).unwrap();
    opt.end().unwrap();
    shard_grad(&opt, id, LOMO_LAYOUT_FLAT, &[7, 5], 0, comm, (rs, comm), 0).unwrap();
    let e = shard(&opt, id, LOMO_LAYOUT_ROWS, &[35], 0, comm, 0).unwrap_err();
    assert!(e.message.contains("flat piece"), "{}", e.message);
}

/// Ranks that disagree on flat pieces without per-tensor traffic (LOMO, per-element policy):
/// one gradient fewer, or another lr, is LOMO_STATUS_DIST_MISMATCH on every rank.
#[test]
fn disagreeing_flat_ranks_get_dist_mismatch() {
    for mismatch in ["submissions", "lr"] {
        let group = Group::new(2);
        std::thread::scope(|s| {
            for r in 0..2 {
                let group = group.clone();
                s.spawn(move || {
                    let c = Case {
                        per_element: true,
                        ..case(0)
                    };
                    let opt = Opt::new(&cfg_of(&c)).unwrap();
                    let comm = add_comm(&opt, &group, r);
                    let mut ps = Vec::new();
                    for k in 0..2u32 {
                        let (a, b) = flat_split(35, 2, r);
                        let mut p = Buf::new(F32, &dyadic(&mut Rng::new(k as u64), b - a));
                        let id = opt
                            .register(&format!("p{k}"), p.ptr(), F32, &[(b - a) as i64], 0)
                            .unwrap();
                        shard(&opt, id, LOMO_LAYOUT_FLAT, &[7, 5], a as i64, comm, 0).unwrap();
                        ps.push((p, b - a));
                    }
                    dist_set(&opt, comm, LOMO_DIST_CHECK).unwrap();
                    let lr = if mismatch == "lr" && r == 1 { 0.2 } else { 0.1 };
                    opt.begin(UPDATE, lr).unwrap();
                    let n = if mismatch == "submissions" && r == 1 {
                        1
                    } else {
                        2
                    };
                    for (k, (_, len)) in ps.iter().enumerate().take(n) {
                        let mut g = Buf::new(F32, &vec![0.25; *len]);
                        opt.submit(k as u32, g.ptr(), F32).unwrap();
                    }
                    let e = opt.end().unwrap_err();
                    assert_eq!(
                        e.status,
                        lomo::Status::DistMismatch as u32,
                        "rank {r}: {e:?}"
                    );
                    // SAFETY: live handle.
                    check(unsafe { lomo::ffi::optimizer::lomo_step_cancel(opt.0) }).unwrap();
                });
            }
        });
    }
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

fn state_bytes(opt: &Opt) -> Vec<u8> {
    let mut n = 0;
    // SAFETY: live handle, valid out pointers and a buffer of the reported size.
    unsafe {
        check(lomo::ffi::state::lomo_state_size(opt.0, &mut n)).unwrap();
        let mut buf = vec![0u8; n];
        let mut written = 0;
        check(lomo::ffi::state::lomo_state_serialize(
            opt.0,
            buf.as_mut_ptr(),
            n,
            &mut written,
        ))
        .unwrap();
        buf.truncate(written);
        buf
    }
}

/// AdaLomo on a flat piece: when the second statistics all-reduce fails, the submit is
/// LOMO_STATUS_COMM_ERROR and neither the parameter nor the state changed; after a cancel the
/// run continues exactly as one that never failed.
#[test]
fn failing_second_flat_round_changes_nothing() {
    let steps = |fail: bool| -> (Vec<f32>, Vec<u8>) {
        let group = Group::new(1);
        let opt = Opt::new(&config(1)).unwrap();
        let comm = add_comm(&opt, &group, 0);
        let mut p = Buf::new(F32, &dyadic(&mut Rng::new(1), 35));
        let id = opt.register("w", p.ptr(), F32, &[35], 0).unwrap();
        shard(&opt, id, LOMO_LAYOUT_FLAT, &[7, 5], 0, comm, 0).unwrap();
        let mut g = Buf::new(F32, &dyadic(&mut Rng::new(2), 35));
        opt.begin(UPDATE, 0.1).unwrap();
        opt.submit(id, g.ptr(), F32).unwrap();
        opt.end().unwrap();
        if fail {
            let (before, state) = (p.values(), state_bytes(&opt));
            // Round 1 of the next submit is call 3, round 2 call 4.
            assert_eq!(*group.calls.lock(), 2);
            *group.fail_from.lock() = Some((4, -9));
            opt.begin(UPDATE, 0.1).unwrap();
            let e = opt.submit(id, g.ptr(), F32).unwrap_err();
            assert_eq!(e.status, lomo::Status::CommError as u32, "{e:?}");
            assert!(e.message.contains("-9"), "{}", e.message);
            assert_eq!(p.values(), before, "the parameter changed");
            // SAFETY: live handle.
            check(unsafe { lomo::ffi::optimizer::lomo_step_cancel(opt.0) }).unwrap();
            // A cancel changes no state: the bytes are those before the failed submit.
            assert_eq!(state_bytes(&opt), state, "the state changed");
            *group.fail_from.lock() = None;
        }
        opt.begin(UPDATE, 0.1).unwrap();
        opt.submit(id, g.ptr(), F32).unwrap();
        opt.end().unwrap();
        (p.values(), state_bytes(&opt))
    };
    let (straight, retried) = (steps(false), steps(true));
    assert_eq!(straight.0, retried.0);
    assert_eq!(straight.1, retried.1);
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

/// The gradient scratch is library memory: `lomo_memory_stats_get` counts it as CPU workspace.
#[test]
fn gradient_scratch_is_counted_as_workspace() {
    let workspace = |opt: &Opt| {
        // SAFETY: an all-zero lomo_memory_stats is a valid value (integers and arrays of them).
        let mut m: lomo::ffi::types::lomo_memory_stats = unsafe { std::mem::zeroed() };
        m.struct_size = std::mem::size_of_val(&m);
        // SAFETY: live handle, a writable struct of the stated size.
        check(unsafe { lomo::ffi::state::lomo_memory_stats_get(opt.0, &mut m) }).unwrap();
        m.workspace_bytes
    };
    let opt = Opt::new(&config(0)).unwrap();
    let group = Group::new(1);
    let comm = add_comm(&opt, &group, 0);
    let mut w = Buf::new(F32, &[0.5; 35]);
    let id = opt.register("w", w.ptr(), F32, &[35], 0).unwrap();
    assert_eq!(workspace(&opt), 0);
    let rs = (LOMO_GRAD_REDUCE_SCATTER, comm);
    shard_grad(&opt, id, LOMO_LAYOUT_FLAT, &[7, 5], 0, comm, rs, 0).unwrap();
    // LOMO's record (one f64) and the scratch's 35 received f32 words (one rank: no padding).
    assert_eq!(workspace(&opt), 8 + 4 * 35);
}
