//! Host-platform handler tests without JAX (hand-built call frames, [`super::testing`]), and
//! the CUDA handlers' behaviour without a driver.

#![allow(clippy::type_complexity)]

use super::abi::*;
use super::frame::{boundary, XlaError};
use super::testing::{arr, call, take_error, Arr, STREAM_CTX};
use super::*;

/// Operands (lr, loss_scale, clip_coef, step) as host scalars.
struct Hyper {
    lr: f32,
    scale: f32,
    coef: f32,
    step: i32,
}

impl Hyper {
    fn arrs(&mut self) -> [Arr; 4] {
        [
            (dtype::F32, (&mut self.lr as *mut f32).cast(), vec![]),
            (dtype::F32, (&mut self.scale as *mut f32).cast(), vec![]),
            (dtype::F32, (&mut self.coef as *mut f32).cast(), vec![]),
            (dtype::S32, (&mut self.step as *mut i32).cast(), vec![]),
        ]
    }
}

fn hyper(lr: f32, step: i32) -> Hyper {
    Hyper {
        lr,
        scale: 1.0,
        coef: 1.0,
        step,
    }
}

#[test]
fn answers_the_metadata_query_with_api_0_5() {
    let mut c = call(&[], &[], &[]);
    // SAFETY: zeroed plain-data structs.
    let mut md: XLA_FFI_Metadata = unsafe { std::mem::zeroed() };
    md.struct_size = XLA_FFI_METADATA_STRUCT_SIZE;
    let mut ext = XLA_FFI_Metadata_Extension {
        extension_base: XLA_FFI_InternalExtension {
            struct_size: XLA_FFI_METADATA_EXTENSION_STRUCT_SIZE,
            type_: XLA_FFI_EXTENSION_METADATA,
            next: std::ptr::null_mut(),
        },
        metadata: &mut md,
    };
    c.frame.extension_start = (&mut ext as *mut XLA_FFI_Metadata_Extension).cast();
    for handler in [
        lomo_xla_grad_sum_sq,
        lomo_xla_lomo_update,
        lomo_xla_adalomo_update,
        lomo_xla_lomo_update_cuda,
        split_norm::lomo_xla_norm_partials,
        split_norm::lomo_xla_norm_finish,
        split_norm::lomo_xla_lomo_piece_stats,
        split_norm::lomo_xla_lomo_piece_apply,
        split_norm::lomo_xla_adalomo_piece_stats,
        split_norm::lomo_xla_adalomo_piece_apply,
        split_norm::lomo_xla_adalomo_piece_apply_cuda,
    ] {
        md.api_version.major_version = -1;
        // SAFETY: a complete fake frame.
        let err = unsafe { handler(&mut *c.frame) };
        assert!(err.is_null());
        assert_eq!(
            (md.api_version.major_version, md.api_version.minor_version),
            (0, 5)
        );
        assert_eq!(md.api_version.struct_size, XLA_FFI_API_VERSION_STRUCT_SIZE);
        assert_eq!(md.traits, 0);
    }
    // An older framework with the same layouts (jaxlib 0.10: API 0.3) gets its own version;
    // anything else gets 0.5 (and XLA decides).
    for (framework, want) in [
        ((0, 3), (0, 3)),
        ((0, 4), (0, 4)),
        ((0, 2), (0, 5)),
        ((0, 7), (0, 5)),
    ] {
        c._api.api_version.major_version = framework.0;
        c._api.api_version.minor_version = framework.1;
        // SAFETY: a complete fake frame.
        assert!(unsafe { lomo_xla_adalomo_update(&mut *c.frame) }.is_null());
        assert_eq!(
            (md.api_version.major_version, md.api_version.minor_version),
            want
        );
    }
}

#[test]
fn rejects_short_structs() {
    let mut c = call(&[], &[], &[]);
    c.frame.struct_size = XLA_FFI_CALL_FRAME_STRUCT_SIZE - 8;
    // SAFETY: a complete fake frame (claiming to be smaller).
    let e = take_error(unsafe { lomo_xla_lomo_update(&mut *c.frame) }).unwrap();
    assert_eq!(e.code, XLA_FFI_ERROR_INVALID_ARGUMENT);
    assert!(
        e.message.contains("XLA_FFI_CallFrame is 160 bytes"),
        "{}",
        e.message
    );

    let (mut p, mut g, mut ok) = (vec![1f32; 6], vec![1f32; 6], [0u8]);
    let mut h = hyper(0.1, 1);
    let [a, b, cc, d] = h.arrs();
    let mut c = call(
        &[
            arr(dtype::F32, &mut p, &[2, 3]),
            arr(dtype::F32, &mut g, &[2, 3]),
            a,
            b,
            cc,
            d,
        ],
        &[
            arr(dtype::F32, &mut p, &[2, 3]),
            arr(dtype::PRED, &mut ok, &[]),
        ],
        &[],
    );
    c._bufs[1].struct_size = 40;
    // SAFETY: a complete fake frame.
    let e = take_error(unsafe { lomo_xla_lomo_update(&mut *c.frame) }).unwrap();
    assert!(
        e.message.contains("grad: XLA_FFI_Buffer is 40 bytes"),
        "{}",
        e.message
    );
}

