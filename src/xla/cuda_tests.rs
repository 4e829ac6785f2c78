//! The CUDA-platform update handlers under the host emulation of the kernels (the sources a GPU
//! runs, host memory standing in for device memory; `side::emulate_on_this_thread`) against the
//! Host-platform handlers on the same inputs (grad_sum_sq: `cuda_norm_tests.rs`): LOMO and
//! AdaLomo for every
//! parameter/gradient dtype pair, factored and vector state, shapes 1, 31, 4097, 3×4097, 3×5×7,
//! 16×64 and 2×8192, the options, non-finite clip_coef (skip) and gradients (finite = false),
//! aliased and separate results. Tolerances as in tests/cuda_emulated_parity.rs: parameters per
//! element 2e-6 relative (f32) or 1 ulp (f16/bf16) with 1e-7 absolute slack, state 1e-6
//! relative (see [`STATE_RTOL`]); NaN never passes. Separate results are poisoned (all-ones
//! bytes: NaN) before each run, and their operands must come back unchanged.

use std::ffi::c_void;

use super::abi::*;
use super::testing::*;
use super::*;
use crate::dtype::DType;

/// Relative tolerance of AdaLomo's state. 2e-5 where tests/cuda_emulated_parity.rs has 1e-5: the
/// Host (CPU backend) sums a row in 8 f32 lanes, 1024 terms each for the 2×8192 shape, and with
/// `clip_grad_value = 0.01` (most terms equal) its row state is 1.1e-5 off an f64 reference,
/// while the kernels' (32 terms per thread, then a tree) are within 1.1e-7 (measured).
const STATE_RTOL: f64 = 1e-6;

// ---- lomo_update / adalomo_update --------------------------------------------------------------

/// The per-step operands.
#[derive(Clone, Copy, Debug)]
struct Scal {
    lr: f32,
    scale: f32,
    coef: f32,
    step: i64,
    step_dtype: i32,
}

const SCAL: Scal = Scal {
    lr: 0.01,
    scale: 1.0,
    coef: 1.0,
    step: 3,
    step_dtype: dtype::S32,
};

impl Scal {
    fn mems(&self) -> Vec<Mem> {
        let step = match self.step_dtype {
            dtype::S32 => (self.step as i32).to_ne_bytes().to_vec(),
            dtype::S64 => self.step.to_ne_bytes().to_vec(),
            dtype::U32 => (self.step as u32).to_ne_bytes().to_vec(),
            _ => (self.step as u64).to_ne_bytes().to_vec(),
        };
        vec![
            Mem::encode(DType::F32, &[self.lr]),
            Mem::encode(DType::F32, &[self.scale]),
            Mem::encode(DType::F32, &[self.coef]),
            Mem::from_bytes(&step),
        ]
    }
}

