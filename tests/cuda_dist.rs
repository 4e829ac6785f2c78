//! Distributed steps on the emulated CUDA backend through the real C ABI, threads as ranks
//! (`notes/distributed.md` §7, T1 with `LOMO_CUDA_EMULATE=1`: host memory stands in for device
//! memory, so the in-process communicator of `common::dist` reduces the device records the
//! kernels wrote). Every rank holds a piece of rows of every tensor (LOMO_LAYOUT_ROWS; of
//! columns of every matrix, LOMO_LAYOUT_COLS) or every
//! tensor whole as a data-parallel replica (LOMO_LAYOUT_FULL, NORM_DUPLICATE on all ranks but
//! one); after every step the assembled parameters must equal ONE CPU rank holding the whole
//! tensors and submitting the averaged gradient, within the CPU/CUDA parity tolerance
//! (`common::parity::close`, LOMO bit for bit on these dyadic inputs), replicas bitwise
//! identical, and every rank must report the one rank's step diagnostics. Plus: a failing
//! callback on CUDA (COMM_ERROR, nothing changed, the step cancellable), in the second round of
//! an AdaLomo piece of columns too, and the refusals of what CUDA does not do yet. Pieces of
//! columns (LOMO_LAYOUT_COLS) and LOMO's flat pieces (LOMO_LAYOUT_FLAT) are compared the same
//! way.

mod common;

use common::dist::*;
use common::parity::close;
use common::*;
use lomo::ffi::dist::{
    LOMO_DIST_CHECK, LOMO_GRAD_ALL_REDUCE, LOMO_GRAD_REDUCE_SCATTER, LOMO_LAYOUT_COLS,
    LOMO_LAYOUT_FLAT, LOMO_LAYOUT_FULL, LOMO_LAYOUT_ROWS,
};

fn emulate() {
    std::env::set_var("LOMO_CUDA_EMULATE", "1");
}

fn compare(c: &Case, n: usize) {
    emulate();
    let (whole, whole_info) = run(c, 0);
    let dev = Case {
        device: 0,
        ..c.clone()
    };
    let (pieces, infos) = run(&dev, n);
    let what = format!(
        "n={n} full={} {:?}",
        c.full,
        (
            c.algorithm,
            c.dtype,
            c.clip_norm,
            c.clip_value,
            c.wd,
            c.stochastic,
            c.dynamic,
            c.carry,
            c.inf
        )
    );
    for step in 0..STEPS {
        for (i, (w, p)) in whole[step].iter().zip(&pieces[step]).enumerate() {
            assert_eq!(w.len(), p.len());
            for (k, (a, b)) in w.iter().zip(p).enumerate() {
                let ok = if c.algorithm == 0 {
                    a.to_bits() == b.to_bits()
                } else {
                    close(c.dtype, *a, *b)
                };
                assert!(
                    ok,
                    "{what}: step {step} tensor {i} element {k}: one CPU rank {a}, CUDA ranks {b}"
                );
            }
        }
        let w = whole_info[0][step];
        for (r, info) in infos.iter().enumerate() {
            let i = info[step];
            assert_eq!(
                (
                    i.step,
                    i.skipped,
                    i.overflow,
                    i.loss_scale.to_bits(),
                    i.next_loss_scale.to_bits(),
                    i.grad_norm.to_bits(),
                    i.clip_coef.to_bits()
                ),
                (
                    w.step,
                    w.skipped,
                    w.overflow,
                    w.loss_scale.to_bits(),
                    w.next_loss_scale.to_bits(),
                    w.grad_norm.to_bits(),
                    w.clip_coef.to_bits()
                ),
                "{what}: step {step} rank {r}: diagnostics differ from one CPU rank's"
            );
        }
    }
}

