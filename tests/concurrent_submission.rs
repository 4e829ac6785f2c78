//! Concurrent `lomo_grad_submit` (the one call documented as callable from several threads at
//! once), beyond `protocol.rs`'s small tensors: tensors large enough to run on the CPU pool,
//! racing submissions of the same parameter, and the emulated CUDA device. The sanitizer script
//! runs these under ThreadSanitizer (`scripts/sanitize.sh tsan`, filter `concurrent`).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use lomo::ffi::batch::lomo_grad_submit_batch;
use lomo::Status;

const NORM: u32 = 0;
const UPDATE: u32 = 1;

/// Trains `shapes` for two steps (NORM + UPDATE each), submitting from `threads` threads;
/// returns the parameters.
fn train(algorithm: u32, device: i32, shapes: &[Vec<i64>], threads: usize) -> Vec<Vec<f32>> {
    train_with(algorithm, device, shapes, threads, false)
}

/// A batch of `lomo_grad_submit_batch` (f32 gradients of `ids`).
fn batch(
    opt: &Opt,
    ids: &[u32],
    grads: &[*const std::ffi::c_void],
    counts: &[u64],
) -> Result<(), Failure> {
    let dtypes = [F32; 8];
    // SAFETY: live handle; arrays of ids.len() (<= 8) entries; gradients of the registered sizes.
    check(unsafe {
        lomo_grad_submit_batch(
            opt.0,
            ids.len(),
            ids.as_ptr(),
            grads.as_ptr(),
            dtypes.as_ptr(),
            counts.as_ptr(),
            std::ptr::null_mut(),
        )
    })
}

/// [`train`]; `batched`: each thread takes two parameters at a time and submits them with
/// `lomo_grad_submit_batch` (one of every three such pairs as two single submits instead).
fn train_with(
    algorithm: u32,
    device: i32,
    shapes: &[Vec<i64>],
    threads: usize,
    batched: bool,
) -> Vec<Vec<f32>> {
    let mut cfg = config(algorithm);
    cfg.clip_grad_norm = 1.0;
    let opt = Opt::new(&cfg).unwrap();
    let mut rng = Rng::new(3);
    let mut params: Vec<Vec<f32>> = Vec::new();
    let mut grads: Vec<Vec<f32>> = Vec::new();
    for s in shapes {
        let n = s.iter().product::<i64>() as usize;
        params.push((0..n).map(|_| rng.uniform() * 0.5).collect());
        grads.push((0..n).map(|_| rng.uniform()).collect());
    }
    let ids: Vec<u32> = params
        .iter_mut()
        .zip(shapes)
        .enumerate()
        .map(|(k, (p, s))| {
            opt.register_on(
                &format!("p{k}"),
                p.as_mut_ptr().cast(),
                F32,
                s,
                device,
                0,
                0,
            )
            .unwrap()
        })
        .collect();
    for _ in 0..2 {
        for phase in [NORM, UPDATE] {
            opt.begin(phase, 1e-2).unwrap();
            let next = AtomicUsize::new(0);
            std::thread::scope(|s| {
                for _ in 0..threads {
                    s.spawn(|| loop {
                        let step = if batched { 2 } else { 1 };
                        let k = next.fetch_add(step, Ordering::SeqCst);
                        if k >= ids.len() {
                            break;
                        }
                        let m = step.min(ids.len() - k);
                        if batched && (k / 2) % 3 != 2 {
                            let g: Vec<_> =
                                grads[k..k + m].iter().map(|g| g.as_ptr().cast()).collect();
                            let c: Vec<u64> =
                                grads[k..k + m].iter().map(|g| g.len() as u64).collect();
                            batch(&opt, &ids[k..k + m], &g, &c).unwrap();
                        } else {
                            for j in k..k + m {
                                opt.submit(ids[j], grads[j].as_ptr().cast(), F32).unwrap();
                            }
                        }
                    });
                }
            });
            opt.end().unwrap();
        }
    }
    params
}

#[test]
fn concurrent_submission_of_pool_sized_tensors_equals_sequential() {
    // 2^17 elements and more: each tensor is split over the CPU pool while other threads submit.
    let shapes = vec![vec![1 << 17], vec![300, 700], vec![2, 3, 40_000], vec![17]];
    for algorithm in [0, 1] {
        let one = train(algorithm, -1, &shapes, 1);
        assert_eq!(
            one,
            train(algorithm, -1, &shapes, 4),
            "algorithm {algorithm}"
        );
    }
}

#[cfg(feature = "cuda-emulation")] // the emulated device is a test-only feature
#[test]
fn concurrent_submission_on_the_emulated_device_equals_sequential() {
    std::env::set_var("LOMO_CUDA_EMULATE", "1");
    let shapes = vec![vec![5000], vec![30, 70], vec![2, 3, 400], vec![17]];
    for algorithm in [0, 1] {
        let one = train(algorithm, 0, &shapes, 1);
        assert_eq!(
            one,
            train(algorithm, 0, &shapes, 4),
            "algorithm {algorithm}"
        );
    }
}

