//! The library's results do not depend on the caller's rounding direction (issue 13, kind 5):
//! the same steps through the C API, once with the calling thread rounding toward zero — set
//! before the library's thread pool exists, so its threads inherit it — and once rounding to
//! nearest, give the same bits (parameters, statistics through the next step, diagnostics).
//!
//! One test in its own binary: the pool is created by the first step of this process.

mod common;

use common::*;

/// Sets the calling thread's rounding direction: toward zero (`on`) or to nearest.
#[cfg(target_arch = "x86_64")]
fn toward_zero(on: bool) {
    let mut csr: u32 = 0;
    // SAFETY: STMXCSR/LDMXCSR on a local; only RC (bits 13–14) changes.
    unsafe {
        std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr as *mut u32);
        csr = (csr & !(3 << 13)) | if on { 3 << 13 } else { 0 };
        std::arch::asm!("ldmxcsr [{}]", in(reg) &csr as *const u32);
    }
}

#[cfg(target_arch = "aarch64")]
fn toward_zero(on: bool) {
    // SAFETY: FPCR read-modify-write at EL0; only RMode (bits 22–23) changes.
    unsafe {
        let mut v: u64;
        std::arch::asm!("mrs {}, fpcr", out(reg) v);
        v = (v & !(3 << 22)) | if on { 3 << 22 } else { 0 };
        std::arch::asm!("msr fpcr, {}", in(reg) v);
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn toward_zero(_: bool) {}

#[inline(never)]
fn truncating() -> bool {
    std::hint::black_box(1.0 + 3.0 * 2f64.powi(-25)) as f32 == 1.0
}

/// Every parameter's bits after each step, and (grad norm, clip coefficient, next loss scale)
/// bits of each step.
type Trace = (Vec<Vec<u32>>, Vec<(u32, u32, u32)>);

/// Three steps of `algorithm` on f32 / bf16 / f16 parameters with norm clipping and weight
/// decay; inputs are generated rounding to nearest, the library is called under `mode`.
/// Returns every parameter's bits after each step and the diagnostics.
fn run(algorithm: u32, rounding_toward_zero: bool) -> Trace {
    let shapes: [&[i64]; 4] = [&[37], &[3, 4097], &[5, 7, 11], &[300, 1000]];
    let mut cfg = config(algorithm);
    cfg.clip_grad_norm = 0.5;
    cfg.weight_decay = 0.1;
    let opt = Opt::new(&cfg).unwrap();
    let mut rng = Rng::new(7);
    let mut bufs = Vec::new();
    for (k, shape) in shapes.iter().enumerate() {
        let n: usize = shape.iter().map(|&d| d as usize).product();
        let dtype = [F32, BF16, F16, F32][k];
        let mut b = Buf::new(dtype, &rng.vec(n, 0.5));
        opt.register(&format!("p{k}"), b.ptr(), dtype, shape, 0)
            .unwrap();
        bufs.push(b);
    }
    let mut out = Vec::new();
    let mut infos = Vec::new();
    for step in 0..3 {
        let scale = opt.loss_scale();
        let mut grads: Vec<Buf> = bufs
            .iter()
            .map(|b| Buf::new(F32, &rng.vec(b.len(), 0.3 * scale)))
            .collect();
        toward_zero(rounding_toward_zero);
        assert_eq!(truncating(), rounding_toward_zero);
        for phase in [0u32, 1] {
            opt.begin(phase, 0.01 * (step + 1) as f32).unwrap();
            for (k, g) in grads.iter_mut().enumerate() {
                opt.submit(k as u32, g.ptr(), F32).unwrap();
            }
            opt.end().unwrap();
        }
        let info = opt.info();
        toward_zero(false);
        infos.push((
            info.grad_norm.to_bits(),
            info.clip_coef.to_bits(),
            info.next_loss_scale.to_bits(),
        ));
        for b in &bufs {
            out.push(b.values().iter().map(|v| v.to_bits()).collect());
        }
    }
    (out, infos)
}

#[test]
fn results_do_not_depend_on_the_callers_rounding_direction() {
    toward_zero(true);
    if !truncating() {
        eprintln!("SKIP: this architecture has no rounding mode to test against");
        return;
    }
    toward_zero(false);
    for algorithm in [0u32, 1] {
        // Toward zero first: the pool is created under it.
        let truncated = run(algorithm, true);
        let nearest = run(algorithm, false);
        assert!(
            truncated.0 == nearest.0,
            "algorithm {algorithm}: parameters differ"
        );
        assert_eq!(
            truncated.1, nearest.1,
            "algorithm {algorithm}: diagnostics differ"
        );
    }
}
