//! Gradient accumulation (`lomo_accum_enable`, `LOMO_PHASE_ACCUMULATE`) on distributed
//! optimizers, threads as ranks through the C ABI: n ranks accumulating k micro-batches per step
//! equal ONE rank without accumulation on the gradient of the concatenated global batch (the
//! micro-batches' sum, or mean, averaged over the ranks) — LOMO bit for bit (dyadic inputs,
//! power-of-two splits: every sum is exact), AdaLomo within f32 rounding — for pieces of rows,
//! columns and flat ranges, replicas (submitting the reduced gradient, or with
//! `LOMO_GRAD_ALL_REDUCE`) and DeepSpeed partitions with `LOMO_GRAD_REDUCE_SCATTER`; with
//! clipping, value clipping, weight decay, dynamic loss scale and overflow, tensors whose
//! gradient comes only in the first or only in the last micro-batch, and ranks submitting in
//! different orders (the emulated CUDA backend: `cuda_dist_accum.rs`). Plus: a failing
//! collective while the step completes (COMM_ERROR, nothing
//! changed; a retried step_end or a cancelled and repeated step equals a run that never failed),
//! ranks with different micro-batch counts (DIST_MISMATCH), and the distributed setup refused
//! while accumulated gradients are pending.

mod common;

use common::dist::*;
use common::dist_accum::*;
use common::*;
use lomo::ffi::accum::{lomo_accum_enable, lomo_accum_get, LOMO_ACCUM_F32, LOMO_ACCUM_SUM};
use lomo::ffi::dist::*;

#[test]
fn accumulating_lomo_ranks_equal_one_rank_on_the_global_batch() {
    for base in layouts(0) {
        for (k, n) in [(2, 2), (3, 3), (3, 2)] {
            for c in variants(&base, k) {
                compare(&c, n);
            }
        }
    }
}

#[test]
fn accumulating_adalomo_ranks_equal_one_rank_on_the_global_batch() {
    for base in layouts(1) {
        for (k, n) in [(2, 3), (3, 2)] {
            for c in variants(&base, k) {
                compare(&c, n);
            }
        }
    }
}

fn enable(opt: &Opt) {
    // SAFETY: live handle.
    check(unsafe { lomo_accum_enable(opt.0, LOMO_ACCUM_F32, LOMO_ACCUM_SUM) }).unwrap();
}

fn pending(opt: &Opt) -> (u32, u64) {
    let (mut p, mut b) = (0, 0);
    // SAFETY: live handle, valid out pointers.
    check(unsafe { lomo_accum_get(opt.0, &mut p, &mut b) }).unwrap();
    (p, b)
}

/// What happens to the step when the first collective of its completing phase fails.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Fail {
    Never,
    /// step_end fails; the caller retries step_end.
    Retry,
    /// step_end fails; the caller cancels and repeats the whole step (both micro-batches).
    Cancel,
}

