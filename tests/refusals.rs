//! What the library refuses before anything changes: gradients of the wrong extent
//! (`lomo_grad_submit_checked`) and configurations whose arithmetic would write non-finite values
//! or silently zero updates (issue 13, kinds 1 and 4).

mod common;

use std::ffi::c_void;

use common::*;
use lomo::ffi::optimizer::lomo_grad_submit_checked;
use lomo::ffi::types::lomo_config;
use lomo::Status;

fn submit_checked(opt: &Opt, id: u32, g: *const c_void, dtype: u32, n: u64) -> Result<(), Failure> {
    // SAFETY: live handle; `g` holds at least the elements the tests pass (or is refused unread).
    check(unsafe { lomo_grad_submit_checked(opt.0, id, g, dtype, n, std::ptr::null_mut()) })
}

#[test]
fn checked_submit_refuses_a_gradient_of_another_extent() {
    for algorithm in [0u32, 1] {
        let opt = Opt::new(&config(algorithm)).unwrap();
        let mut w = Buf::new(F32, &[0.5; 4 * 64]);
        let id = opt.register("w", w.ptr(), F32, &[4, 64], 0).unwrap();
        let before = w.values();
        // The case: a (4, 32) gradient for a (4, 64) parameter, and 3 elements for 256;
        // an over-long count is refused too. The buffers are short, so a read would be past them.
        let short = Buf::new(F32, &[1.0; 4 * 32]);
        let three = Buf::new(F32, &[1.0; 3]);
        opt.begin(1, 0.1).unwrap();
        for (g, n) in [(&short, 128u64), (&three, 3), (&short, 257)] {
            let err = submit_checked(&opt, id, g.f32s.as_ptr().cast(), F32, n).unwrap_err();
            assert_eq!(err.status, Status::InvalidArgument as u32);
            assert!(err.message.contains("256"), "{}", err.message);
            assert!(err.message.contains("'w'"), "{}", err.message);
        }
        assert_eq!(w.values(), before, "a refused gradient changes nothing");
        // The parameter still expects its gradient in this phase.
        let g = Buf::new(BF16, &[1.0; 256]);
        submit_checked(&opt, id, g.halves.as_ptr().cast(), BF16, 256).unwrap();
        opt.end().unwrap();
        let info = opt.info();
        assert_eq!((info.grads_submitted, info.step), (1, 1));
        assert_ne!(w.values(), before);
        // An unknown id keeps its status.
        opt.begin(1, 0.1).unwrap();
        let err = submit_checked(&opt, 7, g.halves.as_ptr().cast(), BF16, 256).unwrap_err();
        assert_eq!(err.status, Status::UnknownParam as u32);
        opt.end().unwrap();
    }
}

#[test]
fn checked_submit_of_an_empty_parameter() {
    let opt = Opt::new(&config(1)).unwrap();
    let id = opt
        .register("e", std::ptr::null_mut(), F32, &[4, 0], 0)
        .unwrap();
    opt.begin(1, 0.1).unwrap();
    assert_eq!(
        submit_checked(&opt, id, std::ptr::null(), F32, 1)
            .unwrap_err()
            .status,
        Status::InvalidArgument as u32
    );
    submit_checked(&opt, id, std::ptr::null(), F32, 0).unwrap();
    opt.end().unwrap();
}

fn refused(cfg: &lomo_config, field: &str) {
    let err = Opt::new(cfg)
        .err()
        .unwrap_or_else(|| panic!("{field}: accepted"));
    assert_eq!(err.status, Status::InvalidArgument as u32, "{field}");
    assert!(err.message.contains(field), "{field}: {}", err.message);
}

