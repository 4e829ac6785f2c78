//! The CUDA-platform `grad_sum_sq` handler under the host emulation of the kernels against the
//! Host handler on the same inputs (any number of gradients of mixed dtypes and shapes, loss
//! scales, clip thresholds, non-finite gradients, invalid loss scales; sum_sq within 2e-6 and
//! clip_coef within 1e-6 relative, NaN exactly where the Host has NaN), and the workspace pool
//! under concurrent calls.

use super::abi::*;
use super::testing::*;
use super::*;
use crate::backend::cuda::side;
use crate::dtype::DType;

struct NormCase {
    grads: Vec<(DType, &'static [i64])>,
    scale: f32,
    clip: f64,
    /// (gradient, value) placed at the gradient's middle element.
    inject: Option<(usize, f32)>,
}

/// (error, sum_sq, clip_coef, finite)
fn run_norm(nc: &NormCase, cuda: bool) -> (Option<Recorded>, f32, f32, u8) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut grads: Vec<Mem> = nc
        .grads
        .iter()
        .enumerate()
        .map(|(i, (d, shape))| {
            let n = shape.iter().product::<i64>() as usize;
            let mut v = rng.vec(n, 0.5 * nc.scale);
            if let Some((j, x)) = nc.inject {
                if i == j {
                    v[n / 2] = x;
                }
            }
            Mem::encode(*d, &v)
        })
        .collect();
    let mut scale = Mem::encode(DType::F32, &[nc.scale]);
    let (mut sum, mut coef, mut ok) = (
        Mem::filled(4, u64::MAX),
        Mem::filled(4, u64::MAX),
        Mem::filled(1, u64::MAX),
    );
    let mut args: Vec<Arr> = vec![(dtype::F32, scale.ptr(), vec![])];
    for (m, (d, shape)) in grads.iter_mut().zip(&nc.grads) {
        args.push((code(*d), m.ptr(), shape.to_vec()));
    }
    let rets: Vec<Arr> = vec![
        (dtype::F32, sum.ptr(), vec![]),
        (dtype::F32, coef.ptr(), vec![]),
        (dtype::PRED, ok.ptr(), vec![]),
    ];
    let mut c = call_with(&args, &rets, &[("clip_grad_norm", Attr::F64(nc.clip))]);
    let handler = if cuda {
        lomo_xla_grad_sum_sq_cuda
    } else {
        lomo_xla_grad_sum_sq
    };
    let err = invoke(&mut c, handler, cuda);
    (
        err,
        sum.decode(DType::F32)[0],
        coef.decode(DType::F32)[0],
        ok.bytes()[0],
    )
}

fn check_norm(nc: &NormCase) {
    let (he, hs, hc, hf) = run_norm(nc, false);
    let (de, ds, dc, df) = run_norm(nc, true);
    let what = format!(
        "grad_sum_sq {:?} scale {} clip {} inject {:?}",
        nc.grads, nc.scale, nc.clip, nc.inject
    );
    if let Some(e) = de {
        panic!("{what}: CUDA handler failed: {}", e.message);
    }
    if let Some(e) = he {
        // An argument error on the Host; the device cannot raise it without synchronizing.
        assert_eq!(
            e.code, XLA_FFI_ERROR_INVALID_ARGUMENT,
            "{what}: {}",
            e.message
        );
        assert!(
            ds.is_nan() && dc.is_nan() && df == 0,
            "{what}: {ds} {dc} {df}"
        );
        return;
    }
    assert!(hf <= 1, "{what}: host finite {hf}");
    assert_eq!(hf, df, "{what}: finite");
    if hf == 1 {
        assert!(
            rel_close(hs, ds, 2e-6),
            "{what}: sum_sq host {hs} cuda {ds}"
        );
        assert!(
            rel_close(hc, dc, 1e-6),
            "{what}: clip_coef host {hc} cuda {dc}"
        );
    } else {
        assert!(hs.is_nan() && hc.is_nan(), "{what}: host {hs} {hc}");
        assert!(ds.is_nan() && dc.is_nan(), "{what}: cuda {ds} {dc}");
    }
}

#[test]
fn grad_sum_sq_matches_the_host() {
    let mixed: Vec<(DType, &'static [i64])> = SHAPES
        .iter()
        .enumerate()
        .map(|(i, s)| (DTYPES[i % 3], *s))
        .collect();
    for d in DTYPES {
        let grads: Vec<(DType, &'static [i64])> = SHAPES.iter().map(|s| (d, *s)).collect();
        check_norm(&NormCase {
            grads,
            scale: 1.0,
            clip: 0.0,
            inject: None,
        });
    }
    for (scale, clip) in [(1.0, 1.0), (256.0, 0.5), (1024.0, 1e6), (4.0, 0.0)] {
        check_norm(&NormCase {
            grads: mixed.clone(),
            scale,
            clip,
            inject: None,
        });
    }
    for (i, x) in [(0, f32::INFINITY), (3, f32::NAN), (6, f32::NEG_INFINITY)] {
        check_norm(&NormCase {
            grads: mixed.clone(),
            scale: 8.0,
            clip: 1.0,
            inject: Some((i, x)),
        });
    }
    for grads in [vec![], vec![(DType::F32, &[0i64][..])]] {
        check_norm(&NormCase {
            grads,
            scale: 1.0,
            clip: 1.0,
            inject: None,
        });
    }
    for scale in [0.0, -1.0, f32::INFINITY, f32::NAN] {
        check_norm(&NormCase {
            grads: mixed.clone(),
            scale,
            clip: 1.0,
            inject: None,
        });
    }
}

/// Calls holding a workspace at the same time, on one stream or on two, never share one; both
/// go back to the pool.
#[test]
fn concurrent_calls_get_their_own_workspaces() {
    use super::cuda_ws::{pooled_on, Dev, Need, Pooled};
    let _emu = side::emulate_on_this_thread();
    let mut anchor = Mem::filled(8, 0);
    let dev = Dev::of(anchor.ptr(), "test").unwrap();
    let need = Need {
        tensors: 2,
        sizes: crate::backend::cuda::passes::Sizes {
            partials: 1024,
            ..Default::default()
        },
        scratch: 0,
    };
    let (s1, s2) = (0x7a_0001, 0x7a_0002);
    let a = Pooled::take(&dev, s1, need, "test").unwrap();
    let b = Pooled::take(&dev, s1, need, "test").unwrap();
    let c = Pooled::take(&dev, s2, need, "test").unwrap();
    let steps = [a.ws.step, b.ws.step, c.ws.step];
    assert!(steps[0] != steps[1] && steps[0] != steps[2] && steps[1] != steps[2]);
    drop((a, b, c));
    assert_eq!((pooled_on(s1), pooled_on(s2)), (2, 1));
    let again = Pooled::take(&dev, s2, need, "test").unwrap();
    assert_eq!(again.ws.step, steps[2], "the stream's workspace is reused");
}