/// The option variants of the distributed CPU tests (`tests/dist_threads.rs`).
fn variants(c: &Case) -> Vec<Case> {
    vec![
        c.clone(),
        Case {
            clip_norm: 0.5,
            wd: 0.1,
            clip_value: 0.3,
            carry: true,
            ..c.clone()
        },
        Case {
            dtype: BF16,
            stochastic: true,
            ..c.clone()
        },
        Case {
            dynamic: true,
            clip_norm: 1.0,
            inf: Some((1, 2)),
            ..c.clone()
        },
        Case {
            dynamic: true,
            inf: Some((2, 0)),
            ..c.clone()
        },
    ]
}

#[test]
fn cuda_row_pieces_equal_one_cpu_rank_lomo() {
    for n in 1..=4 {
        for c in variants(&case(0)) {
            compare(&c, n);
        }
    }
}

#[test]
fn cuda_row_pieces_equal_one_cpu_rank_adalomo() {
    for n in 1..=4 {
        for c in variants(&case(1)) {
            compare(&c, n);
        }
    }
}

#[test]
fn cuda_column_pieces_equal_one_cpu_rank_lomo() {
    for n in 1..=4 {
        let c = Case {
            cols: true,
            ..case(0)
        };
        for v in variants(&c) {
            compare(&v, n);
        }
    }
}

/// AdaLomo on pieces of columns: two rounds of statistics (R + 2 values, then 1) on the
/// device, reduced on the caller's stream; [2, 40] over 4 ranks and [7, 5] over 4 ranks leave
/// pieces with few columns, and [1, 5] over 4 ranks leaves no column at all on some ranks.
#[test]
fn cuda_column_pieces_equal_one_cpu_rank_adalomo() {
    for n in 1..=4 {
        let c = Case {
            cols: true,
            ..case(1)
        };
        for v in variants(&c) {
            compare(&v, n);
        }
    }
}

#[test]
fn cuda_replicas_equal_one_cpu_rank_and_each_other() {
    for n in [2, 3] {
        for algorithm in [0, 1] {
            let c = Case {
                full: true,
                ..case(algorithm)
            };
            for v in variants(&c) {
                compare(&v, n);
            }
        }
    }
}

/// A failing callback on CUDA: LOMO_STATUS_COMM_ERROR with its code and nothing changed —
/// neither the parameter (per-tensor statistics of a piece) nor the step record (phase end);
/// the step can be cancelled and the next one succeeds.
#[test]
fn cuda_failing_callback_changes_nothing() {
    emulate();
    for algorithm in [0, 1] {
        for (shape, layout) in [
            (&[7i64, 5][..], LOMO_LAYOUT_ROWS),
            (&[7, 5], LOMO_LAYOUT_COLS),
            (&[31], LOMO_LAYOUT_ROWS),
        ] {
            let numel: i64 = shape.iter().product();
            let group = Group::new(1);
            let opt = Opt::new(&cfg_of(&case(algorithm))).unwrap();
            let comm = add_comm(&opt, &group, 0);
            let mut p = Buf::new(F32, &dyadic(&mut Rng::new(1), numel as usize));
            let id = opt.register_on("w", p.ptr(), F32, shape, 0, 0, 0).unwrap();
            shard(&opt, id, layout, shape, 0, comm, 0).unwrap();
            dist_set(&opt, comm, 0).unwrap();
            let mut g = Buf::new(F32, &dyadic(&mut Rng::new(2), numel as usize));
            let before = p.values();
            *group.fail.lock() = -7;
            opt.begin(UPDATE, 0.1).unwrap();
            let e = opt.submit(id, g.ptr(), F32).unwrap_err();
            assert_eq!(e.status, lomo::Status::CommError as u32, "{e:?}");
            assert!(e.message.contains("-7"), "{}", e.message);
            assert_eq!(p.values(), before, "a failed submit changed the parameter");
            // SAFETY: live handle.
            check(unsafe { lomo::ffi::optimizer::lomo_step_cancel(opt.0) }).unwrap();
            *group.fail.lock() = 0;
            opt.begin(UPDATE, 0.1).unwrap();
            opt.submit(id, g.ptr(), F32).unwrap();
            *group.fail.lock() = 3;
            let e = opt.end().unwrap_err();
            assert_eq!(e.status, lomo::Status::CommError as u32);
            assert_eq!(opt.info().step, 0, "a failed step_end advanced the step");
            *group.fail.lock() = 0;
            opt.end().unwrap();
            assert_eq!(opt.info().step, 1);
            assert_ne!(p.values(), before);
        }
    }
}

