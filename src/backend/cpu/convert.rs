//! CPU backend: loading f32/f16/bf16 buffers into f32 tiles and storing them back with
//! round-to-nearest-even or stochastic rounding.
//!
//! All helpers are `#[inline(always)]` so they are compiled into the AVX2 variants of the
//! kernels that call them.

use super::philox::random_word;
use crate::config::Rounding;
use crate::dtype::DType;
use half::f16;
use half::slice::HalfFloatSliceExt;

/// Elements per tile: three f32 tiles fit comfortably in L1.
pub(crate) const TILE: usize = 1024;

/// A read-only typed view of a host buffer.
#[derive(Clone, Copy)]
pub enum Src<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [u16]),
}

/// A mutable typed view of a host buffer.
pub enum Dst<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
    Bf16(&'a mut [u16]),
}

impl<'a> Src<'a> {
    pub fn dtype(&self) -> DType {
        match self {
            Src::F32(_) => DType::F32,
            Src::F16(_) => DType::F16,
            Src::Bf16(_) => DType::Bf16,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Src::F32(s) => s.len(),
            Src::F16(s) => s.len(),
            Src::Bf16(s) => s.len(),
        }
    }

    /// The sub-view `[start, end)`.
    #[inline(always)]
    pub fn slice(&self, start: usize, end: usize) -> Src<'a> {
        match *self {
            Src::F32(s) => Src::F32(&s[start..end]),
            Src::F16(s) => Src::F16(&s[start..end]),
            Src::Bf16(s) => Src::Bf16(&s[start..end]),
        }
    }

    /// Converts `[start, start + out.len())` into `out`.
    #[inline(always)]
    pub fn load(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        match self {
            Src::F32(s) => out.copy_from_slice(&s[start..end]),
            Src::F16(s) => s[start..end].convert_to_f32_slice(out),
            Src::Bf16(s) => {
                for (o, &b) in out.iter_mut().zip(&s[start..end]) {
                    *o = bf16_to_f32(b);
                }
            }
        }
    }

    /// Whether every element in `[start, end)` is finite (tested on the stored bits).
    #[inline(always)]
    pub fn all_finite(&self, start: usize, end: usize) -> bool {
        match self {
            Src::F32(s) => {
                let mut bad = 0u32;
                for &v in &s[start..end] {
                    bad |= ((v.to_bits() & 0x7f80_0000) == 0x7f80_0000) as u32;
                }
                bad == 0
            }
            Src::F16(s) => {
                let mut bad = 0u32;
                for &v in &s[start..end] {
                    bad |= ((v.to_bits() & 0x7c00) == 0x7c00) as u32;
                }
                bad == 0
            }
            Src::Bf16(s) => {
                let mut bad = 0u32;
                for &v in &s[start..end] {
                    bad |= ((v & 0x7f80) == 0x7f80) as u32;
                }
                bad == 0
            }
        }
    }
}

impl<'a> Dst<'a> {
    pub fn len(&self) -> usize {
        match self {
            Dst::F32(s) => s.len(),
            Dst::F16(s) => s.len(),
            Dst::Bf16(s) => s.len(),
        }
    }

    /// A read-only view of the same memory.
    #[inline(always)]
    pub fn as_src(&self) -> Src<'_> {
        match self {
            Dst::F32(s) => Src::F32(s),
            Dst::F16(s) => Src::F16(s),
            Dst::Bf16(s) => Src::Bf16(s),
        }
    }

    /// Splits into disjoint mutable views at the given boundaries (`bounds[0] = 0`, last = len).
    pub fn split(self, bounds: &[usize]) -> Vec<Dst<'a>> {
        fn cut<'b, T>(mut s: &'b mut [T], bounds: &[usize]) -> Vec<&'b mut [T]> {
            let mut out = Vec::with_capacity(bounds.len().saturating_sub(1));
            for w in bounds.windows(2) {
                let (a, b) = std::mem::take(&mut s).split_at_mut(w[1] - w[0]);
                out.push(a);
                s = b;
            }
            out
        }
        match self {
            Dst::F32(s) => cut(s, bounds).into_iter().map(Dst::F32).collect(),
            Dst::F16(s) => cut(s, bounds).into_iter().map(Dst::F16).collect(),
            Dst::Bf16(s) => cut(s, bounds).into_iter().map(Dst::Bf16).collect(),
        }
    }

    /// Writes `vals` to `[start, start + vals.len())`. `elem0` is the index of `start` within the
    /// whole parameter (the stochastic-rounding counter).
    #[inline(always)]
    pub fn store(&mut self, start: usize, vals: &[f32], round: &RoundCtx, elem0: u64) {
        let end = start + vals.len();
        match (self, round.mode) {
            (Dst::F32(s), _) => s[start..end].copy_from_slice(vals),
            (Dst::F16(s), Rounding::Nearest) => s[start..end].convert_from_f32_slice(vals),
            (Dst::Bf16(s), Rounding::Nearest) => {
                for (o, &v) in s[start..end].iter_mut().zip(vals) {
                    *o = f32_to_bf16_rne(v);
                }
            }
            (Dst::F16(s), Rounding::Stochastic) => {
                for (k, (o, &v)) in s[start..end].iter_mut().zip(vals).enumerate() {
                    *o = f32_to_f16_sr(v, round.word(elem0 + k as u64));
                }
            }
            (Dst::Bf16(s), Rounding::Stochastic) => {
                for (k, (o, &v)) in s[start..end].iter_mut().zip(vals).enumerate() {
                    *o = f32_to_bf16_sr(v, round.word(elem0 + k as u64));
                }
            }
        }
    }
}

