//! Comparison of a CUDA run (emulated) with a CPU run: the shapes both run on and the
//! per-element tolerance (tests/cuda_emulated_parity.rs, tests/cuda_emulated_capi.rs).

use super::{Buf, F16, F32};

/// Absolute slack for values that an update brought close to zero: cancellation turns the ~1e-6
/// relative differences of the reduced scalars (summation order) into ~1e-8 absolute ones, which
/// near zero exceed an ulp. Parameters are O(1) and updates O(1e-2), so real errors are far larger.
pub const ATOL: f64 = 1e-7;

/// The shapes, plus three whose rows allow 16-byte vector access in the row kernels:
/// 16×64 (column sums in shared memory), 3×4104 (a row of one whole register segment of 4096
/// columns and a partial one) and 2×8192 (two segments; too long for the emulated 48 KiB of
/// shared memory: column sums in each block's global slab).
pub const SHAPES: [&[i64]; 8] = [
    &[1],
    &[31],
    &[4097],
    &[3, 4097],
    &[3, 5, 7],
    &[16, 64],
    &[3, 4104],
    &[2, 8192],
];

pub fn close(dtype: u32, cpu: f32, dev: f32) -> bool {
    if cpu.is_nan() || dev.is_nan() {
        return false;
    }
    if cpu == dev {
        return true;
    }
    match dtype {
        F32 => ((cpu - dev).abs() as f64) <= 2e-6 * (cpu.abs().max(dev.abs()) as f64) + ATOL,
        _ => ((cpu - dev).abs() as f64) <= ulp(dtype, cpu).min(ulp(dtype, dev)).max(ATOL),
    }
}

/// The spacing of `dtype` values at `v` (subnormal spacing below the smallest normal).
pub fn ulp(dtype: u32, v: f32) -> f64 {
    let (bits, min_exp) = if dtype == F16 { (10, -14) } else { (7, -126) };
    let e = (v.abs() as f64).log2().floor().max(min_exp as f64) as i32;
    2f64.powi(e - bits)
}

/// Copies the CPU run's parameter values into the device run's buffers, so that one-ulp
/// differences (allowed per step) do not accumulate across steps.
pub fn resync(cpu: &[Buf], dev: &mut [Buf]) {
    for (c, d) in cpu.iter().zip(dev.iter_mut()) {
        d.f32s.clone_from(&c.f32s);
        d.halves.clone_from(&c.halves);
    }
}