#[derive(Clone, Debug)]
struct Upd {
    ada: bool,
    p: DType,
    g: DType,
    shape: &'static [i64],
    scal: Scal,
    attrs: Vec<(&'static str, Attr)>,
    aliased: bool,
    /// A value placed at the gradient's middle element.
    inject: Option<f32>,
    /// The gradient is the parameter's (aliased) buffer.
    grad_is_param: bool,
    /// State of earlier steps (positive values) instead of zeros.
    warm_state: bool,
}

fn upd(ada: bool, p: DType, g: DType, shape: &'static [i64]) -> Upd {
    Upd {
        ada,
        p,
        g,
        shape,
        scal: SCAL,
        attrs: vec![],
        aliased: true,
        inject: None,
        grad_is_param: false,
        warm_state: false,
    }
}

/// What one run left behind: the error, `finite`, and the operand and result bytes.
struct Out {
    err: Option<Recorded>,
    finite: u8,
    /// (operand before, operand after, result after) for p and each state array.
    arrays: Vec<(Vec<u8>, Vec<u8>, Vec<u8>)>,
}

fn state_dims(u: &Upd) -> Vec<Vec<i64>> {
    if !u.ada {
        return vec![];
    }
    let (lead, last) = u.shape.split_at(u.shape.len() - 1);
    if u.shape.len() >= 2 {
        vec![vec![lead.iter().product()], last.to_vec()]
    } else {
        vec![u.shape.to_vec()]
    }
}

fn run_update(u: &Upd, cuda: bool) -> Out {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d ^ u.shape.iter().sum::<i64>() as u64);
    let n: usize = u.shape.iter().product::<i64>() as usize;
    let dims = u.shape.to_vec();
    let mut g_vals = rng.vec(n, 0.5 * u.scal.scale);
    if let Some(x) = u.inject {
        g_vals[n / 2] = x;
    }
    // Operands: p, then each state array (f32).
    let mut ins = vec![Mem::encode(u.p, &rng.vec(n, 1.0))];
    let sdims = state_dims(u);
    for d in &sdims {
        let m = d.iter().product::<i64>() as usize;
        let v: Vec<f32> = if u.warm_state {
            rng.vec(m, 1.0).iter().map(|x| x.abs() + 0.05).collect()
        } else {
            vec![0.0; m]
        };
        ins.push(Mem::encode(DType::F32, &v));
    }
    let before: Vec<Vec<u8>> = ins.iter().map(|m| m.bytes().to_vec()).collect();
    let mut outs: Vec<Mem> = if u.aliased {
        vec![]
    } else {
        ins.iter().map(|m| Mem::filled(m.bytes, u64::MAX)).collect()
    };
    let mut g = Mem::encode(u.g, &g_vals);
    let mut scal = u.scal.mems();
    let mut ok = Mem::filled(1, u64::MAX);
    let mut all_dims = vec![dims.clone()];
    all_dims.extend(sdims.iter().cloned());
    let codes: Vec<i32> = std::iter::once(code(u.p))
        .chain(sdims.iter().map(|_| dtype::F32))
        .collect();
    let in_ptrs: Vec<*mut c_void> = ins.iter_mut().map(Mem::ptr).collect();
    let out_ptrs: Vec<*mut c_void> = if u.aliased {
        in_ptrs.clone()
    } else {
        outs.iter_mut().map(Mem::ptr).collect()
    };
    let g_ptr = if u.grad_is_param {
        out_ptrs[0]
    } else {
        g.ptr()
    };
    let mut args: Vec<Arr> = vec![(code(u.p), in_ptrs[0], dims.clone())];
    args.push((code(u.g), g_ptr, dims.clone()));
    for i in 1..in_ptrs.len() {
        args.push((codes[i], in_ptrs[i], all_dims[i].clone()));
    }
    let scal_codes = [dtype::F32, dtype::F32, dtype::F32, u.scal.step_dtype];
    for (m, c) in scal.iter_mut().zip(scal_codes) {
        args.push((c, m.ptr(), vec![]));
    }
    let mut rets: Vec<Arr> = (0..out_ptrs.len())
        .map(|i| (codes[i], out_ptrs[i], all_dims[i].clone()))
        .collect();
    rets.push((dtype::PRED, ok.ptr(), vec![]));
    let mut c = call_with(&args, &rets, &u.attrs);
    let handler = match (u.ada, cuda) {
        (false, false) => lomo_xla_lomo_update,
        (false, true) => lomo_xla_lomo_update_cuda,
        (true, false) => lomo_xla_adalomo_update,
        (true, true) => lomo_xla_adalomo_update_cuda,
    };
    let err = invoke(&mut c, handler, cuda);
    let arrays = (0..ins.len())
        .map(|i| {
            let result = if u.aliased { &ins[i] } else { &outs[i] };
            (
                before[i].clone(),
                ins[i].bytes().to_vec(),
                result.bytes().to_vec(),
            )
        })
        .collect();
    Out {
        err,
        finite: ok.bytes()[0],
        arrays,
    }
}