/// What stochastic rounding needs to address its random stream.
#[derive(Clone, Copy, Debug)]
pub struct RoundCtx {
    pub mode: Rounding,
    pub seed: u64,
    pub step: u64,
    pub param_id: u32,
}

impl RoundCtx {
    #[inline(always)]
    fn word(&self, element: u64) -> u32 {
        random_word(self.seed, self.step, self.param_id, element)
    }
}

#[inline(always)]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// f32 → bf16, round to nearest even; NaN stays a quiet NaN.
#[inline(always)]
pub fn f32_to_bf16_rne(v: f32) -> u16 {
    let u = v.to_bits();
    let rounded = u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16;
    if v.is_nan() {
        ((u >> 16) | 0x40) as u16
    } else {
        rounded as u16
    }
}

/// f32 → bf16, stochastic: adds 16 random bits below the kept mantissa and truncates, so the
/// value rounds up with probability equal to the discarded fraction.
#[inline(always)]
pub fn f32_to_bf16_sr(v: f32, r: u32) -> u16 {
    let u = v.to_bits();
    if v.is_nan() {
        return ((u >> 16) | 0x40) as u16;
    }
    if v.is_infinite() {
        return (u >> 16) as u16;
    }
    (u.wrapping_add(r & 0xffff) >> 16) as u16
}

/// f32 → f16, stochastic: picks one of the two neighbouring f16 values with probability
/// proportional to closeness, using 24 random bits.
#[inline(always)]
pub fn f32_to_f16_sr(v: f32, r: u32) -> f16 {
    let near = f16::from_f32(v);
    let nf = near.to_f32();
    if !v.is_finite() || nf == v {
        return near;
    }
    let (a, mag_bits) = (v.abs(), near.to_bits() & 0x7fff);
    let sign = near.to_bits() & 0x8000;
    let (lo_bits, hi_bits) = if nf.is_infinite() || nf.abs() > a {
        (mag_bits - 1, mag_bits)
    } else {
        (mag_bits, mag_bits + 1)
    };
    let lo = f16::from_bits(lo_bits).to_f32();
    let hi = if hi_bits >= 0x7c00 {
        65536.0
    } else {
        f16::from_bits(hi_bits).to_f32()
    };
    let frac = (a - lo) / (hi - lo);
    let u = (r >> 8) as f32 * (1.0 / 16_777_216.0);
    let bits = if u < frac { hi_bits } else { lo_bits };
    f16::from_bits(sign | bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rne_matches_half() {
        let mut x = 0x1234_5678u32;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let v = f32::from_bits(x);
            if v.is_nan() {
                continue;
            }
            assert_eq!(
                f32_to_bf16_rne(v),
                half::bf16::from_f32(v).to_bits(),
                "{v:e}"
            );
        }
        assert!(bf16_to_f32(f32_to_bf16_rne(f32::NAN)).is_nan());
    }

    #[test]
    fn stochastic_rounding_is_unbiased_and_bracketed() {
        for &v in &[1.0f32 + 1.0 / 1024.0, -3.3e-3, 0.123_456_7, 7.77e4] {
            let (mut sum_b, mut sum_h) = (0.0f64, 0.0f64);
            let n = 20_000u64;
            for e in 0..n {
                let r = random_word(7, 1, 3, e);
                let b = bf16_to_f32(f32_to_bf16_sr(v, r));
                let lo = half::bf16::from_f32(v).to_f32();
                assert!((b - v).abs() <= 2.0 * (lo - v).abs().max(v.abs() / 128.0));
                sum_b += b as f64;
                if v.abs() < 6.0e4 {
                    sum_h += f32_to_f16_sr(v, r).to_f32() as f64;
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
                    (mean_h - v as f64).abs() < v.abs() as f64 * 3e-4,
                    "f16 {v}: {mean_h}"
                );
            }
        }
    }
}
