//! CPU backend: element types. f32, f16 and bf16 convert to f32 for the math and back with
//! round-to-nearest-even or stochastic rounding.
//!
//! Conversions are branch-free bit manipulations so the fused loops that use them vectorize;
//! everything is `#[inline(always)]` so it is compiled into the AVX2 variants of the kernels.

use super::philox::random_word;
use crate::config::Rounding;
use crate::dtype::DType;

/// Elements per tile: the unit of the non-finite check that precedes every write.
pub(crate) const TILE: usize = 1024;

/// A stored element type. `Bits` is its storage (f32, or u16 for the half types).
pub trait Elem: Copy + Send + Sync + 'static {
    const DTYPE: DType;
    /// The largest finite value, as f32: a result of larger magnitude may round to infinity.
    const MAX_F32: f32;
    fn to_f32(self) -> f32;
    /// Round to nearest, ties to even; NaN stays NaN.
    fn from_f32_rne(v: f32) -> Self;
    /// Stochastic rounding with the random word `r`.
    fn from_f32_sr(v: f32, r: u32) -> Self;
    /// Whether the stored value is finite (tested on the bits).
    fn is_finite_bits(self) -> bool;
}

impl Elem for f32 {
    const DTYPE: DType = DType::F32;
    const MAX_F32: f32 = f32::MAX;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32_rne(v: f32) -> f32 {
        v
    }
    #[inline(always)]
    fn from_f32_sr(v: f32, _r: u32) -> f32 {
        v
    }
    #[inline(always)]
    fn is_finite_bits(self) -> bool {
        (self.to_bits() & 0x7f80_0000) != 0x7f80_0000
    }
}

/// bf16 storage (the upper half of an f32).
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Bf16(pub u16);

impl Elem for Bf16 {
    const DTYPE: DType = DType::Bf16;
    const MAX_F32: f32 = 3.389_531_4e38; // 0x7f7f as bf16
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.0 as u32) << 16)
    }
    #[inline(always)]
    fn from_f32_rne(v: f32) -> Bf16 {
        Bf16(f32_to_bf16_rne(v))
    }
    #[inline(always)]
    fn from_f32_sr(v: f32, r: u32) -> Bf16 {
        Bf16(f32_to_bf16_sr(v, r))
    }
    #[inline(always)]
    fn is_finite_bits(self) -> bool {
        (self.0 & 0x7f80) != 0x7f80
    }
}

/// IEEE binary16 storage.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct F16(pub u16);

impl Elem for F16 {
    const DTYPE: DType = DType::F16;
    const MAX_F32: f32 = 65504.0;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16_to_f32(self.0)
    }
    #[inline(always)]
    fn from_f32_rne(v: f32) -> F16 {
        F16(f32_to_f16_rne(v))
    }
    #[inline(always)]
    fn from_f32_sr(v: f32, r: u32) -> F16 {
        F16(f32_to_f16_sr(v, r))
    }
    #[inline(always)]
    fn is_finite_bits(self) -> bool {
        (self.0 & 0x7c00) != 0x7c00
    }
}

/// What stochastic rounding needs to address its random stream.
#[derive(Clone, Copy, Debug)]
pub struct RoundCtx {
    pub mode: Rounding,
    pub seed: u64,
    pub step: u64,
    pub param_id: u32,
    /// Global index of the buffer's first element (a piece of a larger tensor; 0 otherwise), so
    /// an element draws the same bits whichever rank holds it; for a piece of columns, its first
    /// column.
    pub offset: u64,
    /// A piece of columns: its width (0: the buffer is a contiguous range of the tensor) and the
    /// global row length; element `e` is then global `(e / cols)·row_stride + offset + e % cols`.
    pub cols: u64,
    pub row_stride: u64,
}

impl RoundCtx {
    /// The random word of element `element` of this parameter at this step.
    #[inline(always)]
    pub fn word(&self, element: u64) -> u32 {
        let global = match element.checked_div(self.cols) {
            None => self.offset + element,
            Some(row) => row * self.row_stride + self.offset + element % self.cols,
        };
        random_word(self.seed, self.step, self.param_id, global)
    }