/// Runs both platforms and compares; returns `finite`.
fn check_update(u: &Upd) -> bool {
    let host = run_update(u, false);
    let dev = run_update(u, true);
    let what = format!("{u:?}");
    if let Some(e) = &dev.err {
        panic!("{what}: CUDA handler failed: {}", e.message);
    }
    if !u.aliased {
        for (i, (before, after, _)) in dev.arrays.iter().enumerate() {
            assert!(before == after, "{what}: operand {i} changed (cuda)");
        }
    }
    if dev.finite == 0 {
        for (i, (before, _, result)) in dev.arrays.iter().enumerate() {
            assert!(
                before == result,
                "{what}: result {i} was written in a skipped step"
            );
        }
    }
    if let Some(e) = &host.err {
        // An argument error on the Host; the device cannot raise it without synchronizing.
        assert_eq!(
            e.code, XLA_FFI_ERROR_INVALID_ARGUMENT,
            "{what}: {}",
            e.message
        );
        assert_eq!(dev.finite, 0, "{what}: skipped on the device");
        return false;
    }
    assert!(host.finite <= 1, "{what}: host finite {}", host.finite);
    assert_eq!(host.finite, dev.finite, "{what}: finite");
    for (i, ((_, h_after, h), (_, _, d))) in host.arrays.iter().zip(&dev.arrays).enumerate() {
        if !u.aliased {
            assert!(
                host.arrays[i].0 == *h_after,
                "{what}: operand {i} changed (host)"
            );
        }
        let dtype = if i == 0 { u.p } else { DType::F32 };
        let (hv, dv) = (
            Mem::from_bytes(h).decode(dtype),
            Mem::from_bytes(d).decode(dtype),
        );
        if i == 0 && dtype != DType::F32 {
            // One ulp per element is the tolerance, but f16/bf16 results must almost all be
            // identical: the elementwise arithmetic is the same and the stochastic-rounding
            // words come from the same Philox stream (a wrong step or seed would flip half).
            let same = hv.iter().zip(&dv).filter(|(x, y)| x == y).count();
            assert!(
                same * 100 >= hv.len() * 95,
                "{what}: only {same} of {} elements identical",
                hv.len()
            );
        }
        for (k, (x, y)) in hv.iter().zip(&dv).enumerate() {
            let ok = if i == 0 {
                close(dtype, *x, *y)
            } else {
                rel_close(*x, *y, STATE_RTOL)
            };
            assert!(ok, "{what}: array {i} element {k}: host {x} cuda {y}");
        }
    }
    host.finite == 1
}

fn all_pairs(ada: bool, warm: bool) {
    for p in DTYPES {
        for g in DTYPES {
            for (i, shape) in SHAPES.iter().enumerate() {
                let u = Upd {
                    aliased: i % 2 == 0,
                    warm_state: warm,
                    scal: Scal {
                        step: if warm { 4 } else { 1 },
                        ..SCAL
                    },
                    ..upd(ada, p, g, shape)
                };
                assert!(check_update(&u), "{u:?}: finite");
                assert!(check_update(&Upd {
                    aliased: !u.aliased,
                    ..u
                }));
            }
        }
    }
}

fn options(ada: bool) {
    use Attr::{F64, S64};
    let mut sets: Vec<Vec<(&'static str, Attr)>> = vec![
        vec![
            ("weight_decay", F64(0.1)),
            ("clip_grad_value", F64(0.01)),
            ("lr_multiplier", F64(0.5)),
        ],
        vec![
            ("rounding", S64(1)),
            ("seed", S64(1234)),
            ("param_id", S64(7)),
            ("weight_decay", F64(0.05)),
        ],
    ];
    if ada {
        sets.push(vec![
            ("eps1", F64(1e-3)),
            ("eps2", F64(10.0)),
            ("clip_threshold", F64(0.5)),
            ("decay_rate", F64(-0.5)),
            ("weight_decay", F64(0.2)),
        ]);
    }
    let scals = [
        SCAL,
        Scal {
            lr: 0.05,
            scale: 1024.0,
            coef: 0.5,
            step: 1000,
            step_dtype: dtype::S64,
        },
        Scal {
            step: 7,
            step_dtype: dtype::U32,
            ..SCAL
        },
        Scal {
            step: 2,
            step_dtype: dtype::U64,
            coef: 0.25,
            ..SCAL
        },
    ];
    for (p, g) in [
        (DType::F32, DType::F32),
        (DType::Bf16, DType::Bf16),
        (DType::F16, DType::F32),
    ] {
        for (k, attrs) in sets.iter().enumerate() {
            for (j, scal) in scals.iter().enumerate() {
                for (i, shape) in SHAPES.iter().enumerate() {
                    let u = Upd {
                        attrs: attrs.clone(),
                        scal: *scal,
                        aliased: (i + j + k) % 2 == 0,
                        warm_state: j > 0,
                        ..upd(ada, p, g, shape)
                    };
                    assert!(check_update(&u), "{u:?}: finite");
                }
            }
        }
    }
}

