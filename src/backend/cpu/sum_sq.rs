//! CPU backend: Σv² of parameter values (RMS(p) for AdaLomo) in a fixed summation order.
//!
//! The order: the values are cut into rows of `cols` and each row into tiles of [`TILE`]; within
//! a tile element `k` accumulates into f32 lane `k % 8` by fused multiply-add, the lanes are
//! summed by [`lane_sum`] and each tile's sum is added to the f64 total in tile order.
//!
//! One tile's lanes are one chain of dependent FMAs (the loop waits on the FMA latency, not on
//! memory), so up to four consecutive tiles of equal length are summed side by side — four
//! independent chains — and still added to the total one by one in their order: the same
//! result, bit for bit, as one tile at a time.

use super::convert::{Elem, TILE};
use super::lane_sum;
use super::simd::multiversion;

/// Tiles summed side by side.
const GROUP: usize = 4;

/// Σv² of a slice, tiles of [`TILE`] from its start (one row).
#[inline(always)]
pub(crate) fn sum_sq<P: Elem>(v: &[P]) -> f64 {
    let mut total = 0f64;
    sum_sq_rows(v, v.len(), &mut total);
    total
}

// Adds Σv² of `v` — whole rows of `cols` elements, each row tiled from its start — to `acc`,
// tile by tile in order.
multiversion! {
    pub(crate) fn sum_sq_rows<P: Elem>(v: &[P], cols: usize, acc: &mut f64) {
        if v.is_empty() || cols == 0 {
            return;
        }
        let mut group: [&[P]; GROUP] = [&[]; GROUP];
        let mut n = 0;
        for row in v.chunks(cols) {
            for tile in row.chunks(TILE) {
                if n > 0 && tile.len() != group[0].len() {
                    for t in &group[..n] {
                        *acc += tile_sq(t) as f64;
                    }
                    n = 0;
                }
                group[n] = tile;
                n += 1;
                if n == GROUP {
                    for s in tiles_sq(&group) {
                        *acc += s as f64;
                    }
                    n = 0;
                }
            }
        }
        for t in &group[..n] {
            *acc += tile_sq(t) as f64;
        }
    }
}

/// One tile's lane sum.
#[inline(always)]
fn tile_sq<P: Elem>(t: &[P]) -> f32 {
    let mut lanes = [0f32; 8];
    let mut it = t.chunks_exact(8);
    for c in &mut it {
        fma8(&mut lanes, c);
    }
    for (k, c) in it.remainder().iter().enumerate() {
        let x = c.to_f32();
        lanes[k] = x.mul_add(x, lanes[k]);
    }
    lane_sum(&lanes)
}

/// `lanes[k] += c[k]²` (fused) for the 8 elements of `c`.
#[inline(always)]
fn fma8<P: Elem>(lanes: &mut [f32; 8], c: &[P]) {
    let c: &[P; 8] = c.try_into().unwrap();
    for k in 0..8 {
        let x = c[k].to_f32();
        lanes[k] = x.mul_add(x, lanes[k]);
    }
}

/// The lane sums of `GROUP` tiles of equal length, computed side by side: lanes `8q..8q + 8`
/// are tile `q`'s.
#[inline(always)]
fn tiles_sq<P: Elem>(g: &[&[P]; GROUP]) -> [f32; GROUP] {
    let len = g[0].len();
    let whole = len / 8 * 8;
    let t = [
        &g[0][..whole],
        &g[1][..whole],
        &g[2][..whole],
        &g[3][..whole],
    ];
    let mut l = [0f32; 8 * GROUP];
    let mut i = 0;
    while i < whole {
        let mut x = [0f32; 8 * GROUP];
        for q in 0..GROUP {
            let c: &[P; 8] = t[q][i..i + 8].try_into().unwrap();
            for k in 0..8 {
                x[8 * q + k] = c[k].to_f32();
            }
        }
        for j in 0..8 * GROUP {
            l[j] = x[j].mul_add(x[j], l[j]);
        }
        i += 8;
    }
    let mut out = [0f32; GROUP];
    for q in 0..GROUP {
        let lanes: &mut [f32; 8] = (&mut l[8 * q..8 * q + 8]).try_into().unwrap();
        for (k, c) in g[q][whole..len].iter().enumerate() {
            let x = c.to_f32();
            lanes[k] = x.mul_add(x, lanes[k]);
        }
        out[q] = lane_sum(lanes);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::convert::Bf16;

    /// The order of the module doc, one tile at a time, written plainly.
    fn plain<P: Elem>(v: &[P], cols: usize) -> f64 {
        let mut acc = 0f64;
        for row in v.chunks(cols) {
            for tile in row.chunks(TILE) {
                let mut lanes = [0f32; 8];
                for (k, x) in tile.iter().enumerate() {
                    let x = x.to_f32();
                    lanes[k % 8] = x.mul_add(x, lanes[k % 8]);
                }
                acc += lane_sum(&lanes) as f64;
            }
        }
        acc
    }

    #[test]
    fn grouped_tiles_sum_as_one_tile_at_a_time() {
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0
        };
        let f: Vec<f32> = (0..40_000).map(|_| next()).collect();
        let b: Vec<Bf16> = f.iter().map(|&x| Bf16::from_f32_rne(x)).collect();
        let cases = [
            (1, 1),
            (7, 7),
            (4096, 4096),
            (12_288, 4096),
            (39_999, 39_999),
            (40_000, 1000),
            (40_000, 2500),
            (39_000, 13),
            (33_000, 1100),
            (40_000, 8),
        ];
        for (n, cols) in cases {
            let (fv, bv) = (&f[..n], &b[..n]);
            let mut a = 0f64;
            sum_sq_rows(fv, cols, &mut a);
            assert_eq!(
                a.to_bits(),
                plain(fv, cols).to_bits(),
                "f32 n {n} cols {cols}"
            );
            let mut a = 0f64;
            sum_sq_rows(bv, cols, &mut a);
            assert_eq!(
                a.to_bits(),
                plain(bv, cols).to_bits(),
                "bf16 n {n} cols {cols}"
            );
            assert_eq!(sum_sq(fv).to_bits(), plain(fv, n).to_bits());
        }
    }
}
