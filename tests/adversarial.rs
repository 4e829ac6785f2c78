//! Adversarial inputs against the independent f64 reference (tests/common/reference.rs), for
//! both algorithms, every parameter dtype and the vector and factored layouts (issue 13, kind 4):
//! zero rows and columns, all-zero gradients, subnormal parameters and gradients, the largest
//! finite values of each dtype, and huge and tiny learning rates.
//!
//! The rule checked: the optimizer never writes a non-finite value from finite inputs. A step
//! either is clean (no overflow reported, every value equal to the reference within one ulp of
//! the dtype plus f32 arithmetic) or reports an overflow, and then every element is either
//! unchanged or equal to the reference: a new value that would overflow the dtype keeps the old
//! one, and finite gradients whose f32 statistics or scalars overflow (|g| ≳ 1.8e19 squared,
//! Σp² of parameters near the f32 maximum) are refused whole, before anything changes. Inputs
//! whose reference stays representable and whose f32 arithmetic cannot overflow must be clean.

mod common;

use common::reference::*;
use common::*;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Family {
    ZeroRows,
    /// Zero-gradient rows next to rows of |g| = 1e12 (the row ratio underflows f32).
    ZeroRowsNextToLarge,
    ZeroCols,
    AllZero,
    Subnormal,
    LargestParams,
    LargestGrads,
    HugeLr,
    TinyLr,
}

/// Whether step `step` of the family must be clean for this parameter dtype and algorithm.
fn must_be_clean(f: Family, algorithm: u32, pdtype: u32, step: u64) -> bool {
    match f {
        Family::ZeroRows | Family::ZeroCols | Family::AllZero | Family::Subnormal => true,
        // AdaLomo normalises the update; LOMO's lr·g of 5e10 overflows f16 only.
        Family::ZeroRowsNextToLarge => algorithm == 1 || pdtype != F16,
        Family::TinyLr => true,
        // lr·g of 1e30·0.3: representable in f32 and bf16, not in f16. AdaLomo's second step
        // squares parameters of ~1e29 for RMS(p), which overflows its f32 sum: refused.
        Family::HugeLr => pdtype != F16 && (algorithm == 0 || step == 1),
        // Parameters at the dtype's maximum: LOMO's small step stays representable (it rounds
        // back to the maximum at worst); AdaLomo's relative step is lr·RMS(p), which pushes
        // some of them past it, and Σp² of f32/bf16 maxima overflows f32.
        Family::LargestParams => algorithm == 0,
        // Gradients at the dtype's maximum: LOMO's lr·g stays representable in f32 and bf16;
        // AdaLomo's g² overflows f32 unless the gradient is f16.
        Family::LargestGrads => false,
    }
}

fn max_of(dtype: u32) -> f32 {
    match dtype {
        F32 => f32::MAX,
        F16 => 65504.0,
        _ => half::bf16::MAX.to_f32(),
    }
}

/// The smallest positive subnormal values of `dtype` as f32 (both signs, and zeros).
fn tiny(dtype: u32, i: usize) -> f32 {
    let v = match dtype {
        F32 => f32::from_bits(1 + (i as u32 * 7919) % 0x7f_ffff),
        F16 => half::f16::from_bits(1 + (i as u16 * 31) % 0x3ff).to_f32(),
        _ => half::bf16::from_bits(1 + (i as u16 * 13) % 0x7f).to_f32(),
    };
    [v, -v, 0.0][i % 3]
}

/// (parameters, gradient, lr) of one step of `family` for a tensor of `shape`.
fn inputs(
    family: Family,
    shape: &[i64],
    pdtype: u32,
    gdtype: u32,
    rng: &mut Rng,
) -> (Vec<f32>, Vec<f32>, f32) {
    let (rows, cols, _) = view(shape);
    let n = rows * cols;
    let mut p: Vec<f32> = rng.vec(n, 0.5);
    let mut g: Vec<f32> = rng.vec(n, 0.3);
    let mut lr = 0.05f32;
    match family {
        Family::ZeroRows => (0..n)
            .filter(|e| (e / cols) % 3 == 0)
            .for_each(|e| g[e] = 0.0),
        Family::ZeroRowsNextToLarge => {
            let big = 1e12f32.min(max_of(gdtype) / 2.0);
            (0..n).for_each(|e| {
                g[e] = if (e / cols) % 3 == 0 {
                    0.0
                } else {
                    g[e].signum() * big
                }
            });
        }
        Family::ZeroCols => (0..n)
            .filter(|e| (e % cols) % 2 == 1)
            .for_each(|e| g[e] = 0.0),
        Family::AllZero => g.iter_mut().for_each(|v| *v = 0.0),
        Family::Subnormal => {
            (0..n).for_each(|e| p[e] = tiny(pdtype, e));
            (0..n).for_each(|e| g[e] = tiny(gdtype, e + 1));
        }
        Family::LargestParams => {
            let m = max_of(pdtype);
            (0..n)
                .step_by(2)
                .for_each(|e| p[e] = if e % 4 == 0 { m } else { -m });
        }
        Family::LargestGrads => {
            let m = max_of(gdtype);
            (0..n)
                .step_by(2)
                .for_each(|e| g[e] = if e % 4 == 0 { m } else { -m });
        }
        Family::HugeLr => lr = 1e30,
        Family::TinyLr => lr = 1e-30,
    }
    let p = p.iter().map(|&v| Buf::round(pdtype, v)).collect();
    let g = g.iter().map(|&v| Buf::round(gdtype, v)).collect();
    (p, g, lr)
}