/// An AdaLomo piece of columns whose SECOND reduction fails: COMM_ERROR, and neither the
/// parameter nor the row and column state changed (the next steps equal a run that never
/// failed).
#[test]
fn cuda_column_second_round_failure_changes_nothing() {
    emulate();
    let shape = [7i64, 5];
    let p0 = dyadic(&mut Rng::new(1), 35);
    let gs: Vec<Vec<f32>> = (0..3).map(|k| dyadic(&mut Rng::new(2 + k), 35)).collect();
    let run = |fail: bool| {
        let group = Group::new(1);
        let opt = Opt::new(&cfg_of(&case(1))).unwrap();
        let comm = add_comm(&opt, &group, 0);
        let mut p = Buf::new(F32, &p0);
        let id = opt.register_on("w", p.ptr(), F32, &shape, 0, 0, 0).unwrap();
        shard(&opt, id, LOMO_LAYOUT_COLS, &shape, 0, comm, 0).unwrap();
        dist_set(&opt, comm, 0).unwrap();
        for (k, gk) in gs.iter().enumerate() {
            let mut g = Buf::new(F32, gk);
            // The second step fails first (β of step 1 is 0: the first has no old state).
            if fail && k == 1 {
                let before = p.values();
                let calls = *group.calls.lock();
                *group.fail_from.lock() = Some((calls + 2, -5));
                opt.begin(UPDATE, 0.1).unwrap();
                let e = opt.submit(id, g.ptr(), F32).unwrap_err();
                assert_eq!(e.status, lomo::Status::CommError as u32, "{e:?}");
                assert!(e.message.contains("-5"), "{}", e.message);
                assert_eq!(
                    *group.calls.lock(),
                    calls + 2,
                    "not the second round that failed"
                );
                assert_eq!(p.values(), before, "a failed submit changed the parameter");
                // SAFETY: live handle.
                check(unsafe { lomo::ffi::optimizer::lomo_step_cancel(opt.0) }).unwrap();
                *group.fail_from.lock() = None;
            }
            opt.begin(UPDATE, 0.1).unwrap();
            opt.submit(id, g.ptr(), F32).unwrap();
            opt.end().unwrap();
        }
        p.values()
    };
    let clean = run(false);
    let failed = run(true);
    assert_eq!(
        clean.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        failed.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        "the failed step changed the state"
    );
}

/// LOMO on flat pieces (LOMO_LAYOUT_FLAT, uneven ranges cutting rows anywhere, empty ones):
/// elementwise, stochastic rounding by the global element index — bit for bit.
#[test]
fn cuda_flat_pieces_equal_one_cpu_rank_lomo() {
    for n in 1..=4 {
        let c = Case {
            flat: true,
            ..case(0)
        };
        for v in variants(&c) {
            compare(&v, n);
        }
    }
}

/// The library averages the gradient on the device (LOMO_GRAD_ALL_REDUCE: every rank a replica
/// submitting its own gradient; the ranks' gradients average to the one rank's): copied to the
/// device scratch, all-reduced and divided by N on the caller's stream, the caller's buffer
/// only read.
#[test]
fn cuda_library_all_reduce_equals_one_cpu_rank() {
    for n in 1..=4 {
        for algorithm in [0, 1] {
            let c = Case {
                grad_mode: LOMO_GRAD_ALL_REDUCE,
                ..case(algorithm)
            };
            for v in variants(&c) {
                compare(&v, n);
            }
        }
    }
}