/// Two ranks, one [7, 5] tensor, 2 steps of 2 micro-batches with the library reducing the
/// gradient (`mode`); returns rank `r`'s parameter after the steps.
fn fail_run(
    algorithm: u32,
    mode: u32,
    fail: Fail,
    group: &std::sync::Arc<Group>,
    sync: &std::sync::Barrier,
    r: usize,
) -> Vec<f32> {
    let opt = Opt::new(&config(algorithm)).unwrap();
    let comm = add_comm(&opt, group, r);
    let numel = 35;
    let full = dyadic(&mut Rng::new(1), numel);
    let rs = mode == LOMO_GRAD_REDUCE_SCATTER;
    let (a, b) = if rs {
        partition(numel, 2, r)
    } else {
        (0, numel)
    };
    let mut p = Buf::new(F32, &full[a..b]);
    let local: Vec<i64> = if rs { vec![(b - a) as i64] } else { vec![7, 5] };
    let id = opt.register("w", p.ptr(), F32, &local, 0).unwrap();
    let (layout, piece) = if rs {
        (LOMO_LAYOUT_FLAT, comm)
    } else {
        (LOMO_LAYOUT_FULL, LOMO_COMM_NONE)
    };
    let flags = if !rs && r == 1 {
        LOMO_SHARD_NORM_DUPLICATE
    } else {
        0
    };
    // Accumulation on before the piece is declared: the buffer grows to the whole tensor's
    // gradient for REDUCE_SCATTER.
    enable(&opt);
    let bytes_before = pending(&opt).1;
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
    assert_eq!(pending(&opt).1, if rs { 4 * 35 } else { bytes_before });
    dist_set(&opt, comm, LOMO_DIST_CHECK).unwrap();
    let mut rng = Rng::new(2 + r as u64);
    for step in 0..2 {
        let micro: Vec<Vec<f32>> = (0..2).map(|_| dyadic(&mut rng, numel)).collect();
        let accumulate = |opt: &Opt| {
            opt.begin(ACCUMULATE, 0.0).unwrap();
            let mut g = Buf::new(F32, &micro[0]);
            opt.submit(id, g.ptr(), F32).unwrap();
            opt.end().unwrap();
        };
        accumulate(&opt);
        let failing = fail != Fail::Never && step == 1;
        if failing {
            sync.wait();
            if r == 0 {
                *group.fail.lock() = -5;
            }
            sync.wait();
        }
        let before = p.values();
        opt.begin(UPDATE, 0.1).unwrap();
        let mut g = Buf::new(F32, &micro[1]);
        opt.submit(id, g.ptr(), F32).unwrap();
        if failing {
            let e = opt.end().unwrap_err();
            assert_eq!(e.status, lomo::Status::CommError as u32, "rank {r}: {e:?}");
            assert!(e.message.contains("-5"), "{}", e.message);
            assert_eq!(
                p.values(),
                before,
                "rank {r}: a failed step changed the parameter"
            );
            assert_eq!(opt.info().step, 1);
            assert_eq!(
                pending(&opt).0,
                1,
                "the accumulated gradients are still there"
            );
            sync.wait();
            if r == 0 {
                *group.fail.lock() = 0;
            }
            sync.wait();
            if fail == Fail::Cancel {
                // SAFETY: live handle.
                check(unsafe { lomo::ffi::optimizer::lomo_step_cancel(opt.0) }).unwrap();
                assert_eq!(pending(&opt).0, 0);
                assert_eq!(p.values(), before);
                accumulate(&opt);
                opt.begin(UPDATE, 0.1).unwrap();
                opt.submit(id, g.ptr(), F32).unwrap();
            }
        }
        opt.end().unwrap();
        assert_eq!(pending(&opt).0, 0);
    }
    assert_eq!(opt.info().step, 2);
    p.values()
}

/// A failing gradient reduction while the last micro-batch's phase ends: COMM_ERROR on every
/// rank, the parameter unchanged and the accumulated gradients kept; a retried step_end, or a
/// cancel and the whole step again, ends equal to ranks that never failed.
#[test]
fn failing_collective_while_the_step_completes_changes_nothing() {
    for algorithm in [0, 1] {
        for mode in [LOMO_GRAD_ALL_REDUCE, LOMO_GRAD_REDUCE_SCATTER] {
            let mut results = Vec::new();
            for fail in [Fail::Never, Fail::Retry, Fail::Cancel] {
                let group = Group::new(2);
                let sync = std::sync::Barrier::new(2);
                let out: Vec<Vec<f32>> = std::thread::scope(|s| {
                    let hs: Vec<_> = (0..2)
                        .map(|r| {
                            let (group, sync) = (&group, &sync);
                            s.spawn(move || fail_run(algorithm, mode, fail, group, sync, r))
                        })
                        .collect();
                    hs.into_iter().map(|h| h.join().unwrap()).collect()
                });
                results.push(out);
            }
            for (k, other) in results.iter().enumerate().skip(1) {
                for r in 0..2 {
                    let same = results[0][r]
                        .iter()
                        .zip(&other[r])
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "alg {algorithm} mode {mode} case {k} rank {r}");
                }
            }
        }
    }
}

