//! The CPU backend's results do not depend on the caller's floating-point modes: with
//! flush-to-zero and denormals-are-zero set on the calling thread — as XLA's CPU runtime,
//! `-ffast-math` programs and `torch.set_flush_denormal(True)` set them — and on the library's
//! thread pool (created here, under those modes, so its threads inherit them), steps on
//! parameters in the subnormal range of their dtype match the f64 reference and exact values.
//!
//! One test in its own binary: the pool is created by the first step of this process, after
//! the modes are set.

mod common;

use common::reference::*;
use common::*;

/// Sets (`on`) or clears flush-to-zero and denormals-are-zero on this thread.
#[cfg(target_arch = "x86_64")]
fn flush_modes(on: bool) {
    let mut csr: u32 = 0;
    // SAFETY: STMXCSR/LDMXCSR on a local; only DAZ (bit 6) and FTZ (bit 15) change.
    unsafe {
        std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr as *mut u32);
        let bits = (1 << 6) | (1 << 15);
        csr = if on { csr | bits } else { csr & !bits };
        std::arch::asm!("ldmxcsr [{}]", in(reg) &csr as *const u32);
    }
}

#[cfg(target_arch = "aarch64")]
fn flush_modes(on: bool) {
    // SAFETY: FPCR read-modify-write at EL0; only FZ (bit 24) and FZ16 (bit 19) change.
    unsafe {
        let mut v: u64;
        std::arch::asm!("mrs {}, fpcr", out(reg) v);
        let bits = (1 << 24) | (1 << 19);
        v = if on { v | bits } else { v & !bits };
        std::arch::asm!("msr fpcr, {}", in(reg) v);
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn flush_modes(_: bool) {}

/// Runs the test's own arithmetic (inputs and expected values) in IEEE mode, so that the
/// reference itself is not flushed; the library is called with the modes set.
fn unflushed<R>(f: impl FnOnce() -> R) -> R {
    flush_modes(false);
    let r = f();
    flush_modes(true);
    r
}

/// Whether this thread flushes: 2^-135 · 0.5 is the subnormal 2^-136, or 0 when flushing.
#[inline(never)]
fn flushing() -> bool {
    std::hint::black_box(f32::from_bits(1 << 14)) * std::hint::black_box(0.5f32) == 0.0
}

/// Subnormal values of `dtype` (f32: k·2^-149, bf16: m·2^-133), both signs, and zeros.
fn subnormals(dtype: u32, n: usize, rng: &mut Rng) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let u = (rng.normal().abs() * 1e6) as u32;
            let bits = if dtype == BF16 {
                (u % 0x7f + 1) << 16
            } else {
                u % 0x7f_ffff + 1
            };
            let v = f32::from_bits(bits);
            match i % 3 {
                0 => v,
                1 => -v,
                _ => 0.0,
            }
        })
        .collect()
}

/// LOMO with lr = 0.5, weight decay 0.5 (decay exactly 0.75) on f32 / bf16 parameters that are
/// subnormal, with subnormal f32 gradients: p ← round(round_f32(p·0.75) − 0.5·g), where both
/// products are exact in f64 and each `as f32` is one IEEE rounding (round_f32(p·0.75) is the
/// f32 product p·decay; fma(x, −lr, ·) rounds once).
fn lomo_on_subnormals(pdtype: u32, n: usize, seed: u64) {
    let (before, g, want) = unflushed(|| {
        let mut rng = Rng::new(seed);
        let before = subnormals(pdtype, n, &mut rng);
        let g = subnormals(F32, n, &mut rng);
        let want: Vec<f32> = before
            .iter()
            .zip(&g)
            .map(|(&p0, &g0)| {
                let decayed = (p0 as f64 * 0.75) as f32;
                Buf::round(pdtype, (decayed as f64 - 0.5 * g0 as f64) as f32)
            })
            .collect();
        (before, g, want)
    });
    let mut cfg = config(0);
    cfg.weight_decay = 0.5;
    let opt = Opt::new(&cfg).unwrap();
    let mut p = unflushed(|| Buf::new(pdtype, &before));
    let mut gb = unflushed(|| Buf::new(F32, &g));
    let id = opt.register("p", p.ptr(), pdtype, &[n as i64], 0).unwrap();
    opt.begin(1, 0.5).unwrap();
    opt.submit(id, gb.ptr(), F32).unwrap();
    opt.end().unwrap();
    let got = unflushed(|| p.values());
    for (i, (&got, &want)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            got.to_bits(),
            want.to_bits(),
            "dtype {pdtype} n {n} [{i}]: p {:e}, g {:e}: got {got:e}, want {want:e}",
            before[i],
            g[i]
        );
    }
}

#[test]
fn results_do_not_depend_on_the_callers_flush_to_zero_modes() {
    flush_modes(true);
    if !flushing() {
        eprintln!("SKIP: this architecture has no flush-to-zero mode to test against");
        return;
    }
    // f32 and bf16 parameters in their subnormal range: on the calling thread (small tensor)
    // and on the pool (several chunks).
    for dtype in [F32, BF16] {
        lomo_on_subnormals(dtype, 1000, 1);
        lomo_on_subnormals(dtype, 200_000, 2);
    }
    // f16 parameters drawn around 2^-15 (most of them f16 subnormals, below 2^-14), against the
    // f64 reference, for both algorithms, with and without weight decay and norm clipping. The
    // reference's values are normal f32/f64 numbers (f16 subnormals are ≥ 2^-24), which the
    // modes do not touch; the conversions it uses are integer or F16C operations.
    let shapes = vec![
        vec![37],
        vec![3, 4097],
        vec![5, 7, 11],
        vec![300, 1000],
        vec![70000],
    ];
    let mut seed = 10;
    for algorithm in [0u32, 1] {
        for gdtype in [F16, F32] {
            for (clip_norm, wd) in [(0.0, 0.0), (0.5, 0.1)] {
                let c = Case {
                    algorithm,
                    pdtype: F16,
                    gdtype,
                    clip_norm,
                    clip_value: 0.0,
                    wd,
                    scale: 0.0,
                    carry: algorithm == 1,
                    pscale: 2f32.powi(-15),
                };
                run_case(c, &shapes, seed);
                seed += 1;
            }
        }
    }
    assert!(flushing(), "the caller's modes are left as they were");
}