#[test]
fn concurrent_duplicate_submissions_apply_exactly_once() {
    for algorithm in [0, 1] {
        let opt = Opt::new(&config(algorithm)).unwrap();
        let mut p = vec![1.0f32; 1 << 16];
        let g = vec![0.5f32; 1 << 16];
        let id = opt
            .register("w", p.as_mut_ptr().cast(), F32, &[1 << 16], 0)
            .unwrap();
        opt.begin(UPDATE, 1e-2).unwrap();
        let ok = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..6 {
                s.spawn(|| match opt.submit(id, g.as_ptr().cast(), F32) {
                    Ok(()) => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => assert_eq!(e.status, Status::DuplicateGradient as u32, "{e:?}"),
                });
            }
        });
        opt.end().unwrap();
        assert_eq!(
            ok.load(Ordering::SeqCst),
            1,
            "exactly one submission is applied"
        );
        assert_eq!(opt.info().grads_submitted, 1);
        assert!(p.iter().all(|&v| v == p[0] && v < 1.0));
    }
}

/// Batches and single submits from 4 threads (disjoint parameters) equal one thread submitting
/// one by one: CPU (pool-sized tensors) and the emulated device (small tensors sharing
/// multi-tensor launches).
#[test]
fn concurrent_batches_and_single_submits_equal_sequential() {
    let cpu = vec![
        vec![1 << 17],
        vec![300, 700],
        vec![17],
        vec![5, 5],
        vec![3],
        vec![40_000],
    ];
    let small = vec![
        vec![50],
        vec![30, 7],
        vec![2, 3, 40],
        vec![17],
        vec![9000],
        vec![64],
        vec![1],
    ];
    let mut cases = vec![(-1, cpu)];
    if cfg!(feature = "cuda-emulation") {
        std::env::set_var("LOMO_CUDA_EMULATE", "1");
        cases.push((0, small));
    }
    for (device, shapes) in cases {
        for algorithm in [0, 1] {
            let one = train(algorithm, device, &shapes, 1);
            assert_eq!(
                one,
                train_with(algorithm, device, &shapes, 4, true),
                "device {device} algorithm {algorithm}"
            );
        }
    }
}

/// A batch racing single submits of the same parameters (a caller's bug): each gradient is
/// applied exactly once — the batch is refused with DUPLICATE_GRADIENT and nothing run, or the
/// singles are — and the step counts each parameter once. CPU and the emulated device.
#[test]
fn a_batch_racing_single_submits_applies_each_gradient_once() {
    let mut devices = vec![-1];
    if cfg!(feature = "cuda-emulation") {
        std::env::set_var("LOMO_CUDA_EMULATE", "1");
        devices.push(0);
    }
    for device in devices {
        for round in 0..20 {
            let opt = Opt::new(&config(0)).unwrap();
            let mut p = [vec![1.0f32; 4096], vec![1.0f32; 100], vec![1.0f32; 3]];
            let g = [vec![0.5f32; 4096], vec![0.5f32; 100], vec![0.5f32; 3]];
            let ids: Vec<u32> = p
                .iter_mut()
                .enumerate()
                .map(|(k, b)| {
                    opt.register_on(
                        &format!("p{k}"),
                        b.as_mut_ptr().cast(),
                        F32,
                        &[b.len() as i64],
                        device,
                        0,
                        0,
                    )
                    .unwrap()
                })
                .collect();
            let addrs: Vec<usize> = g.iter().map(|v| v.as_ptr() as usize).collect();
            let counts: Vec<u64> = g.iter().map(|v| v.len() as u64).collect();
            opt.begin(UPDATE, 1e-2).unwrap();
            let applied = AtomicUsize::new(0);
            std::thread::scope(|s| {
                s.spawn(|| {
                    let ptrs: Vec<*const std::ffi::c_void> = addrs
                        .iter()
                        .map(|&a| a as *const std::ffi::c_void)
                        .collect();
                    match batch(&opt, &ids, &ptrs, &counts) {
                        Ok(()) => {
                            applied.fetch_add(3, Ordering::SeqCst);
                        }
                        Err(e) => assert_eq!(e.status, Status::DuplicateGradient as u32, "{e:?}"),
                    }
                });
                for k in 0..3 {
                    let (opt, ids, g, applied) = (&opt, &ids, &g, &applied);
                    s.spawn(
                        move || match opt.submit(ids[k], g[k].as_ptr().cast(), F32) {
                            Ok(()) => {
                                applied.fetch_add(1, Ordering::SeqCst);
                            }
                            Err(e) => {
                                assert_eq!(e.status, Status::DuplicateGradient as u32, "{e:?}")
                            }
                        },
                    );
                }
            });
            opt.end().unwrap();
            let n = applied.load(Ordering::SeqCst);
            assert_eq!(
                opt.info().grads_submitted as usize,
                n,
                "device {device} round {round}"
            );
            // Every parameter applied exactly once: all its values equal one step from 1.0.
            let once: Vec<f32> = {
                let mut q = vec![1.0f32; 1];
                let gg = [0.5f32; 1];
                let o = Opt::new(&config(0)).unwrap();
                let id = o
                    .register("q", q.as_mut_ptr().cast(), F32, &[1], 0)
                    .unwrap();
                o.begin(UPDATE, 1e-2).unwrap();
                o.submit(id, gg.as_ptr().cast(), F32).unwrap();
                o.end().unwrap();
                q
            };
            let applied_params = p.iter().filter(|b| b.iter().all(|&v| v == once[0])).count();
            let untouched = p.iter().filter(|b| b.iter().all(|&v| v == 1.0)).count();
            assert_eq!(
                applied_params + untouched,
                3,
                "device {device} round {round}: a parameter applied twice or in part"
            );
            assert_eq!(applied_params, n.min(3), "device {device} round {round}");
        }
    }
}
