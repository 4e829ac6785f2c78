//! Allocation failure in the C API entry points added with gradient accumulation, strided
//! layouts, flat pieces with library-reduced gradients and batched submission: each fallible
//! allocation of `lomo_accum_enable` (the accumulation buffers; switching their dtype), of a
//! registration while accumulation is on, of `lomo_param_set_strides` (AdaLomo's logical-order
//! scratch) and of `lomo_param_set_shard` with `LOMO_GRAD_ALL_REDUCE` / `LOMO_LAYOUT_FLAT` +
//! `LOMO_GRAD_REDUCE_SCATTER` (the gradient scratch) fails in turn (`lomo::alloc::fail_after`):
//! each failure is `LOMO_STATUS_OUT_OF_MEMORY` with the bytes in the message and leaves
//! everything observable — parameter count, memory statistics, accumulation (pending, bytes),
//! state bytes, every parameter buffer — as it was, and the next steps give what a run that
//! never failed gives. `lomo_grad_submit_batch` has no fallible allocation to fail (none per
//! call). On the CPU and the emulated CUDA device.

mod common;
#[path = "state_common/mod.rs"]
mod state_common;

use common::comm::{add_comm, dist_set, shard_grad, Group};
use common::*;
use lomo::ffi::accum::*;
use lomo::ffi::batch::lomo_grad_submit_batch;
use lomo::ffi::dist::*;
use lomo::ffi::optimizer::lomo_param_count;
use lomo::ffi::state::lomo_memory_stats_get;
use lomo::ffi::strides::lomo_param_set_strides;
use lomo::ffi::types::{lomo_memory_stats, LOMO_DEVICE_CPU};
use lomo::Status;
use state_common::{state_bytes, ADALOMO, LOMO, NORM, UPDATE};

const ACCUMULATE: u32 = 2;

/// Everything observable: count, memory statistics, accumulation, state bytes.
fn snapshot(opt: &Opt) -> (u32, [u64; 6], (u32, u64), Vec<u8>) {
    let mut n = u32::MAX;
    let mut m = lomo_memory_stats {
        struct_size: std::mem::size_of::<lomo_memory_stats>(),
        ..Default::default()
    };
    let (mut pending, mut bytes) = (0u32, 0u64);
    // SAFETY: live handle, valid out pointers.
    unsafe {
        check(lomo_param_count(opt.0, &mut n)).unwrap();
        check(lomo_memory_stats_get(opt.0, &mut m)).unwrap();
        check(lomo_accum_get(opt.0, &mut pending, &mut bytes)).unwrap();
    }
    let mem = [
        m.param_count as u64,
        m.param_elements,
        m.param_bytes,
        m.state_bytes,
        m.workspace_bytes,
        m.adamw_bytes,
    ];
    (n, mem, (pending, bytes), state_bytes(opt))
}

/// Calls `f` with the `k`-th fallible allocation failing, k = 0, 1, …, until it succeeds: every
/// failure is OUT_OF_MEMORY with the bytes in the message and changes nothing observable
/// (`snapshot`, `bufs`). Returns the number of failures (the allocations the call makes).
fn each_fails(
    opt: &Opt,
    bufs: &[&Buf],
    what: &str,
    mut f: impl FnMut() -> Result<(), Failure>,
) -> u64 {
    let before = (
        snapshot(opt),
        bufs.iter().map(|b| b.values()).collect::<Vec<_>>(),
    );
    let mut k = 0;
    loop {
        lomo::alloc::fail_after(Some(k));
        let r = f();
        lomo::alloc::fail_after(None);
        match r {
            Ok(()) => return k,
            Err(e) => {
                assert_eq!(
                    e.status,
                    Status::OutOfMemory as u32,
                    "{what}, allocation {k}: {e:?}"
                );
                assert!(e.message.contains(" bytes for "), "{what}: {}", e.message);
                let after = (
                    snapshot(opt),
                    bufs.iter().map(|b| b.values()).collect::<Vec<_>>(),
                );
                assert!(
                    after == before,
                    "{what}: allocation {k} failed and changed something"
                );
            }
        }
        k += 1;
        assert!(k < 100, "{what}: a handful of allocations");
    }
}

fn accum_enable(opt: &Opt, buffer: u32) -> Result<(), Failure> {
    // SAFETY: live handle.
    check(unsafe { lomo_accum_enable(opt.0, buffer, LOMO_ACCUM_MEAN) })
}

/// One step of 2 micro-batches (one ACCUMULATE phase) over `ids`, gradients `g`, `g2`.
fn accum_step(opt: &Opt, ids: &[u32], g: &mut [Buf], norm: bool) {
    let phases: &[u32] = if norm {
        &[ACCUMULATE, NORM, UPDATE]
    } else {
        &[ACCUMULATE, UPDATE]
    };
    for &phase in phases {
        opt.begin(phase, 1e-2).unwrap();
        for (&id, g) in ids.iter().zip(g.iter_mut()) {
            opt.submit(id, g.ptr(), g.dtype).unwrap();
        }
        opt.end().unwrap();
    }
}

