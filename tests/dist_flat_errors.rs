//! Flat pieces and gradients reduced by the library, when things go wrong — threads as ranks
//! through the C ABI: a failing reduce-scatter, gradient all-reduce or second flat statistics
//! round is `LOMO_STATUS_COMM_ERROR` with nothing changed (parameters, state, the caller's
//! gradient) and the step retried after a cancel equals a run that never failed; combinations that
//! cannot work are refused at `lomo_param_set_shard` before anything changes; ranks that disagree
//! get `LOMO_STATUS_DIST_MISMATCH`; the gradient scratch is counted as library memory.

mod common;

use common::dist::*;
use common::*;
use lomo::ffi::dist::*;

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
