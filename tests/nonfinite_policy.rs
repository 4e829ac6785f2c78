//! `lomo_config.nonfinite_policy` (issue 17): LOMO steps without a NORM phase whose gradients
//! hold ±inf and NaN, against the independent f64 reference (`common::reference`), through the C
//! API. PER_TENSOR (default): a tensor with a non-finite gradient keeps every value, the others
//! follow the reference. PER_ELEMENT: every element with a finite gradient follows the
//! reference, the others keep their bits. Either way the step reports the overflow and no
//! non-finite value is written. Also: the older `struct_size` (before the field) is accepted
//! with the default, unknown policies and CUDA parameters are refused.

mod common;

use common::reference::*;
use common::*;
use lomo::ffi::types::{
    LOMO_CONFIG_SIZE_V1, LOMO_NONFINITE_PER_ELEMENT, LOMO_NONFINITE_PER_TENSOR,
};

/// Shapes: tiny, one tile, and multi-chunk tensors (> 64K elements: split over the pool).
fn policy_shapes() -> Vec<Vec<i64>> {
    vec![vec![1], vec![37], vec![3, 4097], vec![300, 701], vec![1000]]
}

/// Where gradient `k` gets non-finite values (None: the tensor stays finite).
fn bad_positions(k: usize, n: usize) -> Vec<(usize, f32)> {
    match k {
        0 => vec![(0, f32::NAN)],
        2 => vec![
            (5, f32::INFINITY),
            (4097 + 11, f32::NEG_INFINITY),
            (n - 1, f32::NAN),
        ],
        3 => vec![(70_000, f32::INFINITY), (150_001, f32::NAN)],
        _ => vec![],
    }
}

fn run(policy: u32, pdtype: u32, gdtype: u32, clip_value: f64, wd: f64, scale: f64, seed: u64) {
    let c = Case {
        algorithm: 0,
        pdtype,
        gdtype,
        clip_norm: 0.0,
        clip_value,
        wd,
        scale,
        carry: false,
        pscale: 1.0,
    };
    let shapes = policy_shapes();
    let mut cfg = config(0);
    cfg.clip_grad_value = clip_value;
    cfg.weight_decay = wd;
    cfg.loss_scale_mode = if scale > 0.0 { 1 } else { 0 };
    cfg.loss_scale = if scale > 0.0 { scale } else { 1.0 };
    cfg.nonfinite_policy = policy;
    // Every other case of f16/bf16 parameters rounds stochastically (within one ulp too).
    cfg.rounding = if pdtype != F32 { (seed % 2) as u32 } else { 0 };
    let opt = Opt::new(&cfg).unwrap();
    let mut rng = Rng::new(seed);
    let mut bufs = Vec::new();
    let mut ids = Vec::new();
    for (k, shape) in shapes.iter().enumerate() {
        let n: usize = shape.iter().map(|&d| d as usize).product();
        let mut b = Buf::new(pdtype, &rng.vec(n, 0.5));
        ids.push(
            opt.register(&format!("p{k}"), b.ptr(), pdtype, shape, 0)
                .unwrap(),
        );
        bufs.push(b);
    }
    let s = if scale > 0.0 { scale } else { 1.0 };
    let lr = 0.05f32;
    let mut grads: Vec<Vec<f32>> = bufs
        .iter()
        .map(|b| {
            (0..b.len())
                .map(|_| Buf::round(gdtype, (rng.normal() as f64 * 0.3 * s) as f32))
                .collect()
        })
        .collect();
    let mut bad = Vec::new();
    for (k, g) in grads.iter_mut().enumerate() {
        let pos = bad_positions(k, g.len());
        for &(i, v) in &pos {
            g[i] = v;
        }
        bad.push(pos.iter().map(|&(i, _)| i).collect::<Vec<_>>());
    }
    let before: Vec<Vec<f32>> = bufs.iter().map(Buf::values).collect();
    let want = reference_step(&c, &shapes, &before, &grads, &mut [], lr as f64, 1);
    let mut gbufs: Vec<Buf> = grads.iter().map(|g| Buf::new(gdtype, g)).collect();
    opt.begin(1, lr).unwrap();
    for (k, g) in gbufs.iter_mut().enumerate() {
        opt.submit(ids[k], g.ptr(), gdtype).unwrap();
    }
    opt.end().unwrap();
    let info = opt.info();
    let n_bad = bad.iter().filter(|b| !b.is_empty()).count() as u32;
    assert_eq!(info.overflow, 1, "{c:?} policy {policy}");
    assert_eq!(info.grads_nonfinite, n_bad, "{c:?} policy {policy}");
    for (k, b) in bufs.iter().enumerate() {
        let got = b.values();
        assert!(
            got.iter().all(|v| v.is_finite()),
            "{c:?}: a non-finite value was written"
        );
        if policy == LOMO_NONFINITE_PER_TENSOR && !bad[k].is_empty() {
            let same = got
                .iter()
                .zip(&before[k])
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{c:?} p{k}: the tensor changed");
            continue;
        }
        for (i, (&g, &w)) in got.iter().zip(&want[k]).enumerate() {
            if bad[k].contains(&i) {
                assert_eq!(
                    g.to_bits(),
                    before[k][i].to_bits(),
                    "{c:?} p{k}[{i}] changed"
                );
                continue;
            }
            let delta = (w - before[k][i] as f64).abs();
            let ulp = if pdtype == F32 {
                1e-6 * w.abs()
            } else {
                let rounded = Buf::round(pdtype, w as f32);
                (rounded as f64 - w).abs().max(ulp_of(pdtype, w))
            };
            assert!(
                (g as f64 - w).abs() <= ulp + 1e-5 * delta + 1e-12,
                "{c:?} policy {policy} p{k}[{i}]: got {g:e}, want {w:e}"
            );
        }
    }
}