    /// Stores `v` into `out` for element `element`.
    #[inline(always)]
    pub fn store<P: Elem>(&self, v: f32, element: u64) -> P {
        match self.mode {
            Rounding::Nearest => P::from_f32_rne(v),
            Rounding::Stochastic => P::from_f32_sr(v, self.word(element)),
        }
    }
}

/// `v ← v / n` for every element of `buf` (in f32, rounded to nearest in the buffer's dtype):
/// a gradient summed over `n` ranks becomes their average.
pub fn divide_in_place(buf: &crate::backend::RawBuf, n: f32) {
    if buf.numel == 0 || n == 1.0 {
        return;
    }
    super::with_dtype!(buf.dtype, |T| {
        // SAFETY: `buf` is the library's scratch of `numel` elements of its dtype, written only
        // here meanwhile.
        let v = unsafe { buf.slice_mut::<T>(0, buf.numel) };
        for x in v {
            *x = T::from_f32_rne(x.to_f32() / n);
        }
    })
}

/// Whether every element of `s` is finite.
#[inline(always)]
pub fn all_finite<G: Elem>(s: &[G]) -> bool {
    let mut bad = 0u32;
    for &v in s {
        bad |= (!v.is_finite_bits()) as u32;
    }
    bad == 0
}

/// f32 → bf16, round to nearest even; NaN stays a quiet NaN.
#[inline(always)]
pub fn f32_to_bf16_rne(v: f32) -> u16 {
    let u = v.to_bits();
    let rounded = u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16;
    let is_nan = (u & 0x7fff_ffff) > 0x7f80_0000;
    if is_nan {
        ((u >> 16) | 0x40) as u16
    } else {
        rounded as u16
    }
}

/// f32 → bf16, stochastic: adds 16 random bits below the kept mantissa and truncates, so the
/// value rounds away from zero with probability equal to the discarded fraction.
#[inline(always)]
pub fn f32_to_bf16_sr(v: f32, r: u32) -> u16 {
    let u = v.to_bits();
    let special = (u & 0x7f80_0000) == 0x7f80_0000;
    if special {
        f32_to_bf16_rne(v)
    } else {
        (u.wrapping_add(r & 0xffff) >> 16) as u16
    }
}

/// f16 → f32 (exact), branch-free, and independent of the floating-point environment: no
/// operand or result is an f32 subnormal, so flush-to-zero / denormals-are-zero modes (set by
/// XLA's CPU runtime, `-ffast-math` programs, `torch.set_flush_denormal`) cannot turn an f16
/// subnormal (|h| < 2^-14) into zero.
#[inline(always)]
pub fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7fff;
    // Rebias the exponent (15 → 127); Inf/NaN move on to the f32 exponent 255.
    let rebiased = (em << 13) + ((127 - 15) << 23);
    let special = rebiased + ((128 - 16) << 23);
    // Subnormals (and zero): read m·2^-24 as 2^-14·(1 + m·2^-10) minus 2^-14 — both operands
    // are normal f32 and the difference m·2^-24 is exact and normal (or +0 for m = 0).
    let magic = 113u32 << 23; // 2^-14
    let sub = (f32::from_bits(rebiased + (1 << 23)) - f32::from_bits(magic)).to_bits();
    let mag = if em >= 0x7c00 {
        special
    } else if em < 0x0400 {
        sub
    } else {
        rebiased
    };
    f32::from_bits(sign | mag)
}

/// f32 → f16, round to nearest even (overflow to ±inf, NaN kept), branch-free.
#[inline(always)]
pub fn f32_to_f16_rne(f: f32) -> u16 {
    let bits = f.to_bits();
    let sign = bits & 0x8000_0000;
    let u = bits ^ sign;
    // Results are subnormal or zero below 2^-14: let the FPU round by adding a magic number
    // (the sum is ≥ 0.5, never an f32 subnormal; an input below 2^-126 flushed by DAZ rounds
    // to ±0 either way, so the result does not depend on the floating-point environment).
    let denorm_magic: u32 = ((127 - 15) + (23 - 10) + 1) << 23;
    let sub = (f32::from_bits(u) + f32::from_bits(denorm_magic))
        .to_bits()
        .wrapping_sub(denorm_magic);
    // Normal range: rebias the exponent and round the mantissa to nearest even.
    let mant_odd = (u >> 13) & 1;
    let norm = u
        .wrapping_add(((15u32.wrapping_sub(127)) << 23).wrapping_add(0xfff))
        .wrapping_add(mant_odd)
        >> 13;
    let big = if u > 0x7f80_0000 { 0x7e00 } else { 0x7c00 };
    let o = if u >= (127 + 16) << 23 {
        big
    } else if u < (113 << 23) {
        sub
    } else {
        norm
    };
    (o | (sign >> 16)) as u16
}