/// Ranks that accumulated different numbers of micro-batches: DIST_MISMATCH at the step's end
/// on every rank (LOMO_DIST_CHECK), nothing updated; the step can be cancelled.
#[test]
fn different_micro_batch_counts_are_dist_mismatch() {
    let group = Group::new(2);
    std::thread::scope(|s| {
        for r in 0..2 {
            let group = group.clone();
            s.spawn(move || {
                let opt = Opt::new(&config(0)).unwrap();
                let comm = add_comm(&opt, &group, r);
                let mut p = Buf::new(F32, &dyadic(&mut Rng::new(1), 35));
                let id = opt.register("w", p.ptr(), F32, &[7, 5], 0).unwrap();
                let flags = if r == 1 { LOMO_SHARD_NORM_DUPLICATE } else { 0 };
                shard(&opt, id, LOMO_LAYOUT_FULL, &[7, 5], 0, comm, flags).unwrap();
                dist_set(&opt, comm, LOMO_DIST_CHECK).unwrap();
                enable(&opt);
                let mut g = Buf::new(F32, &[0.25; 35]);
                for _ in 0..=r {
                    opt.begin(ACCUMULATE, 0.0).unwrap();
                    opt.submit(id, g.ptr(), F32).unwrap();
                    opt.end().unwrap();
                }
                opt.begin(UPDATE, 0.1).unwrap();
                opt.submit(id, g.ptr(), F32).unwrap();
                let e = opt.end().unwrap_err();
                assert_eq!(e.status, lomo::Status::DistMismatch as u32, "{e:?}");
                assert!(e.message.contains("micro-batches"), "{}", e.message);
                // SAFETY: live handle.
                check(unsafe { lomo::ffi::optimizer::lomo_step_cancel(opt.0) }).unwrap();
                assert_eq!(opt.info().step, 0);
                assert_eq!(pending(&opt).0, 0);
            });
        }
    });
}

/// The distributed setup does not change under pending accumulated gradients: lomo_dist_set and
/// lomo_param_set_shard are PHASE_ERROR until the step ends or is cancelled (the buffer keeps
/// its size).
#[test]
fn distributed_setup_is_refused_while_gradients_are_pending() {
    let group = Group::new(1);
    let opt = Opt::new(&config(1)).unwrap();
    let comm = add_comm(&opt, &group, 0);
    let mut p = Buf::new(F32, &[0.5; 35]);
    let id = opt.register("w", p.ptr(), F32, &[35], 0).unwrap();
    enable(&opt);
    let mut g = Buf::new(F32, &[0.25; 35]);
    opt.begin(ACCUMULATE, 0.0).unwrap();
    opt.submit(id, g.ptr(), F32).unwrap();
    opt.end().unwrap();
    let phase_error = |r: Result<(), Failure>| {
        let e = r.unwrap_err();
        assert_eq!(e.status, 3, "{e:?}");
        assert!(e.message.contains("accumulated"), "{}", e.message);
    };
    let grad = (LOMO_GRAD_REDUCE_SCATTER, comm);
    phase_error(shard_grad(
        &opt,
        id,
        LOMO_LAYOUT_FLAT,
        &[35],
        0,
        comm,
        grad,
        0,
    ));
    phase_error(dist_set(&opt, comm, LOMO_DIST_CHECK));
    assert_eq!(pending(&opt), (1, 4 * 35));
    // SAFETY: live handle.
    check(unsafe { lomo::ffi::optimizer::lomo_step_cancel(opt.0) }).unwrap();
    shard_grad(&opt, id, LOMO_LAYOUT_FLAT, &[35], 0, comm, grad, 0).unwrap();
    dist_set(&opt, comm, LOMO_DIST_CHECK).unwrap();
}