#[test]
fn configurations_that_would_write_non_finite_values_or_zero_updates_are_refused() {
    let tiny = 1e-300; // positive in f64, 0 in f32
    let huge = 1e300; // finite in f64, infinite in f32
    let ada = || config(1);
    let cases: Vec<(lomo_config, &str)> = vec![
        // The case: eps1 = 0 wrote NaN to every zero-gradient row.
        (lomo_config { eps1: 0.0, ..ada() }, "eps1"),
        (
            lomo_config {
                eps1: tiny,
                ..ada()
            },
            "eps1",
        ),
        (lomo_config { eps1: 2.0, ..ada() }, "eps1"),
        (
            lomo_config {
                eps1: f64::NAN,
                ..ada()
            },
            "eps1",
        ),
        // eps2 = 0: an all-zero parameter never trains.
        (lomo_config { eps2: 0.0, ..ada() }, "eps2"),
        (
            lomo_config {
                eps2: huge,
                ..ada()
            },
            "eps2",
        ),
        (
            lomo_config {
                clip_threshold: tiny,
                ..ada()
            },
            "clip_threshold",
        ),
        (
            lomo_config {
                loss_scale: tiny,
                ..ada()
            },
            "loss_scale",
        ),
        (
            lomo_config {
                loss_scale: huge,
                ..ada()
            },
            "loss_scale",
        ),
        (
            lomo_config {
                clip_grad_value: tiny,
                ..config(0)
            },
            "clip_grad_value",
        ),
        (
            lomo_config {
                clip_grad_norm: huge,
                ..config(0)
            },
            "clip_grad_norm",
        ),
        (
            lomo_config {
                loss_scale_mode: 2,
                min_loss_scale: tiny,
                ..config(0)
            },
            "min_loss_scale",
        ),
    ];
    for (cfg, field) in &cases {
        refused(cfg, field);
    }
    // The boundaries themselves are accepted, and LOMO ignores AdaLomo's fields.
    let min = f32::MIN_POSITIVE as f64;
    for cfg in [
        lomo_config {
            eps1: min,
            eps2: min,
            clip_threshold: min,
            ..ada()
        },
        lomo_config {
            eps1: 1.0,
            loss_scale: f32::MAX as f64,
            ..ada()
        },
        lomo_config {
            clip_grad_value: min,
            clip_grad_norm: min,
            ..config(0)
        },
        lomo_config {
            eps1: 0.0,
            eps2: 0.0,
            ..config(0)
        },
    ] {
        Opt::new(&cfg).unwrap();
    }
}

#[test]
fn eps1_at_its_minimum_keeps_zero_gradient_rows_finite() {
    // The case at the smallest accepted eps1: rows with an all-zero gradient next to
    // rows near 1e5, and an all-zero 1-D parameter, stay finite and unchanged.
    let cfg = lomo_config {
        eps1: f32::MIN_POSITIVE as f64,
        loss_scale_mode: 0,
        ..config(1)
    };
    let opt = Opt::new(&cfg).unwrap();
    let mut w = Buf::new(F32, &[0.5; 8 * 16]);
    let mut v = Buf::new(F32, &[0.25; 16]);
    let wid = opt.register("w", w.ptr(), F32, &[8, 16], 0).unwrap();
    let vid = opt.register("v", v.ptr(), F32, &[16], 0).unwrap();
    let gw: Vec<f32> = (0..128)
        .map(|e| if (e / 16) % 2 == 0 { 0.0 } else { 1e5 })
        .collect();
    let (mut gw, mut gv) = (Buf::new(F32, &gw), Buf::new(F32, &[0.0; 16]));
    opt.begin(1, 0.01).unwrap();
    opt.submit(wid, gw.ptr(), F32).unwrap();
    opt.submit(vid, gv.ptr(), F32).unwrap();
    opt.end().unwrap();
    assert_eq!(opt.info().overflow, 0);
    let (w, v) = (w.values(), v.values());
    assert!(w.iter().chain(&v).all(|x| x.is_finite()));
    assert!((0..128).filter(|e| (e / 16) % 2 == 0).all(|e| w[e] == 0.5));
    assert!((0..128).filter(|e| (e / 16) % 2 == 1).all(|e| w[e] < 0.5));
    assert!(v.iter().all(|&x| x == 0.25));
}