/// f32 → f16, stochastic: picks one of the two neighbouring f16 values with probability
/// proportional to closeness, using 24 random bits.
#[inline(always)]
pub fn f32_to_f16_sr(v: f32, r: u32) -> u16 {
    let near = f32_to_f16_rne(v);
    let nf = f16_to_f32(near);
    if !v.is_finite() || nf == v {
        return near;
    }
    let a = v.abs();
    let (sign, mag) = (near & 0x8000, near & 0x7fff);
    let (lo_bits, hi_bits) = if nf.is_infinite() || nf.abs() > a {
        (mag - 1, mag)
    } else {
        (mag, mag + 1)
    };
    let lo = f16_to_f32(lo_bits);
    let hi = if hi_bits >= 0x7c00 {
        65536.0
    } else {
        f16_to_f32(hi_bits)
    };
    let frac = (a - lo) / (hi - lo);
    let u = (r >> 8) as f32 * (1.0 / 16_777_216.0);
    sign | if u < frac { hi_bits } else { lo_bits }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xorshift(x: &mut u32) -> u32 {
        *x ^= *x << 13;
        *x ^= *x >> 17;
        *x ^= *x << 5;
        *x
    }

    #[test]
    fn conversions_match_half() {
        let mut x = 0x1234_5678u32;
        for i in 0..400_000u32 {
            let v = f32::from_bits(if i < 65536 {
                (i << 16) | (i & 0xffff)
            } else {
                xorshift(&mut x)
            });
            let b = f32_to_bf16_rne(v);
            let h = f32_to_f16_rne(v);
            if v.is_nan() {
                assert!(Bf16(b).to_f32().is_nan() && f16_to_f32(h).is_nan());
                continue;
            }
            assert_eq!(b, half::bf16::from_f32(v).to_bits(), "bf16 {v:e}");
            assert_eq!(h, half::f16::from_f32(v).to_bits(), "f16 {v:e}");
        }
        for h in 0..=u16::MAX {
            let want = half::f16::from_bits(h).to_f32();
            let got = f16_to_f32(h);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{h:#x}"
            );
        }
    }

    #[test]
    fn stochastic_rounding_is_unbiased_and_bracketed() {
        for &v in &[1.0f32 + 1.0 / 1024.0, -3.3e-3, 0.123_456_7, 7.77e4, 3.0e-6] {
            let (mut sum_b, mut sum_h) = (0.0f64, 0.0f64);
            let n = 20_000u64;
            let lo_b = half::bf16::from_f32(v).to_f32();
            for e in 0..n {
                let r = random_word(7, 1, 3, e);
                let b = Bf16(f32_to_bf16_sr(v, r)).to_f32();
                assert!((b - v).abs() <= 2.0 * (lo_b - v).abs().max(v.abs() / 128.0));
                sum_b += b as f64;
                if v.abs() < 6.0e4 {
                    sum_h += f16_to_f32(f32_to_f16_sr(v, r)) as f64;
                }
            }
            let mean_b = sum_b / n as f64;
            assert!(
                (mean_b - v as f64).abs() < v.abs() as f64 * 2e-3,
                "bf16 {v}: {mean_b}"
            );
            if v.abs() < 6.0e4 {
                let mean_h = sum_h / n as f64;
                assert!(
                    (mean_h - v as f64).abs() < v.abs() as f64 * 3e-3,
                    "f16 {v}: {mean_h}"
                );
            }
        }
    }
}
