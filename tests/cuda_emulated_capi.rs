//! End to end through the C API: CUDA parameters (device 0, emulated with
//! `LOMO_CUDA_EMULATE=1`, host memory standing in for device memory) against the same
//! parameters on the CPU — every phase, loss scaling, groups, the device loss-scale pointer and
//! the step diagnostics — and the one-device-per-optimizer rule.

mod common;

use common::parity::*;
use common::*;
use lomo::ffi::optimizer::{lomo_grad_submit, lomo_step_begin, lomo_step_end};

fn emulate() {
    std::env::set_var("LOMO_CUDA_EMULATE", "1");
}

fn c_api_case(algorithm: u32, clip_norm: f64, p_dtype: u32, g_dtype: u32) {
    emulate();
    let mut cfg = config(algorithm);
    cfg.clip_grad_norm = clip_norm;
    cfg.loss_scale_mode = 2;
    cfg.loss_scale = 512.0;
    cfg.scale_window = 2;
    cfg.weight_decay = 0.01;
    let cpu = Opt::new(&cfg).unwrap();
    let dev = Opt::new(&cfg).unwrap();
    let stream = 0x1234usize as *mut std::ffi::c_void; // ignored by the emulation, passed through
    for o in [&cpu, &dev] {
        o.group_set(1, 0.5, 0.0).unwrap();
    }
    let mut rng = Rng::new(99);
    let (mut cb, mut db) = (Vec::new(), Vec::new());
    for (i, shape) in SHAPES.iter().enumerate() {
        let n: i64 = shape.iter().product();
        let v = rng.vec(n as usize, 1.0);
        cb.push(Buf::new(p_dtype, &v));
        db.push(Buf::new(p_dtype, &v));
        let group = (i % 2) as u32;
        cpu.register_on(&format!("p{i}"), cb[i].ptr(), p_dtype, shape, -1, group, 0)
            .unwrap();
        dev.register_on(&format!("p{i}"), db[i].ptr(), p_dtype, shape, 0, group, 0)
            .unwrap();
    }
    for step in 0..5 {
        let scale = cpu.loss_scale();
        assert_eq!(scale, dev.loss_scale(), "step {step}: loss scale");
        let mut grads: Vec<Buf> = SHAPES
            .iter()
            .enumerate()
            .map(|(i, shape)| {
                let n: i64 = shape.iter().product();
                let mut g = rng.vec(n as usize, 0.3 * scale);
                if step == 2 && i == 3 {
                    g[5] = f32::NAN;
                }
                Buf::new(g_dtype, &g)
            })
            .collect();
        let phases: &[u32] = if clip_norm > 0.0 { &[0, 1] } else { &[1] };
        for &phase in phases {
            // SAFETY: live handles, valid gradient buffers of the registered sizes.
            unsafe {
                check(lomo_step_begin(cpu.0, phase, 0.02, std::ptr::null_mut())).unwrap();
                check(lomo_step_begin(dev.0, phase, 0.02, stream)).unwrap();
                for (i, g) in grads.iter_mut().enumerate() {
                    check(lomo_grad_submit(
                        cpu.0,
                        i as u32,
                        g.ptr(),
                        g_dtype,
                        std::ptr::null_mut(),
                    ))
                    .unwrap();
                    check(lomo_grad_submit(dev.0, i as u32, g.ptr(), g_dtype, stream)).unwrap();
                }
                check(lomo_step_end(cpu.0, std::ptr::null_mut())).unwrap();
                check(lomo_step_end(dev.0, stream)).unwrap();
            }
        }
        for (i, (c, d)) in cb.iter().zip(&db).enumerate() {
            for (k, (x, y)) in c.values().iter().zip(d.values()).enumerate() {
                assert!(
                    close(p_dtype, *x, y),
                    "algo {algorithm} step {step} shape {:?} elem {k}: cpu {x} dev {y}",
                    SHAPES[i]
                );
            }
        }
        resync(&cb, &mut db);
        let mut ptr: *const f32 = std::ptr::null();
        // SAFETY: live handle, valid out pointer; under emulation the address is host memory.
        check(unsafe { lomo::ffi::optimizer::lomo_cuda_loss_scale_ptr(dev.0, &mut ptr) }).unwrap();
        // SAFETY: emulated device memory is host memory; the step has completed.
        assert_eq!(
            unsafe { *ptr },
            cpu.loss_scale(),
            "step {step}: device loss scale"
        );
        let (a, b) = (cpu.info(), dev.info());
        assert_eq!(
            (a.step, a.overflow, a.skipped, a.skipped_total),
            (b.step, b.overflow, b.skipped, b.skipped_total),
            "step {step}"
        );
        assert_eq!(
            (a.grads_submitted, a.grads_nonfinite),
            (b.grads_submitted, b.grads_nonfinite),
            "step {step}"
        );
        assert_eq!(
            (a.loss_scale, a.next_loss_scale),
            (b.loss_scale, b.next_loss_scale),
            "step {step}"
        );
        assert!(
            (a.clip_coef - b.clip_coef).abs() <= 1e-6,
            "step {step}: clip coef {} vs {}",
            a.clip_coef,
            b.clip_coef
        );
        assert_eq!(a.grad_norm.is_nan(), b.grad_norm.is_nan());
    }
}

