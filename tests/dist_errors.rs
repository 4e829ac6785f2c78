//! Distributed setups beyond row pieces, threads as ranks through the C ABI: replicas with
//! `LOMO_SHARD_NORM_DUPLICATE`, a failing callback (`LOMO_STATUS_COMM_ERROR`, nothing changed),
//! ranks that disagree (`LOMO_STATUS_DIST_MISMATCH` on every rank) and refused descriptions.

mod common;

use common::dist::*;
use common::*;
use lomo::ffi::dist::*;
use lomo::ffi::types::LOMO_DEVICE_CPU;

/// Two replicas of every tensor (tensor-parallel style), rank 1's marked NORM_DUPLICATE: the
/// global norm, the clip coefficient and the parameters equal one rank's, bit for bit.
#[test]
fn duplicate_replicas_are_counted_once() {
    for algorithm in [0, 1] {
        let c = Case {
            clip_norm: 0.5,
            ..case(algorithm)
        };
        let (whole, whole_info) = run(&c, 0);
        let group = Group::new(2);
        std::thread::scope(|s| {
            for r in 0..2 {
                let (group, whole, whole_info, c) = (group.clone(), &whole, &whole_info, &c);
                s.spawn(move || {
                    let mut rng = Rng::new(5);
                    let sizes: Vec<usize> =
                        SHAPES.iter().map(|s| rows_cols(s).0 * rows_cols(s).1).collect();
                    let params0: Vec<Vec<f32>> = sizes.iter().map(|&n| dyadic(&mut rng, n)).collect();
                    let grads: Vec<Vec<Vec<f32>>> = (0..STEPS)
                        .map(|_| sizes.iter().map(|&n| dyadic(&mut rng, n)).collect())
                        .collect();
                    let opt = Opt::new(&cfg_of(c)).unwrap();
                    let comm = add_comm(&opt, &group, r);
                    let mut bufs: Vec<Buf> = params0.iter().map(|p| Buf::new(F32, p)).collect();
                    for (i, shape) in SHAPES.iter().enumerate() {
                        let id = opt.register(&format!("p{i}"), bufs[i].ptr(), F32, shape, 0).unwrap();
                        let flags = if r == 1 { LOMO_SHARD_NORM_DUPLICATE } else { 0 };
                        shard(&opt, id, LOMO_LAYOUT_FULL, shape, 0, LOMO_COMM_NONE, flags).unwrap();
                    }
                    dist_set(&opt, comm, LOMO_DIST_CHECK).unwrap();
                    for (step, g) in grads.iter().enumerate() {
                        let scale = opt.loss_scale();
                        for phase in [NORM, UPDATE] {
                            opt.begin(phase, [0.05f32, 0.02, 0.1][step % 3]).unwrap();
                            for (i, gi) in g.iter().enumerate() {
                                let scaled: Vec<f32> = gi.iter().map(|v| v * scale).collect();
                                let mut gb = Buf::new(F32, &scaled);
                                opt.submit(i as u32, gb.ptr(), F32).unwrap();
                            }
                            opt.end().unwrap();
                        }
                        let info = opt.info();
                        let w = whole_info[0][step];
                        assert_eq!(info.grad_norm.to_bits(), w.grad_norm.to_bits(), "rank {r} step {step}");
                        assert_eq!(info.clip_coef.to_bits(), w.clip_coef.to_bits(), "rank {r} step {step}");
                        for (i, b) in bufs.iter().enumerate() {
                            let same = b.values().iter().zip(&whole[step][i]).all(|(x, y)| x.to_bits() == y.to_bits());
                            assert!(same, "rank {r} step {step} tensor {i}: the replica differs from one rank's");
                        }
                    }
                });
            }
        });
    }
}