/// Accumulation buffers: enabling (F32), switching to the parameters' dtype, and registering a
/// parameter while accumulation is on, each allocation failing in turn; afterwards the
/// accumulated steps equal those of an optimizer whose allocations never failed.
fn accumulation_allocations(algorithm: u32, device: i32) {
    let run = |inject: bool| -> Vec<Vec<f32>> {
        let opt = Opt::new(&config(algorithm)).unwrap();
        let mut p = [
            Buf::new(F32, &[0.5; 15]),
            Buf::new(BF16, &[0.25; 40]),
            Buf::new(F16, &[-0.75; 6]),
        ];
        let shapes: [&[i64]; 3] = [&[3, 5], &[40], &[2, 3]];
        let mut ids = Vec::new();
        for (k, s) in shapes.iter().enumerate().take(2) {
            ids.push(
                opt.register_on(&format!("p{k}"), p[k].ptr(), p[k].dtype, s, device, 0, 0)
                    .unwrap(),
            );
        }
        let mut g = [
            Buf::new(F32, &[0.125; 15]),
            Buf::new(BF16, &[-0.5; 40]),
            Buf::new(F16, &[1.0; 6]),
        ];
        if inject {
            let n = each_fails(&opt, &[&p[0], &p[1]], "lomo_accum_enable(F32)", || {
                accum_enable(&opt, LOMO_ACCUM_F32)
            });
            assert!(n >= 2, "one buffer per parameter");
            let n = each_fails(
                &opt,
                &[&p[0], &p[1]],
                "lomo_accum_enable(PARAM_DTYPE)",
                || accum_enable(&opt, LOMO_ACCUM_PARAM_DTYPE),
            );
            assert!(n >= 2, "the new buffers");
            let ptr = p[2].ptr();
            let mut id = 0;
            each_fails(
                &opt,
                &[&p[0], &p[1]],
                "a registration with accumulation on",
                || {
                    id = opt.register_on("p2", ptr, F16, shapes[2], device, 0, 0)?;
                    Ok(())
                },
            );
            ids.push(id);
        } else {
            accum_enable(&opt, LOMO_ACCUM_PARAM_DTYPE).unwrap();
            ids.push(
                opt.register_on("p2", p[2].ptr(), F16, shapes[2], device, 0, 0)
                    .unwrap(),
            );
        }
        for _ in 0..2 {
            accum_step(&opt, &ids, &mut g, false);
        }
        p.iter().map(|b| b.values()).collect()
    };
    assert_eq!(
        run(true),
        run(false),
        "algorithm {algorithm} device {device}"
    );
}

#[test]
fn accumulation_buffers_out_of_memory_change_nothing_cpu() {
    for algorithm in [LOMO, ADALOMO] {
        accumulation_allocations(algorithm, LOMO_DEVICE_CPU);
    }
}

#[cfg(feature = "cuda-emulation")]
#[test]
fn accumulation_buffers_out_of_memory_change_nothing_emulated_cuda() {
    std::env::set_var("LOMO_CUDA_EMULATE", "1");
    for algorithm in [LOMO, ADALOMO] {
        accumulation_allocations(algorithm, 0);
    }
}

/// AdaLomo's strided scratch (`numel · (dtype size + 4)` bytes): each allocation of
/// `lomo_param_set_strides` failing in turn, then the steps of the transposed parameter equal
/// those of one whose allocations never failed.
#[test]
fn strided_scratch_out_of_memory_changes_nothing() {
    let run = |inject: bool| -> Vec<f32> {
        let opt = Opt::new(&config(ADALOMO)).unwrap();
        let vals: Vec<f32> = (0..24).map(|i| (i as f32 - 11.0) / 8.0).collect();
        let mut p = Buf::new(F32, &vals);
        let id = opt.register("w", p.ptr(), F32, &[4, 6], 0).unwrap();
        let strides = [1i64, 4]; // stored transposed
                                 // SAFETY: live handle, 2 strides.
        let set = || check(unsafe { lomo_param_set_strides(opt.0, id, 2, strides.as_ptr()) });
        if inject {
            let n = each_fails(&opt, &[&p], "lomo_param_set_strides", set);
            assert!(n >= 1, "the scratch is allocated");
        } else {
            set().unwrap();
        }
        let g = Buf::new(F32, &vals.iter().map(|v| v * 0.25).collect::<Vec<_>>());
        for _ in 0..3 {
            opt.begin(UPDATE, 1e-2).unwrap();
            opt.submit(id, g.f32s.as_ptr().cast(), F32).unwrap();
            opt.end().unwrap();
        }
        p.values()
    };
    assert_eq!(run(true), run(false));
}