#[test]
fn both_policies_match_the_reference_with_nonfinite_gradients() {
    let mut seed = 100;
    for policy in [LOMO_NONFINITE_PER_TENSOR, LOMO_NONFINITE_PER_ELEMENT] {
        for pdtype in [F32, F16, BF16] {
            for gdtype in [pdtype, F32] {
                for (clip_value, wd, scale) in [(0.0, 0.0, 0.0), (0.2, 0.1, 1024.0)] {
                    run(policy, pdtype, gdtype, clip_value, wd, scale, seed);
                    seed += 1;
                }
            }
        }
    }
}

#[test]
fn older_struct_size_gets_the_default_and_bad_policies_are_refused() {
    assert!(LOMO_CONFIG_SIZE_V1 < std::mem::size_of::<lomo::ffi::types::lomo_config>());
    // A caller built against the header without the field: only the prefix is readable.
    let full = config(0);
    let mut old = vec![0u8; LOMO_CONFIG_SIZE_V1];
    // SAFETY: copies the prefix of a valid struct into a buffer of exactly that size.
    unsafe {
        std::ptr::copy_nonoverlapping(
            &full as *const _ as *const u8,
            old.as_mut_ptr(),
            LOMO_CONFIG_SIZE_V1,
        )
    };
    old[..std::mem::size_of::<usize>()].copy_from_slice(&LOMO_CONFIG_SIZE_V1.to_ne_bytes());
    let mut p = std::ptr::null_mut();
    // SAFETY: the buffer holds struct_size bytes, as the versioned contract allows.
    check(unsafe { lomo::ffi::optimizer::lomo_optimizer_new(old.as_ptr() as *const _, &mut p) })
        .unwrap();
    let opt = Opt(p);
    // The default (per tensor): a NaN leaves the whole tensor as it was.
    let mut w = Buf::new(F32, &[1.0, 2.0, 3.0]);
    let id = opt.register("w", w.ptr(), F32, &[3], 0).unwrap();
    let mut g = Buf::new(F32, &[0.5, f32::NAN, 0.5]);
    opt.begin(1, 0.1).unwrap();
    opt.submit(id, g.ptr(), F32).unwrap();
    opt.end().unwrap();
    assert_eq!(w.values(), vec![1.0, 2.0, 3.0]);
    assert_eq!(opt.info().grads_nonfinite, 1);

    let mut cfg = config(0);
    cfg.nonfinite_policy = 7;
    let e = Opt::new(&cfg).map(|_| ()).expect_err("policy 7 is refused");
    assert_eq!(e.status, lomo::Status::InvalidArgument as u32);
    assert!(e.message.contains("nonfinite_policy"), "{}", e.message);

    let mut cfg = config(0);
    cfg.nonfinite_policy = LOMO_NONFINITE_PER_ELEMENT;
    let opt = Opt::new(&cfg).unwrap();
    let mut b = Buf::new(F32, &[1.0; 4]);
    let e = opt
        .register_on("w", b.ptr(), F32, &[4], 0, 0, 0)
        .expect_err("a CUDA parameter is refused under PER_ELEMENT");
    assert_eq!(e.status, lomo::Status::Unsupported as u32, "{}", e.message);
}

