//! CPU backend, NORM phase: Σ(g / scale)² and a non-finite flag for one gradient
//! (`reference/semantics.md` §1.2: the norm of the unscaled, unclipped gradient).

use super::convert::{all_finite, Elem, TILE};
use super::simd::multiversion;
use super::{chunk_count, chunk_range, for_each_chunk, lane_sum, with_dtype, Partials};
use crate::backend::RawBuf;

/// Σ(g·inv_scale)² over the gradient (f64), and whether every element was finite.
/// Non-finite gradients report a sum of 0.
pub fn grad_sum_sq(grad: &RawBuf, inv_scale: f32) -> (f64, bool) {
    let n = grad.numel;
    let chunks = chunk_count(n, 1);
    let sums = Partials::new();
    let bad = Partials::new();
    for_each_chunk(chunks, |c| {
        let (a, b) = chunk_range(n, chunks, c);
        let (s, finite) = with_dtype!(grad.dtype, |G| {
            // SAFETY: the core validated the gradient buffer for `numel` elements; only read.
            chunk_sum_sq::<G>(unsafe { grad.slice::<G>(a, b) }, inv_scale)
        });
        sums.set(c, s);
        bad.set(c, if finite { 0.0 } else { 1.0 });
    });
    if bad.sum(chunks) > 0.0 {
        (0.0, false)
    } else {
        (sums.sum(chunks), true)
    }
}

/// Whether every element of the gradient is finite.
pub fn grad_all_finite(grad: &RawBuf) -> bool {
    let n = grad.numel;
    let chunks = chunk_count(n, 1);
    let bad = Partials::new();
    for_each_chunk(chunks, |c| {
        let (a, b) = chunk_range(n, chunks, c);
        // SAFETY: as in `grad_sum_sq`.
        let ok = with_dtype!(grad.dtype, |G| chunk_all_finite::<G>(unsafe {
            grad.slice::<G>(a, b)
        }));
        bad.set(c, if ok { 0.0 } else { 1.0 });
    });
    bad.sum(chunks) == 0.0
}

multiversion! {
    fn chunk_all_finite<G: Elem>(g: &[G]) -> bool {
        g.chunks(8 * TILE).all(all_finite)
    }
}

multiversion! {
    fn chunk_sum_sq<G: Elem>(g: &[G], inv_scale: f32) -> (f64, bool) {
        let mut total = 0f64;
        for tile in g.chunks(TILE) {
            if !all_finite(tile) {
                return (0.0, false);
            }
            let mut lanes = [0f32; 8];
            let mut it = tile.chunks_exact(8);
            for c in &mut it {
                for k in 0..8 {
                    let v = c[k].to_f32() * inv_scale;
                    lanes[k] = v.mul_add(v, lanes[k]);
                }
            }
            for (k, x) in it.remainder().iter().enumerate() {
                let v = x.to_f32() * inv_scale;
                lanes[k] = v.mul_add(v, lanes[k]);
            }
            total += lane_sum(&lanes) as f64;
        }
        (total, true)
    }
}