/// The gradient scratch of `LOMO_GRAD_ALL_REDUCE` (a whole tensor) and of `LOMO_LAYOUT_FLAT` +
/// `LOMO_GRAD_REDUCE_SCATTER` (one rank: the partition is the tensor; 35 elements), allocated at
/// `lomo_param_set_shard`: each allocation failing in turn changes nothing; the steps after
/// equal those of a run whose allocations never failed.
#[test]
fn gradient_scratch_out_of_memory_changes_nothing() {
    for (layout, mode) in [
        (LOMO_LAYOUT_FULL, LOMO_GRAD_ALL_REDUCE),
        (LOMO_LAYOUT_FLAT, LOMO_GRAD_REDUCE_SCATTER),
    ] {
        for algorithm in [LOMO, ADALOMO] {
            let run = |inject: bool| -> Vec<f32> {
                let opt = Opt::new(&config(algorithm)).unwrap();
                let group = Group::new(1);
                let comm = add_comm(&opt, &group, 0);
                let vals: Vec<f32> = (0..35).map(|i| (i as f32 - 17.0) / 16.0).collect();
                let mut p = Buf::new(F32, &vals);
                let local: &[i64] = if layout == LOMO_LAYOUT_FLAT {
                    &[35]
                } else {
                    &[7, 5]
                };
                let id = opt.register("w", p.ptr(), F32, local, 0).unwrap();
                let piece = if layout == LOMO_LAYOUT_FLAT {
                    comm
                } else {
                    LOMO_COMM_NONE
                };
                let set = || shard_grad(&opt, id, layout, &[7, 5], 0, piece, (mode, comm), 0);
                if inject {
                    let n = each_fails(&opt, &[&p], "lomo_param_set_shard", set);
                    assert!(
                        n >= 1,
                        "layout {layout} mode {mode}: the gradient scratch is allocated"
                    );
                } else {
                    set().unwrap();
                }
                dist_set(&opt, comm, LOMO_DIST_CHECK).unwrap();
                let g = Buf::new(F32, &vals.iter().map(|v| v * 0.5).collect::<Vec<_>>());
                for _ in 0..2 {
                    opt.begin(UPDATE, 1e-2).unwrap();
                    opt.submit(id, g.f32s.as_ptr().cast(), F32).unwrap();
                    opt.end().unwrap();
                }
                p.values()
            };
            assert_eq!(
                run(true),
                run(false),
                "layout {layout} mode {mode} algorithm {algorithm}"
            );
        }
    }
}

/// `lomo_grad_submit_batch` makes no fallible allocation (it allocates nothing per call): the
/// test hook's attempt counter does not move over batched steps, with and without accumulation.
fn batch_has_no_allocation_to_fail(device: i32) {
    for algorithm in [LOMO, ADALOMO] {
        for accum in [false, true] {
            let mut cfg = config(algorithm);
            cfg.clip_grad_norm = 1.0;
            let opt = Opt::new(&cfg).unwrap();
            let mut p = [Buf::new(F32, &[0.5; 15]), Buf::new(BF16, &[0.25; 9000])];
            let ids: Vec<u32> = [&[3i64, 5][..], &[9000][..]]
                .iter()
                .enumerate()
                .map(|(k, s)| {
                    opt.register_on(&format!("p{k}"), p[k].ptr(), p[k].dtype, s, device, 0, 0)
                        .unwrap()
                })
                .collect();
            if accum {
                accum_enable(&opt, LOMO_ACCUM_F32).unwrap();
            }
            let mut g = [Buf::new(F32, &[0.125; 15]), Buf::new(BF16, &[-0.5; 9000])];
            let ptrs: Vec<*const std::ffi::c_void> =
                g.iter_mut().map(|b| b.ptr().cast_const()).collect();
            let dtypes = [F32, BF16];
            let counts = [15u64, 9000];
            let phases: &[u32] = if accum {
                &[ACCUMULATE, NORM, UPDATE]
            } else {
                &[NORM, UPDATE]
            };
            let before = lomo::alloc::attempts();
            for _ in 0..2 {
                for &phase in phases {
                    opt.begin(phase, 1e-2).unwrap();
                    // SAFETY: live handle, arrays of 2 entries, gradients of the registered sizes.
                    check(unsafe {
                        lomo_grad_submit_batch(
                            opt.0,
                            2,
                            ids.as_ptr(),
                            ptrs.as_ptr(),
                            dtypes.as_ptr(),
                            counts.as_ptr(),
                            std::ptr::null_mut(),
                        )
                    })
                    .unwrap();
                    opt.end().unwrap();
                }
            }
            assert_eq!(
                lomo::alloc::attempts(),
                before,
                "algorithm {algorithm} accumulation {accum}: a batched step allocated"
            );
            assert_eq!(opt.info().step, 2);
        }
    }
}

#[test]
fn batch_has_no_allocation_to_fail_cpu() {
    batch_has_no_allocation_to_fail(LOMO_DEVICE_CPU);
}

#[cfg(feature = "cuda-emulation")]
#[test]
fn batch_has_no_allocation_to_fail_emulated_cuda() {
    std::env::set_var("LOMO_CUDA_EMULATE", "1");
    batch_has_no_allocation_to_fail(0);
}