/// The one-pass per-element path and the default path run the same arithmetic: with finite
/// gradients (and with none, where only the bad elements differ) their results agree bit for
/// bit, for every dtype, rounding mode and option (the property docs/BENCHMARKS.md states; the
/// values themselves are checked against the reference above).
#[test]
fn per_element_equals_per_tensor_bit_for_bit_on_finite_gradients() {
    let shapes = policy_shapes();
    let mut seed = 500;
    for pdtype in [F32, F16, BF16] {
        for gdtype in [pdtype, F32] {
            for rounding in [0u32, 1] {
                for (clip_value, wd, scale) in [(0.0, 0.0, 0.0), (0.2, 0.1, 1024.0)] {
                    let mut results = Vec::new();
                    for policy in [LOMO_NONFINITE_PER_TENSOR, LOMO_NONFINITE_PER_ELEMENT] {
                        let mut cfg = config(0);
                        cfg.clip_grad_value = clip_value;
                        cfg.weight_decay = wd;
                        cfg.loss_scale_mode = if scale > 0.0 { 1 } else { 0 };
                        cfg.loss_scale = if scale > 0.0 { scale } else { 1.0 };
                        cfg.rounding = rounding;
                        cfg.nonfinite_policy = policy;
                        let opt = Opt::new(&cfg).unwrap();
                        let mut rng = Rng::new(seed);
                        let mut bufs: Vec<Buf> = Vec::new();
                        for (k, shape) in shapes.iter().enumerate() {
                            let n: usize = shape.iter().map(|&d| d as usize).product();
                            let mut b = Buf::new(pdtype, &rng.vec(n, 0.5));
                            opt.register(&format!("p{k}"), b.ptr(), pdtype, shape, 0)
                                .unwrap();
                            bufs.push(b);
                        }
                        for step in 0..2 {
                            opt.begin(1, 0.05).unwrap();
                            for (k, b) in bufs.iter().enumerate() {
                                let g: Vec<f32> =
                                    (0..b.len()).map(|_| rng.normal() * 0.3).collect();
                                let mut gb = Buf::new(gdtype, &g);
                                opt.submit(k as u32, gb.ptr(), gdtype).unwrap();
                            }
                            opt.end().unwrap();
                            assert_eq!(opt.info().overflow, 0, "step {step}");
                        }
                        let bits: Vec<Vec<u32>> = bufs
                            .iter()
                            .map(|b| b.values().iter().map(|v| v.to_bits()).collect())
                            .collect();
                        results.push(bits);
                    }
                    assert!(
                        results[0] == results[1],
                        "p {pdtype} g {gdtype} rounding {rounding} clip {clip_value}: the \
                         policies differ on finite gradients"
                    );
                    seed += 1;
                }
            }
        }
    }
}