/// LOMO with decay against an f64 reference: p·(1 − lr·wd) + (−lr)·clamp(g/S, ±v)·c, rounded
/// once (the core fuses the last multiply-add).
#[test]
fn lomo_update_in_a_separate_result_buffer() {
    let p: Vec<f32> = (0..6).map(|i| 0.25 * i as f32 - 0.6).collect();
    let g: Vec<f32> = (0..6).map(|i| 3.0 - 1.7 * i as f32).collect();
    let (mut p_in, mut g_in, mut p_out, mut ok) = (p.clone(), g.clone(), vec![0f32; 6], [9u8]);
    let mut h = Hyper {
        lr: 0.1,
        scale: 4.0,
        coef: 0.5,
        step: 3,
    };
    let [a, b, cc, d] = h.arrs();
    let c = call(
        &[
            arr(dtype::F32, &mut p_in, &[2, 3]),
            arr(dtype::F32, &mut g_in, &[2, 3]),
            a,
            b,
            cc,
            d,
        ],
        &[
            arr(dtype::F32, &mut p_out, &[2, 3]),
            arr(dtype::PRED, &mut ok, &[]),
        ],
        &[("clip_grad_value", 0.5), ("weight_decay", 0.2)],
    );
    let mut frame = c.frame;
    // SAFETY: a complete fake frame.
    assert!(take_error(unsafe { lomo_xla_lomo_update(&mut *frame) }).is_none());
    assert_eq!(ok, [1]);
    assert_eq!(
        p_in, p,
        "the operand stays intact when the result is a separate buffer"
    );
    let decay = (1.0f64 - 0.1f32 as f64 * 0.2) as f32;
    let neg_lr = -(0.1f32 as f64) as f32;
    for i in 0..6 {
        let x = ((g[i] / 4.0).clamp(-0.5, 0.5) * 0.5) as f64;
        let want = (x * neg_lr as f64 + (p[i] * decay) as f64) as f32;
        assert_eq!(p_out[i], want, "element {i}");
    }
}

#[test]
fn adalomo_vector_update_in_place_and_runtime_checks() {
    let (mut p, mut g, mut v, mut ok) = (vec![0.5f32; 4], vec![2f32; 4], vec![0f32; 4], [0u8]);
    let (pp, vp) = (p.as_mut_ptr(), v.as_mut_ptr());
    let mut h = hyper(0.1, 1);
    let [a, b, cc, d] = h.arrs();
    let mut c = call(
        &[
            (dtype::F32, pp.cast(), vec![4]),
            arr(dtype::F32, &mut g, &[4]),
            (dtype::F32, vp.cast(), vec![4]),
            a,
            b,
            cc,
            d,
        ],
        &[
            (dtype::F32, pp.cast(), vec![4]),
            (dtype::F32, vp.cast(), vec![4]),
            arr(dtype::PRED, &mut ok, &[]),
        ],
        &[],
    );
    // SAFETY: a complete fake frame.
    assert!(take_error(unsafe { lomo_xla_adalomo_update(&mut *c.frame) }).is_none());
    assert_eq!(ok, [1]);
    // t = 1: β = 0, v = g² + eps1 = 4, u = g / 2 = 1, RMS(u) = 1 (no clip),
    // step = lr · max(eps2, RMS(p) = 0.5) = 0.05 → p = 0.45.
    assert_eq!(v, vec![4.0; 4]);
    assert_eq!(p, vec![0.45; 4]);
    // SAFETY: the frame reads `h.step` through a pointer; write it where the frame looks.
    unsafe { std::ptr::write_volatile(&mut h.step, 0) };
    // SAFETY: as above.
    let e = take_error(unsafe { lomo_xla_adalomo_update(&mut *c.frame) }).unwrap();
    assert_eq!(e.code, XLA_FFI_ERROR_INVALID_ARGUMENT);
    assert!(e.message.contains("step must be >= 1"), "{}", e.message);
    assert_eq!(p, vec![0.45; 4], "a failed call changes nothing");
}