#[test]
fn c_api_lomo_on_emulated_cuda() {
    c_api_case(0, 0.0, BF16, BF16);
    c_api_case(0, 1.0, F32, BF16);
}

#[test]
fn c_api_adalomo_on_emulated_cuda() {
    c_api_case(1, 0.0, BF16, F32);
    c_api_case(1, 1.0, F16, F16);
}

fn expect_mismatch(e: &Failure) {
    assert_eq!(
        e.status,
        lomo::Status::DeviceMismatch as u32,
        "{}",
        e.message
    );
}

#[test]
fn one_device_per_optimizer() {
    emulate();
    assert!(lomo::ffi::api::lomo_cuda_available());
    let opt = Opt::new(&config(0)).unwrap();
    let mut a = vec![0f32; 4];
    let mut b = vec![0f32; 4];
    opt.register_on("a", a.as_mut_ptr().cast(), F32, &[4], 0, 0, 0)
        .unwrap();
    let e = opt
        .register_on("b", b.as_mut_ptr().cast(), F32, &[4], -1, 0, 0)
        .unwrap_err();
    expect_mismatch(&e);
    let e = opt
        .register_on("c", b.as_mut_ptr().cast(), F32, &[4], 1, 0, 0)
        .unwrap_err();
    expect_mismatch(&e);
    let cpu = Opt::new(&config(0)).unwrap();
    cpu.register("a", a.as_mut_ptr().cast(), F32, &[4], 0)
        .unwrap();
    let mut ptr: *const f32 = std::ptr::null();
    // SAFETY: live handle, valid out pointer.
    let e = check(unsafe { lomo::ffi::optimizer::lomo_cuda_loss_scale_ptr(cpu.0, &mut ptr) })
        .unwrap_err();
    assert_eq!(e.status, lomo::Status::Unsupported as u32, "{}", e.message);
    assert!(ptr.is_null());
    let e = cpu
        .register_on("b", b.as_mut_ptr().cast(), F32, &[4], 0, 0, 0)
        .unwrap_err();
    expect_mismatch(&e);
}

#[test]
fn dynamic_scale_growth_stops_below_the_largest_f32_on_the_device() {
    // The device scaler (kernels/step.cu) as the host's: a scale grown past the largest f32
    // would be infinite, and backing off from infinity stays infinite.
    emulate();
    let mut cfg = config(0);
    cfg.loss_scale_mode = 2;
    cfg.loss_scale = 2f64.powi(124);
    cfg.scale_window = 1;
    let dev = Opt::new(&cfg).unwrap();
    let mut p = Buf::new(F32, &[1.0; 4]);
    let id = dev.register_on("p", p.ptr(), F32, &[4], 0, 0, 0).unwrap();
    let mut g = Buf::new(F32, &[0.0; 4]);
    for step in 0..8 {
        dev.begin(1, 0.1).unwrap();
        dev.submit(id, g.ptr(), F32).unwrap();
        dev.end().unwrap();
        assert_eq!(
            dev.loss_scale() as f64,
            2f64.powi((124 + step).min(127)),
            "step {step}"
        );
    }
}

/// `lomo_param_set_strides` on CUDA parameters (issue 13 kind 6): LOMO, elementwise, accepts a
/// channels_last layout; AdaLomo refuses it with UNSUPPORTED before anything changes (the
/// parameter still steps as registered, like the same CPU parameter).
#[test]
fn strided_layouts_on_emulated_cuda() {
    use lomo::ffi::strides::lomo_param_set_strides;
    emulate();
    let (shape, strides) = ([4i64, 3, 3, 5], [45i64, 1, 15, 3]);
    for algorithm in [0u32, 1] {
        let v = Rng::new(5).vec(180, 1.0);
        let (mut cb, mut db) = (Buf::new(F32, &v), Buf::new(F32, &v));
        let cpu = Opt::new(&config(algorithm)).unwrap();
        let dev = Opt::new(&config(algorithm)).unwrap();
        let ci = cpu
            .register_on("w", cb.ptr(), F32, &shape, -1, 0, 0)
            .unwrap();
        let di = dev
            .register_on("w", db.ptr(), F32, &shape, 0, 0, 0)
            .unwrap();
        // SAFETY: live handles; `strides` holds 4 values.
        let st = unsafe { lomo_param_set_strides(dev.0, di, 4, strides.as_ptr()) };
        if algorithm == 0 {
            assert_eq!(st, lomo::Status::Ok);
            // SAFETY: as above.
            let st = unsafe { lomo_param_set_strides(cpu.0, ci, 4, strides.as_ptr()) };
            assert_eq!(st, lomo::Status::Ok);
        } else {
            assert_eq!(st, lomo::Status::Unsupported);
            assert!(
                last_error().contains("CPU backend only"),
                "{}",
                last_error()
            );
        }
        let g = Buf::new(F32, &Rng::new(6).vec(180, 1.0));
        for (o, i) in [(&cpu, ci), (&dev, di)] {
            o.begin(1, 0.01).unwrap();
            o.submit(i, g.f32s.as_ptr().cast(), F32).unwrap();
            o.end().unwrap();
        }
        for (k, (a, b)) in cb.values().iter().zip(db.values()).enumerate() {
            assert!(
                ulps(F32, *a, b) <= 2.0,
                "algorithm {algorithm} element {k}: {a} {b}"
            );
        }
        assert_ne!(cb.values(), v);
    }
}
