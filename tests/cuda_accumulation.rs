//! Gradient accumulation (`lomo_accum_enable`) on CUDA parameters, through the C API under the
//! emulated launcher (`cargo test --release --features cuda-emulation --test cuda_accumulation`:
//! the kernel sources of `kernels/accum.cu` and the passes compiled for the host, device memory
//! poisoned with NaN), against the CPU backend (itself checked against the f64 reference in
//! tests/accumulation.rs): every algorithm, parameter dtype, buffer dtype and reduction, with
//! and without norm clipping and dynamic loss scaling, k = 1..4 micro-batches, a parameter
//! missing from some micro-batches and an overflowing micro-batch. Parameters must agree per
//! element after every step (`common::parity::close`), diagnostics exactly; the buffers are
//! reported as device workspace.
#![cfg(feature = "cuda-emulation")]

mod common;

use common::parity::*;
use common::*;
use lomo::ffi::accum::*;
use lomo::ffi::state::lomo_memory_stats_get;
use lomo::ffi::types::lomo_memory_stats;

const NORM: u32 = 0;
const UPDATE: u32 = 1;
const ACCUMULATE: u32 = 2;

fn enable(opt: &Opt, buffer: u32, reduction: u32) -> Result<(), Failure> {
    // SAFETY: live handle.
    check(unsafe { lomo_accum_enable(opt.0, buffer, reduction) })
}

fn memory(opt: &Opt) -> lomo_memory_stats {
    let mut st = lomo_memory_stats {
        struct_size: std::mem::size_of::<lomo_memory_stats>(),
        ..Default::default()
    };
    // SAFETY: live handle, valid out pointer.
    check(unsafe { lomo_memory_stats_get(opt.0, &mut st) }).unwrap();
    st
}

#[allow(clippy::too_many_arguments)]
fn case(algorithm: u32, p_dtype: u32, buffer: u32, reduction: u32, k: usize, clip: f64) {
    std::env::set_var("LOMO_CUDA_EMULATE", "1");
    let mut cfg = config(algorithm);
    cfg.clip_grad_norm = clip;
    cfg.loss_scale_mode = 2;
    cfg.loss_scale = 512.0;
    cfg.scale_window = 2;
    cfg.weight_decay = 0.01;
    let cpu = Opt::new(&cfg).unwrap();
    let dev = Opt::new(&cfg).unwrap();
    let mut rng = Rng::new(5 + k as u64 + 10 * p_dtype as u64);
    let (mut cb, mut db) = (Vec::new(), Vec::new());
    let shapes = &SHAPES[..6];
    for (i, shape) in shapes.iter().enumerate() {
        let n: i64 = shape.iter().product();
        let v = rng.vec(n as usize, 1.0);
        cb.push(Buf::new(p_dtype, &v));
        db.push(Buf::new(p_dtype, &v));
        cpu.register_on(&format!("p{i}"), cb[i].ptr(), p_dtype, shape, -1, 0, 0)
            .unwrap();
        if i == 0 {
            // half the parameters registered after accumulation is on
            enable(&cpu, buffer, reduction).unwrap();
            enable(&dev, buffer, reduction).unwrap();
        }
        dev.register_on(&format!("p{i}"), db[i].ptr(), p_dtype, shape, 0, 0, 0)
            .unwrap();
    }
    let per = if buffer == LOMO_ACCUM_F32 || p_dtype == F32 {
        4
    } else {
        2
    };
    let elems: i64 = shapes.iter().map(|s| s.iter().product::<i64>()).sum();
    let mut pending = 0u32;
    let mut bytes = 0u64;
    // SAFETY: live handle, valid out pointers.
    check(unsafe { lomo_accum_get(dev.0, &mut pending, &mut bytes) }).unwrap();
    assert_eq!(bytes, (per * elems) as u64);
    for step in 0..4 {
        let scale = cpu.loss_scale();
        assert_eq!(scale, dev.loss_scale(), "step {step}: loss scale");
        // micro[j][i]: None when parameter i gets no gradient in micro-batch j
        let micro: Vec<Vec<Option<Buf>>> = (0..k)
            .map(|j| {
                shapes
                    .iter()
                    .enumerate()
                    .map(|(i, shape)| {
                        let n: i64 = shape.iter().product();
                        let mut g = rng.vec(n as usize, 0.3 * scale);
                        if step == 2 && i == 3 && j == 0 {
                            g[7] = f32::INFINITY; // overflow in one micro-batch
                        }
                        let skip = (i == 1 && j == k - 1 && k > 1) || (i == 2 && j == 0 && k > 1);
                        (!skip).then(|| Buf::new(F32, &g))
                    })
                    .collect()
            })
            .collect();
        for o in [&cpu, &dev] {
            let run = |phase: u32, lr: f32, j: usize| {
                o.begin(phase, lr).unwrap();
                for (i, g) in micro[j].iter().enumerate().rev() {
                    if let Some(g) = g {
                        let mut g = Buf::new(F32, &g.values());
                        o.submit(i as u32, g.ptr(), F32).unwrap();
                    }
                }
                o.end().unwrap();
            };
            for j in 0..k - 1 {
                run(ACCUMULATE, 0.0, j);
            }
            if clip > 0.0 {
                run(NORM, 0.0, k - 1);
            }
            run(UPDATE, 0.02, k - 1);
        }
        let (ic, id) = (cpu.info(), dev.info());
        assert_eq!(
            (
                ic.step,
                ic.skipped,
                ic.overflow,
                ic.grads_submitted,
                ic.grads_nonfinite
            ),
            (
                id.step,
                id.skipped,
                id.overflow,
                id.grads_submitted,
                id.grads_nonfinite
            ),
            "step {step}: diagnostics"
        );
        if step == 2 {
            assert_eq!(ic.overflow, 1);
        }
        if clip > 0.0 && ic.grad_norm.is_finite() {
            let rel = ((ic.grad_norm - id.grad_norm) / ic.grad_norm).abs();
            assert!(rel < 1e-5, "grad norm {} vs {}", ic.grad_norm, id.grad_norm);
        }
        for (i, (c, d)) in cb.iter().zip(&db).enumerate() {
            for (e, (&x, &y)) in c.values().iter().zip(&d.values()).enumerate() {
                assert!(
                    close(p_dtype, x, y),
                    "alg {algorithm} p {p_dtype} buffer {buffer} red {reduction} k {k} clip \
                     {clip} step {step} shape {:?} [{e}]: cpu {x:e} dev {y:e}",
                    shapes[i]
                );
            }
        }
        resync(&cb, &mut db);
    }
    // The buffers are the device's workspace: freed by lomo_accum_disable.
    let before = memory(&dev);
    assert_eq!(before.devices[0].device, 0);
    // SAFETY: live handle.
    check(unsafe { lomo_accum_disable(dev.0) }).unwrap();
    let after = memory(&dev);
    assert_eq!(
        before.devices[0].workspace_bytes - after.devices[0].workspace_bytes,
        bytes
    );
}

#[test]
fn cuda_accumulation_matches_the_cpu_backend() {
    for algorithm in [0, 1] {
        for p_dtype in [F32, F16, BF16] {
            for (buffer, reduction) in [
                (LOMO_ACCUM_F32, LOMO_ACCUM_SUM),
                (LOMO_ACCUM_PARAM_DTYPE, LOMO_ACCUM_MEAN),
            ] {
                for k in 1..=4 {
                    let clip = if k % 2 == 0 { 1.0 } else { 0.0 };
                    case(algorithm, p_dtype, buffer, reduction, k, clip);
                }
            }
        }
    }
}