/// Skipped steps (finite = false, nothing written): a non-finite clip_coef, a non-finite
/// gradient element, and the Host's argument errors.
fn skips(ada: bool) {
    let bad_scalars = [
        Scal {
            coef: f32::NAN,
            ..SCAL
        },
        Scal {
            coef: f32::INFINITY,
            ..SCAL
        },
        Scal { lr: -1.0, ..SCAL },
        Scal {
            lr: f32::NAN,
            ..SCAL
        },
        Scal { scale: 0.0, ..SCAL },
        Scal { coef: -1.0, ..SCAL },
        Scal { step: 0, ..SCAL },
        Scal {
            step: -3,
            step_dtype: dtype::S64,
            ..SCAL
        },
        Scal {
            step: 0,
            step_dtype: dtype::U64,
            ..SCAL
        },
    ];
    for (p, g) in [(DType::F32, DType::F32), (DType::Bf16, DType::F16)] {
        for (i, shape) in SHAPES.iter().enumerate() {
            for (j, scal) in bad_scalars.iter().enumerate() {
                let u = Upd {
                    scal: *scal,
                    aliased: (i + j) % 2 == 0,
                    warm_state: true,
                    ..upd(ada, p, g, shape)
                };
                assert!(!check_update(&u), "{u:?}: skipped");
            }
            for x in [f32::INFINITY, f32::NAN, f32::NEG_INFINITY] {
                let u = Upd {
                    inject: Some(x),
                    aliased: i % 2 == 1,
                    ..upd(ada, p, g, shape)
                };
                assert!(!check_update(&u), "{u:?}: overflow");
            }
        }
    }
}

#[test]
fn lomo_all_dtype_pairs() {
    all_pairs(false, false);
}

#[test]
fn lomo_options() {
    options(false);
}

#[test]
fn lomo_skips() {
    skips(false);
}

#[test]
fn adalomo_all_dtype_pairs() {
    all_pairs(true, false);
    all_pairs(true, true);
}

#[test]
fn adalomo_options() {
    options(true);
}

#[test]
fn adalomo_skips() {
    skips(true);
}

/// A gradient that is the parameter's own (aliased) buffer is copied before the update, as on
/// the Host.
#[test]
fn gradient_sharing_a_result_is_copied_first() {
    for ada in [false, true] {
        for d in DTYPES {
            for shape in SHAPES {
                let u = Upd {
                    grad_is_param: true,
                    warm_state: true,
                    ..upd(ada, d, d, shape)
                };
                assert!(check_update(&u), "{u:?}");
            }
        }
    }
}

/// After the first call on a stream, calls of the same shapes reuse pooled workspaces.
#[test]
fn steady_state_allocates_nothing() {
    use super::cuda_ws::pooled_on;
    let shape: &'static [i64] = &[3, 5, 7];
    for ada in [false, true] {
        let ctx = if ada { 0x51_0001 } else { 0x51_0002 };
        let stream = ctx ^ 0x5eed_0000;
        for round in 0..3 {
            let u = upd(ada, DType::F32, DType::Bf16, shape);
            let mut p = Mem::encode(DType::F32, &[0.5; 105]);
            let mut g = Mem::encode(DType::Bf16, &[0.25; 105]);
            let mut states: Vec<Mem> = state_dims(&u)
                .iter()
                .map(|d| Mem::encode(DType::F32, &vec![0.0; d.iter().product::<i64>() as usize]))
                .collect();
            let mut scal = SCAL.mems();
            let mut ok = Mem::filled(1, 0);
            let pp = p.ptr();
            let mut args: Vec<Arr> = vec![(dtype::F32, pp, shape.to_vec())];
            args.push((dtype::BF16, g.ptr(), shape.to_vec()));
            let mut rets: Vec<Arr> = vec![(dtype::F32, pp, shape.to_vec())];
            for (m, d) in states.iter_mut().zip(state_dims(&u)) {
                let sp = m.ptr();
                args.push((dtype::F32, sp, d.clone()));
                rets.push((dtype::F32, sp, d));
            }
            for (m, c) in scal
                .iter_mut()
                .zip([dtype::F32, dtype::F32, dtype::F32, dtype::S32])
            {
                args.push((c, m.ptr(), vec![]));
            }
            rets.push((dtype::PRED, ok.ptr(), vec![]));
            let mut c = call_with(&args, &rets, &[]);
            c.frame.ctx = ctx as *mut XLA_FFI_ExecutionContext;
            let handler = if ada {
                lomo_xla_adalomo_update_cuda
            } else {
                lomo_xla_lomo_update_cuda
            };
            assert!(invoke(&mut c, handler, true).is_none());
            assert_eq!(ok.bytes()[0], 1);
            assert_eq!(
                pooled_on(stream),
                1,
                "round {round}: one workspace for this stream"
            );
        }
    }
}
