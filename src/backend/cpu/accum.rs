//! CPU backend: gradient accumulation buffers (`lomo_accum_enable`). One pass per call:
//!
//! ```text
//! acc[i] ← round_acc( ((keep ? acc[i] : 0) + (g ? g[i] : 0)) · factor )
//! ```
//!
//! in f32 arithmetic (`(a + g)` rounded once to f32, then the product rounded once), stored
//! in the buffer's dtype by round-to-nearest-even. Non-finite values propagate (an overflowing
//! micro-batch leaves a non-finite buffer, which the step's passes then find); a sum that
//! overflows an f16 buffer becomes ±inf and is treated the same way.

use super::convert::Elem;
use super::simd::multiversion;
use super::{chunk_count, chunk_range, for_each_chunk, with_dtypes};
use crate::backend::interface::AccumOp;
use crate::backend::RawBuf;

/// Applies `op` to the buffer `acc` with the gradient `g` (same element count; any dtypes).
/// The caller owns both buffers and guarantees `numel` valid elements in each and that nothing
/// else accesses them during the call.
pub fn accumulate(acc: &RawBuf, g: Option<&RawBuf>, op: &AccumOp) {
    let n = acc.numel;
    debug_assert!(g.map_or(true, |g| g.numel == n));
    let chunks = chunk_count(n, 1);
    // The gradient's dtype is irrelevant without one; any type reads nothing.
    let gdtype = g.map_or(acc.dtype, |g| g.dtype);
    for_each_chunk(chunks, |c| {
        let (a, b) = chunk_range(n, chunks, c);
        with_dtypes!(acc.dtype, gdtype, |A, G| {
            // SAFETY: the core owns `acc` (allocated for `numel` elements of its dtype, locked
            // by the submitting thread); chunks are disjoint, so each range has one writer.
            let dst = unsafe { acc.slice_mut::<A>(a, b) };
            // SAFETY: the core validated the gradient for `numel` elements; only read.
            let src = g.map(|g| unsafe { g.slice::<G>(a, b) });
            chunk::<A, G>(dst, src, op.keep, op.factor)
        })
    });
}

multiversion! {
    fn chunk<A: Elem, G: Elem>(dst: &mut [A], src: Option<&[G]>, keep: bool, factor: f32) {
        match (src, keep) {
            (Some(s), true) => {
                for (d, &v) in dst.iter_mut().zip(s) {
                    *d = A::from_f32_rne((d.to_f32() + v.to_f32()) * factor);
                }
            }
            (Some(s), false) => {
                for (d, &v) in dst.iter_mut().zip(s) {
                    *d = A::from_f32_rne(v.to_f32() * factor);
                }
            }
            (None, true) => {
                for d in dst.iter_mut() {
                    *d = A::from_f32_rne(d.to_f32() * factor);
                }
            }
            (None, false) => {
                for d in dst.iter_mut() {
                    *d = A::from_f32_rne(0.0);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::convert::{f16_to_f32, f32_to_bf16_rne, f32_to_f16_rne};
    use crate::dtype::DType;

    fn buf<T>(v: &mut [T], dtype: DType) -> RawBuf {
        RawBuf {
            addr: v.as_mut_ptr() as usize,
            dtype,
            numel: v.len(),
        }
    }

    #[test]
    fn adds_scales_and_rounds_into_the_buffer_dtype() {
        let mut acc = vec![1.5f32, -2.0, 3.0];
        let mut g = vec![0.25f32, 0.5, f32::INFINITY];
        let (a, gb) = (buf(&mut acc, DType::F32), buf(&mut g, DType::F32));
        accumulate(
            &a,
            Some(&gb),
            &AccumOp {
                keep: true,
                factor: 0.5,
            },
        );
        assert_eq!(acc[..2], [0.875, -0.75]);
        assert!(acc[2].is_infinite());

        let mut h = vec![f32_to_bf16_rne(1.0); 2];
        let mut g = vec![f32_to_f16_rne(1.0 / 256.0), f32_to_f16_rne(3.0)];
        let (hb, gb) = (buf(&mut h, DType::Bf16), buf(&mut g, DType::F16));
        accumulate(
            &hb,
            Some(&gb),
            &AccumOp {
                keep: true,
                factor: 1.0,
            },
        );
        // 1 + 2^-8 is not a bf16 value: ties to even gives 1.
        assert_eq!(h, [f32_to_bf16_rne(1.0), f32_to_bf16_rne(4.0)]);
        accumulate(
            &hb,
            Some(&gb),
            &AccumOp {
                keep: false,
                factor: 1.0,
            },
        );
        assert_eq!(h[1], f32_to_bf16_rne(3.0));

        let mut f = vec![f32_to_f16_rne(60000.0)];
        let mut g = vec![60000.0f32];
        let (fb, gb) = (buf(&mut f, DType::F16), buf(&mut g, DType::F32));
        accumulate(
            &fb,
            Some(&gb),
            &AccumOp {
                keep: true,
                factor: 1.0,
            },
        );
        assert!(f16_to_f32(f[0]).is_infinite());
    }
}