#[test]
fn checks_attributes_dtypes_and_counts() {
    let (mut p, mut g, mut i32s, mut ok) = (vec![1f32; 6], vec![1f32; 6], vec![1i32; 6], [0u8]);
    let mut h = hyper(0.1, 1);
    let cases: Vec<(Vec<Arr>, Vec<(&'static str, f64)>, &str)> = vec![
        (
            vec![
                arr(dtype::F32, &mut p, &[2, 3]),
                arr(dtype::F32, &mut g, &[3, 2]),
            ],
            vec![],
            "grad shape must equal the parameter's: param f32[2,3], grad f32[3,2]",
        ),
        (
            vec![
                arr(dtype::F32, &mut p, &[2, 3]),
                arr(dtype::S32, &mut i32s, &[2, 3]),
            ],
            vec![],
            "grad must be f32, f16 or bf16, got s32[2,3]",
        ),
        (
            vec![
                arr(dtype::F32, &mut p, &[2, 3]),
                arr(dtype::F32, &mut g, &[2, 3]),
            ],
            vec![("weight_dacay", 0.1)],
            "unknown attribute(s) [\"weight_dacay\"]",
        ),
        (
            vec![
                arr(dtype::F32, &mut p, &[2, 3]),
                arr(dtype::F32, &mut g, &[2, 3]),
            ],
            vec![("weight_decay", -1.0)],
            "weight_decay must be finite and >= 0",
        ),
        (
            vec![
                arr(dtype::F32, &mut p, &[2, 3]),
                arr(dtype::F32, &mut g, &[2, 3]),
            ],
            vec![("param_id", 1.5)],
            "attribute 'param_id' must be an integer",
        ),
    ];
    for (mut args, attrs, want) in cases {
        let [a, b, cc, d] = h.arrs();
        args.extend([a, b, cc, d]);
        let rets = [
            arr(dtype::F32, &mut p, &[2, 3]),
            arr(dtype::PRED, &mut ok, &[]),
        ];
        let mut c = call(&args, &rets, &attrs);
        // SAFETY: a complete fake frame.
        let e = take_error(unsafe { lomo_xla_lomo_update(&mut *c.frame) }).unwrap();
        assert_eq!(e.code, XLA_FFI_ERROR_INVALID_ARGUMENT);
        assert!(e.message.contains(want), "{} (wanted {want})", e.message);
    }
    let mut c = call(&[arr(dtype::F32, &mut p, &[2, 3])], &[], &[]);
    // SAFETY: a complete fake frame.
    let e = take_error(unsafe { lomo_xla_lomo_update(&mut *c.frame) }).unwrap();
    assert!(
        e.message.contains("expected 6 operands and 2 results"),
        "{}",
        e.message
    );
}

#[test]
fn panics_become_internal_errors() {
    let mut c = call(&[], &[], &[]);
    // SAFETY: a complete fake frame.
    let e = take_error(unsafe {
        boundary(&mut *c.frame, "test_op", |_| -> Result<(), XlaError> {
            panic!("boom")
        })
    })
    .unwrap();
    assert_eq!(e.code, XLA_FFI_ERROR_INTERNAL);
    assert_eq!(e.message, "panic in test_op: boom");
}

/// Without a CUDA driver (this test binary never sets LOMO_CUDA_EMULATE) the CUDA handlers read
/// XLA's stream, then fail with an error that says what is missing; nothing panics. Where a
/// driver is present the host buffers here are not device memory, which is an error too. The
/// emulated runs are in tests/xla_cuda_emulated.rs.
#[test]
fn cuda_handlers_read_the_stream_then_report_no_driver() {
    let mut g = vec![1f32; 3];
    let (mut scale, mut sum, mut coef, mut ok) = (1f32, 0f32, 0f32, [0u8]);
    let mut c = call(
        &[
            (dtype::F32, (&mut scale as *mut f32).cast(), vec![]),
            arr(dtype::F32, &mut g, &[3]),
        ],
        &[
            (dtype::F32, (&mut sum as *mut f32).cast(), vec![]),
            (dtype::F32, (&mut coef as *mut f32).cast(), vec![]),
            arr(dtype::PRED, &mut ok, &[]),
        ],
        &[],
    );
    STREAM_CTX.with(|c| c.set(0));
    // SAFETY: a complete fake frame.
    let e = take_error(unsafe { lomo_xla_grad_sum_sq_cuda(&mut *c.frame) }).unwrap();
    assert_eq!(STREAM_CTX.with(|c| c.get()), 0xc7c);
    assert!(
        e.message.starts_with("lomo grad_sum_sq (CUDA platform): "),
        "{}",
        e.message
    );
    if !crate::backend::cuda::side::available() {
        assert_eq!(e.code, XLA_FFI_ERROR_UNIMPLEMENTED);
        assert!(e.message.contains("no CUDA driver"), "{}", e.message);
    }
    assert_eq!((sum, coef, ok), (0.0, 0.0, [0]), "nothing was written");
    // The Host handler computes on the same frame.
    // SAFETY: as above.
    assert!(take_error(unsafe { lomo_xla_grad_sum_sq(&mut *c.frame) }).is_none());
    assert_eq!((sum, coef, ok), (3.0, 1.0, [1]));
}

#[test]
fn split_phase_cuda_targets_refuse_with_unimplemented() {
    for handler in [
        split_norm::lomo_xla_norm_partials_cuda,
        split_norm::lomo_xla_norm_finish_cuda,
        split_norm::lomo_xla_lomo_piece_stats_cuda,
        split_norm::lomo_xla_lomo_piece_apply_cuda,
        split_norm::lomo_xla_adalomo_piece_stats_cuda,
        split_norm::lomo_xla_adalomo_piece_apply_cuda,
    ] {
        let mut c = call(&[], &[], &[]);
        // SAFETY: a complete fake frame.
        let e = take_error(unsafe { handler(&mut *c.frame) }).expect("an error");
        assert_eq!(e.code, XLA_FFI_ERROR_UNIMPLEMENTED);
        assert!(e.message.contains("CPU only"), "{}", e.message);
    }
}

#[test]
fn norm_split_phase_equals_grad_sum_sq() {
    // Two gradients; the record of each, summed as a psum over two halves would, then the
    // decision: equal to grad_sum_sq over the whole gradients.
    let g0: Vec<f32> = (0..12).map(|i| (i as f32 - 5.0) / 8.0).collect();
    let g1: Vec<f32> = (0..6).map(|i| (i as f32) / 4.0).collect();
    let mut scale = 2.0f32;
    let sp = |v: &mut f32| (dtype::F32, (v as *mut f32).cast(), vec![]);
    let (mut s_ref, mut c_ref, mut f_ref) = (0f32, 0f32, 0u8);
    {
        let (mut a, mut b) = (g0.clone(), g1.clone());
        let mut c = call(
            &[
                sp(&mut scale),
                arr(dtype::F32, &mut a, &[12]),
                arr(dtype::F32, &mut b, &[6]),
            ],
            &[
                sp(&mut s_ref),
                sp(&mut c_ref),
                (dtype::PRED, (&mut f_ref as *mut u8).cast(), vec![]),
            ],
            &[("clip_grad_norm", 0.5)],
        );
        // SAFETY: a complete fake frame.
        assert!(take_error(unsafe { lomo_xla_grad_sum_sq(&mut *c.frame) }).is_none());
    }
    let mut total = [0f64; 4];
    for half in 0..2 {
        let (mut a, mut b) = (
            g0[half * 6..half * 6 + 6].to_vec(),
            g1[half * 3..half * 3 + 3].to_vec(),
        );
        let mut rec = [0f64; 4];
        let mut c = call(
            &[
                sp(&mut scale),
                arr(dtype::F32, &mut a, &[6]),
                arr(dtype::F32, &mut b, &[3]),
            ],
            &[(dtype::F64, rec.as_mut_ptr().cast(), vec![2, 2])],
            &[],
        );
        // SAFETY: a complete fake frame.
        let e = take_error(unsafe { split_norm::lomo_xla_norm_partials(&mut *c.frame) });
        assert!(e.is_none(), "{}", e.unwrap().message);
        for (t, r) in total.iter_mut().zip(rec) {
            *t += r;
        }
    }
    let (mut s, mut coef, mut fin) = (0f32, 0f32, 0u8);
    let mut c = call(
        &[(dtype::F64, total.as_mut_ptr().cast(), vec![2, 2])],
        &[
            sp(&mut s),
            sp(&mut coef),
            (dtype::PRED, (&mut fin as *mut u8).cast(), vec![]),
        ],
        &[("clip_grad_norm", 0.5)],
    );
    // SAFETY: a complete fake frame.
    let e = take_error(unsafe { split_norm::lomo_xla_norm_finish(&mut *c.frame) });
    assert!(e.is_none(), "{}", e.unwrap().message);
    assert_eq!((s, coef, fin), (s_ref, c_ref, f_ref));
    assert_eq!(fin, 1);
    assert!(coef < 1.0);
}