/// LOMO_GRAD_REDUCE_SCATTER on the device: every rank submits its gradient of the whole tensor,
/// the library reduce-scatters it (a zero-padded device copy when the tensor does not divide
/// evenly) into the rank's flat partition and averages it (LOMO).
#[test]
fn cuda_library_reduce_scatter_equals_one_cpu_rank_lomo() {
    for n in 1..=4 {
        let c = Case {
            grad_mode: LOMO_GRAD_REDUCE_SCATTER,
            ..case(0)
        };
        for v in variants(&c) {
            compare(&v, n);
        }
    }
}

/// The library's gradient reduction on CUDA: a failing callback is LOMO_STATUS_COMM_ERROR with
/// nothing changed, and the caller's gradient is only read (after a failed and a successful
/// step alike).
#[test]
fn cuda_library_reduction_failure_changes_nothing() {
    emulate();
    for (algorithm, layout, mode, shape) in [
        (0, LOMO_LAYOUT_FULL, LOMO_GRAD_ALL_REDUCE, &[7i64, 5][..]),
        (1, LOMO_LAYOUT_FULL, LOMO_GRAD_ALL_REDUCE, &[7, 5]),
        (0, LOMO_LAYOUT_FLAT, LOMO_GRAD_REDUCE_SCATTER, &[31]),
    ] {
        let numel: i64 = shape.iter().product();
        let group = Group::new(1);
        let opt = Opt::new(&cfg_of(&case(algorithm))).unwrap();
        let comm = add_comm(&opt, &group, 0);
        let mut p = Buf::new(F32, &dyadic(&mut Rng::new(1), numel as usize));
        let local: &[i64] = if layout == LOMO_LAYOUT_FLAT {
            &[numel]
        } else {
            shape
        };
        let id = opt.register_on("w", p.ptr(), F32, local, 0, 0, 0).unwrap();
        shard_grad(&opt, id, layout, shape, 0, comm, (mode, comm), 0).unwrap();
        dist_set(&opt, comm, 0).unwrap();
        let g0 = dyadic(&mut Rng::new(2), numel as usize);
        let mut g = Buf::new(F32, &g0);
        let before = p.values();
        *group.fail.lock() = -7;
        opt.begin(UPDATE, 0.1).unwrap();
        let e = opt.submit(id, g.ptr(), F32).unwrap_err();
        assert_eq!(e.status, lomo::Status::CommError as u32, "{e:?}");
        assert!(e.message.contains("-7"), "{}", e.message);
        assert_eq!(p.values(), before, "a failed submit changed the parameter");
        assert_eq!(g.values(), g0, "the caller's gradient was written");
        // SAFETY: live handle.
        check(unsafe { lomo::ffi::optimizer::lomo_step_cancel(opt.0) }).unwrap();
        *group.fail.lock() = 0;
        opt.begin(UPDATE, 0.1).unwrap();
        opt.submit(id, g.ptr(), F32).unwrap();
        opt.end().unwrap();
        assert_ne!(p.values(), before);
        assert_eq!(g.values(), g0, "the caller's gradient was written");
    }
}