/// A failing callback: LOMO_STATUS_COMM_ERROR with its code, nothing changed; the step can be
/// cancelled and the next one succeeds.
#[test]
fn failing_callback_changes_nothing() {
    for algorithm in [0, 1] {
        let group = Group::new(1);
        let opt = Opt::new(&cfg_of(&case(algorithm))).unwrap();
        let comm = add_comm(&opt, &group, 0);
        let mut p = Buf::new(F32, &dyadic(&mut Rng::new(1), 35));
        let id = opt.register("w", p.ptr(), F32, &[7, 5], 0).unwrap();
        shard(&opt, id, LOMO_LAYOUT_ROWS, &[7, 5], 0, comm, 0).unwrap();
        dist_set(&opt, comm, 0).unwrap();
        let mut g = Buf::new(F32, &dyadic(&mut Rng::new(2), 35));
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

/// Ranks that disagree — one gradient fewer, another lr, another group lr multiplier (how the
/// PyTorch binding carries each param group's lr) — get LOMO_STATUS_DIST_MISMATCH from the same
/// step_end on every rank (no hang), and can cancel the step.
#[test]
fn disagreeing_ranks_get_dist_mismatch() {
    disagreeing_ranks(LOMO_DEVICE_CPU);
}

/// The same on the emulated CUDA backend (the agreement record staged through device memory).
#[cfg(feature = "cuda-emulation")]
#[test]
fn disagreeing_cuda_ranks_get_dist_mismatch() {
    std::env::set_var("LOMO_CUDA_EMULATE", "1");
    disagreeing_ranks(0);
}

fn disagreeing_ranks(device: i32) {
    for mismatch in ["submissions", "lr", "group_lr"] {
        let group = Group::new(2);
        std::thread::scope(|s| {
            for r in 0..2 {
                let group = group.clone();
                s.spawn(move || {
                    let opt = Opt::new(&config(0)).unwrap();
                    let comm = add_comm(&opt, &group, r);
                    let mut ps: Vec<Buf> = (0..2)
                        .map(|k| Buf::new(F32, &dyadic(&mut Rng::new(k), 6)))
                        .collect();
                    for (k, p) in ps.iter_mut().enumerate() {
                        let id = opt
                            .register_on(&format!("p{k}"), p.ptr(), F32, &[6], device, 0, 0)
                            .unwrap();
                        shard(
                            &opt,
                            id,
                            LOMO_LAYOUT_FULL,
                            &[6],
                            0,
                            LOMO_COMM_NONE,
                            r as u32,
                        )
                        .unwrap();
                    }
                    dist_set(&opt, comm, LOMO_DIST_CHECK).unwrap();
                    if mismatch == "group_lr" {
                        opt.group_set(0, if r == 1 { 0.2 } else { 0.1 }, 0.0)
                            .unwrap();
                    }
                    let lr = if mismatch == "lr" && r == 1 { 0.2 } else { 0.1 };
                    opt.begin(UPDATE, lr).unwrap();
                    let mut g = Buf::new(F32, &dyadic(&mut Rng::new(9), 6));
                    let n = if mismatch == "submissions" && r == 1 {
                        1
                    } else {
                        2
                    };
                    for k in 0..n {
                        opt.submit(k, g.ptr(), F32).unwrap();
                    }
                    let e = opt.end().unwrap_err();
                    assert_eq!(
                        e.status,
                        lomo::Status::DistMismatch as u32,
                        "rank {r}: {e:?}"
                    );
                    let field = match mismatch {
                        "lr" => "learning rate",
                        "group_lr" => "lr multiplier",
                        _ => "gradients submitted",
                    };
                    assert!(e.message.contains(field), "rank {r}: {}", e.message);
                    // SAFETY: live handle.
                    check(unsafe { lomo::ffi::optimizer::lomo_step_cancel(opt.0) }).unwrap();
                });
            }
        });
    }
}

/// Bad descriptions are refused with a status and a message, before anything changes.
#[test]
fn bad_shards_and_comms_are_refused() {
    let opt = Opt::new(&config(1)).unwrap();
    let mut p = Buf::new(F32, &[0.5; 35]);
    let id = opt.register("w", p.ptr(), F32, &[7, 5], 0).unwrap();
    let group = Group::new(1);
    let comm = add_comm(&opt, &group, 0);
    let refused = |layout, global: &[i64], offset, piece, status: lomo::Status, needle: &str| {
        let e = shard(&opt, id, layout, global, offset, piece, 0).unwrap_err();
        assert_eq!(e.status, status as u32, "{e:?}");
        assert!(e.message.contains(needle), "{}", e.message);
    };
    refused(
        LOMO_LAYOUT_ROWS,
        &[9, 5],
        3,
        comm,
        lomo::Status::InvalidArgument,
        "rows",
    );
    refused(
        LOMO_LAYOUT_ROWS,
        &[9, 4],
        0,
        comm,
        lomo::Status::InvalidArgument,
        "does not fit",
    );
    refused(
        LOMO_LAYOUT_ROWS,
        &[9, 5],
        0,
        LOMO_COMM_NONE,
        lomo::Status::InvalidArgument,
        "piece_comm",
    );
    refused(
        LOMO_LAYOUT_ROWS,
        &[9, 5],
        0,
        5,
        lomo::Status::InvalidArgument,
        "communicator 5",
    );
    refused(
        LOMO_LAYOUT_FULL,
        &[9, 5],
        0,
        comm,
        lomo::Status::InvalidArgument,
        "FULL",
    );
    refused(
        LOMO_LAYOUT_COLS,
        &[8, 10],
        0,
        comm,
        lomo::Status::InvalidArgument,
        "does not fit",
    );
    refused(
        LOMO_LAYOUT_COLS,
        &[7, 9],
        6,
        comm,
        lomo::Status::InvalidArgument,
        "columns",
    );
    // A flat piece is registered with rank <= 1.
    refused(
        LOMO_LAYOUT_FLAT,
        &[70],
        0,
        comm,
        lomo::Status::InvalidArgument,
        "FLAT",
    );
    refused(9, &[7, 5], 0, comm, lomo::Status::InvalidArgument, "layout");
    let e = dist_set(&opt, 4, 0).unwrap_err();
    assert_eq!(e.status, lomo::Status::InvalidArgument as u32);
    let e = dist_set(&opt, comm, 8).unwrap_err();
    assert_eq!(e.status, lomo::Status::InvalidArgument as u32);
    let bad = lomo_comm {
        struct_size: std::mem::size_of::<lomo_comm>(),
        rank: 2,
        size: 2,
        user: std::ptr::null_mut(),
        all_reduce: Some(all_reduce),
        reduce_scatter: None,
        all_gather: None,
        destroy: None,
    };
    let mut out = 77;
    // SAFETY: live handle, valid pointers.
    let st = unsafe { lomo_comm_add(opt.0, &bad, &mut out) };
    assert_eq!(st, lomo::Status::InvalidArgument);
    assert_eq!(out, 77, "out_comm written on failure");
    let no_fn = lomo_comm {
        all_reduce: None,
        rank: 0,
        ..bad
    };
    // SAFETY: as above.
    assert_eq!(
        unsafe { lomo_comm_add(opt.0, &no_fn, &mut out) },
        lomo::Status::NullArgument
    );
    // SAFETY: as above (NULL pointers are refused).
    assert_eq!(
        unsafe { lomo_comm_add(opt.0, std::ptr::null(), &mut out) },
        lomo::Status::NullArgument
    );
    // A valid piece covering the whole tensor works, and the optimizer still steps.
    shard(&opt, id, LOMO_LAYOUT_ROWS, &[7, 5], 0, comm, 0).unwrap();
    opt.begin(UPDATE, 0.1).unwrap();
    let mut g = Buf::new(F32, &[0.25; 35]);
    opt.submit(id, g.ptr(), F32).unwrap();
    opt.end().unwrap();
}
