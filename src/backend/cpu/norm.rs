//! CPU backend, NORM phase: Σ(g / scale)² and a non-finite flag for one gradient
//! (`reference/semantics.md` §1.2: the norm of the unscaled, unclipped gradient).

use super::convert::{Src, TILE};
use super::simd::multiversion;
use super::{chunk_count, chunk_range, for_each_chunk, lane_add, lane_sum, Partials};
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
        // SAFETY: the core validated the gradient buffer for `numel` elements; it is only read.
        let g = unsafe { grad.src(a, b) };
        let (s, finite) = chunk_sum_sq(g, inv_scale);
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
        let g = unsafe { grad.src(a, b) };
        bad.set(c, if chunk_all_finite(g) { 0.0 } else { 1.0 });
    });
    bad.sum(chunks) == 0.0
}

multiversion! {
    fn chunk_all_finite(g: Src<'_>) -> bool {
        let n = g.len();
        let mut start = 0;
        while start < n {
            let end = (start + 8 * TILE).min(n);
            if !g.all_finite(start, end) {
                return false;
            }
            start = end;
        }
        true
    }
}

multiversion! {
    fn chunk_sum_sq(g: Src<'_>, inv_scale: f32) -> (f64, bool) {
        let n = g.len();
        let mut buf = [0f32; TILE];
        let mut total = 0f64;
        let mut start = 0;
        while start < n {
            let len = TILE.min(n - start);
            if !g.all_finite(start, start + len) {
                return (0.0, false);
            }
            let x = &mut buf[..len];
            g.load(start, x);
            for v in x.iter_mut() {
                let s = *v * inv_scale;
                *v = s * s;
            }
            let mut lanes = [0f32; 8];
            lane_add(&mut lanes, x);
            total += lane_sum(&lanes) as f64;
            start += len;
        }
        (total, true)
    }
}