/// Whether `got` equals the f64 reference `want` (see tests/common/reference.rs).
fn matches(pdtype: u32, got: f32, want: f64, before: f32) -> bool {
    let rounded = Buf::round(pdtype, want as f32);
    if !rounded.is_finite() {
        return false;
    }
    let delta = (want - before as f64).abs();
    let ulp = if pdtype == F32 {
        (1e-6 * want.abs()).max(f32::from_bits(1) as f64)
    } else {
        (rounded as f64 - want).abs().max(ulp_of(pdtype, want))
    };
    (got as f64 - want).abs() <= ulp + 1e-5 * delta + 1e-12
}

/// Two steps on one optimizer (AdaLomo's moving averages advance): the first from the
/// family's parameters, the second from the first's result with new gradients.
fn run(algorithm: u32, pdtype: u32, gdtype: u32, shape: &[i64], family: Family, seed: u64) {
    let mut cfg = config(algorithm);
    cfg.loss_scale_mode = 0;
    let opt = Opt::new(&cfg).unwrap();
    let mut rng = Rng::new(seed);
    let (rows, cols, factored) = view(shape);
    let (vals, _, _) = inputs(family, shape, pdtype, gdtype, &mut rng);
    let mut p = Buf::new(pdtype, &vals);
    let id = opt.register("p", p.ptr(), pdtype, shape, 0).unwrap();
    let mut states = vec![if factored {
        RefState::Factored(vec![0.0; rows], vec![0.0; cols])
    } else {
        RefState::Vector(vec![0.0; rows * cols])
    }];
    let c = Case {
        algorithm,
        pdtype,
        gdtype,
        clip_norm: 0.0,
        clip_value: 0.0,
        wd: 0.0,
        scale: 0.0,
        carry: false,
        pscale: 1.0,
    };
    let what = format!("{family:?} alg {algorithm} p {pdtype} g {gdtype} {shape:?}");
    for step in 1..=2u64 {
        let (_, grad, lr) = inputs(family, shape, pdtype, gdtype, &mut rng);
        let before = p.values();
        let want = reference_step(
            &c,
            &[shape.to_vec()],
            std::slice::from_ref(&before),
            std::slice::from_ref(&grad),
            &mut states,
            lr as f64,
            step,
        );
        let mut g = Buf::new(gdtype, &grad);
        opt.begin(1, lr).unwrap();
        opt.submit(id, g.ptr(), gdtype).unwrap();
        opt.end().unwrap();
        let info = opt.info();
        let got = p.values();
        assert!(
            got.iter().all(|v| v.is_finite()),
            "{what} step {step}: a non-finite value was written"
        );
        let clean = info.overflow == 0;
        if must_be_clean(family, algorithm, pdtype, step) {
            assert!(
                clean,
                "{what} step {step}: expected a clean step, overflow reported"
            );
        }
        for (i, (&gv, &w)) in got.iter().zip(&want[0]).enumerate() {
            let ok = matches(pdtype, gv, w, before[i]);
            if clean {
                assert!(
                    ok,
                    "{what} step {step} [{i}]: got {gv:e}, want {w:e} (before {:e})",
                    before[i]
                );
            } else {
                assert!(
                    ok || gv.to_bits() == before[i].to_bits(),
                    "{what} step {step} [{i}]: overflow reported, but {gv:e} is neither the \
                     old value {:e} nor the reference {w:e}",
                    before[i]
                );
            }
            if !Buf::round(pdtype, w as f32).is_finite() {
                assert!(
                    !clean,
                    "{what} step {step} [{i}]: the reference overflows, step clean"
                );
            }
        }
        if !clean {
            break; // the library refused (part of) the step: the reference state moved on
        }
    }
}

#[test]
fn adversarial_inputs_never_write_non_finite_values_and_match_the_reference() {
    let families = [
        Family::ZeroRows,
        Family::ZeroRowsNextToLarge,
        Family::ZeroCols,
        Family::AllZero,
        Family::Subnormal,
        Family::LargestParams,
        Family::LargestGrads,
        Family::HugeLr,
        Family::TinyLr,
    ];
    let shapes: [&[i64]; 6] = [&[16], &[8, 16], &[2, 3, 5], &[1, 1], &[5, 1], &[3, 2049]];
    let mut seed = 1;
    for family in families {
        for algorithm in [0u32, 1] {
            for pdtype in [F32, F16, BF16] {
                for gdtype in [F32, pdtype] {
                    for shape in shapes {
                        run(algorithm, pdtype, gdtype, shape, family, seed);
                        seed += 1;
                    }
                }
            }
        }
    }
}
