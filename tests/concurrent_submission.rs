//! Concurrent `lomo_grad_submit` (the one call documented as callable from several threads at
//! once), beyond `protocol.rs`'s small tensors: tensors large enough to run on the CPU pool,
//! racing submissions of the same parameter, and the emulated CUDA device. The sanitizer script
//! runs these under ThreadSanitizer (`scripts/sanitize.sh tsan`, filter `concurrent`).

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use lomo::Status;

const NORM: u32 = 0;
const UPDATE: u32 = 1;

/// Trains `shapes` for two steps (NORM + UPDATE each), submitting from `threads` threads;
/// returns the parameters.
fn train(algorithm: u32, device: i32, shapes: &[Vec<i64>], threads: usize) -> Vec<Vec<f32>> {
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
                        let k = next.fetch_add(1, Ordering::SeqCst);
                        if k >= ids.len() {
                            break;
                        }
                        opt.submit(ids[k], grads[k].as_ptr().cast(), F32).unwrap();
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