/// AdaLomo on flat pieces of a rank ≤ 1 tensor (elementwise state): uneven ranges with an empty
/// one, 1–4 ranks on the emulated CUDA backend, against one CPU rank holding the whole vector.
#[test]
fn cuda_flat_vector_pieces_equal_one_cpu_rank_adalomo() {
    /// A piece's elements `[a, b)`, and its values after every step.
    type Range = (usize, usize);
    type Steps = Vec<Vec<f32>>;
    emulate();
    const N: usize = 31;
    let p0 = dyadic(&mut Rng::new(1), N);
    let gs: Vec<Vec<f32>> = (0..STEPS)
        .map(|k| dyadic(&mut Rng::new(9 + k as u64), N))
        .collect();
    let c = Case {
        clip_norm: 0.5,
        ..case(1)
    };
    let steps = |opt: &Opt, id: u32, p: &Buf, range: Range| -> Steps {
        let mut out = Vec::new();
        for g in &gs {
            for phase in [NORM, UPDATE] {
                opt.begin(phase, 0.05).unwrap();
                let mut gb = Buf::new(F32, &g[range.0..range.1]);
                opt.submit(id, gb.ptr(), F32).unwrap();
                opt.end().unwrap();
            }
            out.push(p.values());
        }
        out
    };
    let opt = Opt::new(&cfg_of(&c)).unwrap();
    let mut p = Buf::new(F32, &p0);
    let id = opt
        .register_on(
            "v",
            p.ptr(),
            F32,
            &[N as i64],
            lomo::ffi::types::LOMO_DEVICE_CPU,
            0,
            0,
        )
        .unwrap();
    let whole = steps(&opt, id, &p, (0, N));
    for n in 1..=4 {
        let group = Group::new(n);
        let pieces: Vec<(Range, Steps)> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..n)
                .map(|r| {
                    let (group, p0, c) = (group.clone(), &p0, &c);
                    sc.spawn(move || {
                        let (a, b) = flat_split(N, n, r);
                        let opt = Opt::new(&cfg_of(c)).unwrap();
                        let comm = add_comm(&opt, &group, r);
                        let mut p = Buf::new(F32, &p0[a..b]);
                        let id = opt
                            .register_on("v", p.ptr(), F32, &[(b - a) as i64], 0, 0, 0)
                            .unwrap();
                        shard(&opt, id, LOMO_LAYOUT_FLAT, &[N as i64], a as i64, comm, 0).unwrap();
                        dist_set(&opt, comm, 0).unwrap();
                        ((a, b), steps(&opt, id, &p, (a, b)))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for ((a, b), hist) in pieces {
            for (step, vals) in hist.iter().enumerate() {
                for (k, v) in vals.iter().enumerate() {
                    let w = whole[step][a + k];
                    assert!(
                        close(F32, w, *v),
                        "n={n} [{a}, {b}) step {step} element {}: one CPU rank {w}, CUDA {v}",
                        a + k
                    );
                }
            }
        }
    }
}

/// What CUDA does not do yet is refused at lomo_param_set_shard with LOMO_STATUS_UNSUPPORTED
/// and changes nothing (the parameter still steps whole): AdaLomo flat pieces of rank ≥ 2
/// tensors. A norm group set before the CUDA registrations
/// works like one set after.
#[test]
fn cuda_unsupported_pieces_are_refused() {
    emulate();
    let group = Group::new(1);
    let opt = Opt::new(&cfg_of(&case(1))).unwrap();
    let comm = add_comm(&opt, &group, 0);
    dist_set(&opt, comm, LOMO_DIST_CHECK).unwrap();
    let mut q = Buf::new(F32, &[0.5; 64]);
    let id = opt
        .register_on("w", q.ptr(), F32, &[8, 8], 0, 0, 0)
        .unwrap();
    shard(&opt, id, LOMO_LAYOUT_ROWS, &[8, 8], 0, comm, 0).unwrap();
    let mut v = Buf::new(F32, &[0.5; 64]);
    let flat = opt.register_on("v", v.ptr(), F32, &[64], 0, 0, 0).unwrap();
    let e = shard(&opt, flat, LOMO_LAYOUT_FLAT, &[8, 8], 0, comm, 0).unwrap_err();
    assert_eq!(e.status, lomo::Status::Unsupported as u32, "{e:?}");
    assert!(e.message.contains("LOMO_LAYOUT_FLAT"), "{}", e.message);
    let mut g = Buf::new(F32, &[0.25; 64]);
    let mut gv = Buf::new(F32, &[0.25; 64]);
    opt.begin(UPDATE, 0.5).unwrap();
    opt.submit(id, g.ptr(), F32).unwrap();
    opt.submit(flat, gv.ptr(), F32).unwrap();
    opt.end().unwrap();
    assert_ne!(v.values(), vec![0.5; 64]);
    assert_ne!(q.values(), vec![0.5; 64]);
}