/// Two replicas (`LOMO_GRAD_ALL_REDUCE`), two tensors, one step of 2 micro-batches; with `fail`
/// the reduction of the second tensor at the completing step_end fails: COMM_ERROR, the first
/// tensor updated and the second not; the retried step_end runs only the second. Returns rank
/// `r`'s tensors.
fn retry_run(
    fail: bool,
    group: &std::sync::Arc<Group>,
    sync: &std::sync::Barrier,
    r: usize,
) -> Vec<Vec<f32>> {
    let opt = Opt::new(&config(0)).unwrap();
    let comm = add_comm(&opt, group, r);
    let mut ps: Vec<Buf> = (0..2)
        .map(|k| Buf::new(F32, &dyadic(&mut Rng::new(10 + k), 35)))
        .collect();
    for (k, p) in ps.iter_mut().enumerate() {
        let id = opt
            .register(&format!("w{k}"), p.ptr(), F32, &[7, 5], 0)
            .unwrap();
        let flags = if r == 1 { LOMO_SHARD_NORM_DUPLICATE } else { 0 };
        let grad = (LOMO_GRAD_ALL_REDUCE, comm);
        shard_grad(
            &opt,
            id,
            LOMO_LAYOUT_FULL,
            &[7, 5],
            0,
            LOMO_COMM_NONE,
            grad,
            flags,
        )
        .unwrap();
    }
    dist_set(&opt, comm, LOMO_DIST_CHECK).unwrap();
    enable(&opt);
    let mut rng = Rng::new(20 + r as u64);
    for phase in [ACCUMULATE, UPDATE] {
        opt.begin(phase, 0.1).unwrap();
        for k in 0..2 {
            let mut g = Buf::new(F32, &dyadic(&mut rng, 35));
            opt.submit(k, g.ptr(), F32).unwrap();
        }
        if phase == UPDATE && fail {
            sync.wait();
            if r == 0 {
                // Both ranks' reductions of tensor 0 pass, those of tensor 1 fail.
                let c0 = *group.calls.lock();
                *group.fail_from.lock() = Some((c0 + 3, -7));
            }
            sync.wait();
            let before: Vec<Vec<f32>> = ps.iter().map(|p| p.values()).collect();
            let e = opt.end().unwrap_err();
            assert_eq!(e.status, lomo::Status::CommError as u32, "rank {r}: {e:?}");
            assert_ne!(
                ps[0].values(),
                before[0],
                "rank {r}: tensor 0 ran before the failure"
            );
            assert_eq!(
                ps[1].values(),
                before[1],
                "rank {r}: the failed tensor changed"
            );
            sync.wait();
            if r == 0 {
                *group.fail_from.lock() = None;
            }
            sync.wait();
        }
        opt.end().unwrap();
    }
    assert_eq!((opt.info().step, pending(&opt).0), (1, 0));
    ps.iter().map(|p| p.values()).collect()
}

/// A collective failing midway through the deferred passes of the completing step_end: the
/// retried step_end does not repeat the passes that ran (equal to ranks that never failed).
#[test]
fn retried_step_end_does_not_repeat_passes() {
    let out: Vec<Vec<Vec<Vec<f32>>>> = [false, true]
        .iter()
        .map(|&fail| {
            let group = Group::new(2);
            let sync = std::sync::Barrier::new(2);
            std::thread::scope(|s| {
                let hs: Vec<_> = (0..2)
                    .map(|r| {
                        let (group, sync) = (&group, &sync);
                        s.spawn(move || retry_run(fail, group, sync, r))
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            })
        })
        .collect();
    for (r, (never, retried)) in out[0].iter().zip(&out[1]).enumerate() {
        for (k, (a, b)) in never.iter().zip(retried).enumerate() {
            let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "rank {r} tensor {k}");
        }
    }
}
