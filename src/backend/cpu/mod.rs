//! CPU backend: the passes of design.md §6 as tiled, multi-threaded loops over caller buffers.
//!
//! Work is split into a number of chunks that depends only on the tensor's shape (so results are
//! bit-identical for any thread count) and run on one process-wide thread pool
//! (`LOMO_NUM_THREADS`, default: all cores). Per-chunk partial sums land in fixed slots and are
//! combined in chunk order. Nothing here allocates per step. Every chunk runs with IEEE
//! subnormals whatever the thread's floating-point modes ([`fpenv`]).

pub mod accum;
pub mod ada_cols;
pub mod ada_flat;
pub mod ada_piece;
pub mod ada_state;
pub mod adalomo;
pub mod convert;
pub mod fpenv;
pub mod lomo;
pub mod norm;
pub mod philox;
pub mod prefetch;
pub mod simd;
pub mod step;
pub mod sum_sq;

use std::sync::atomic::{AtomicU64, Ordering};

use once_cell::sync::Lazy;
use rayon::prelude::*;

use self::convert::Elem;
use super::RawBuf;

/// The most chunks one tensor is split into.
pub(crate) const MAX_CHUNKS: usize = 8;
/// Tensors smaller than this run on the calling thread.
pub(crate) const MIN_CHUNK_ELEMS: usize = 1 << 16;

static POOL: Lazy<rayon::ThreadPool> = Lazy::new(|| {
    let n = std::env::var("LOMO_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("lomo-cpu-{i}"))
        .build()
        .expect("building the CPU thread pool")
});

/// Threads of the CPU pool.
pub fn num_threads() -> usize {
    POOL.current_num_threads()
}

/// Number of chunks for `units` work units of `unit_elems` elements each.
pub fn chunk_count(units: usize, unit_elems: usize) -> usize {
    let elems = units.saturating_mul(unit_elems.max(1));
    elems
        .div_ceil(MIN_CHUNK_ELEMS)
        .clamp(1, MAX_CHUNKS)
        .min(units.max(1))
}

/// `[start, end)` of chunk `c` of `n_chunks` over `units` units.
pub fn chunk_range(units: usize, n_chunks: usize, c: usize) -> (usize, usize) {
    let per = units.div_ceil(n_chunks);
    ((c * per).min(units), ((c + 1) * per).min(units))
}

/// Runs `f(c)` for every chunk `c < n_chunks`, in parallel when there is more than one, each
/// under [`fpenv::ieee`].
pub fn for_each_chunk<F: Fn(usize) + Sync + Send>(n_chunks: usize, f: F) {
    if n_chunks <= 1 {
        fpenv::ieee(|| f(0));
    } else {
        POOL.install(|| {
            (0..n_chunks)
                .into_par_iter()
                .for_each(|c| fpenv::ieee(|| f(c)))
        });
    }
}

/// Runs `f(c, &mut items[c])` for every chunk, in parallel when there is more than one, each
/// under [`fpenv::ieee`].
pub fn for_each_chunk_mut<T: Send, F: Fn(usize, &mut T) + Sync + Send>(items: &mut [T], f: F) {
    if items.len() <= 1 {
        if let Some(first) = items.first_mut() {
            fpenv::ieee(|| f(0, first));
        }
    } else {
        POOL.install(|| {
            items
                .par_iter_mut()
                .enumerate()
                .for_each(|(c, t)| fpenv::ieee(|| f(c, t)))
        });
    }
}

/// Per-chunk f64 results in fixed slots, summed in chunk order (deterministic).
pub struct Partials([AtomicU64; MAX_CHUNKS]);

impl Partials {
    pub fn new() -> Partials {
        Partials(std::array::from_fn(|_| AtomicU64::new(0)))
    }
    pub fn set(&self, c: usize, v: f64) {
        self.0[c].store(v.to_bits(), Ordering::Relaxed);
    }
    pub fn sum(&self, n: usize) -> f64 {
        self.0[..n]
            .iter()
            .map(|a| f64::from_bits(a.load(Ordering::Relaxed)))
            .sum()
    }
}

impl Default for Partials {
    fn default() -> Self {
        Partials::new()
    }
}

impl RawBuf {
    /// The elements `[start, end)` as a typed slice.
    ///
    /// # Safety
    /// `addr` must point to `numel` valid, aligned elements of `T` (`T::DTYPE == dtype`) that
    /// nobody writes while the slice lives, and `start <= end <= numel`.
    pub unsafe fn slice<T: Elem>(&self, start: usize, end: usize) -> &[T] {
        debug_assert!(T::DTYPE == self.dtype && start <= end && end <= self.numel);
        // SAFETY: guaranteed by the caller (see above).
        unsafe { std::slice::from_raw_parts((self.addr as *const T).add(start), end - start) }
    }

    /// The elements `[start, end)` as a mutable typed slice.
    ///
    /// # Safety
    /// As for [`RawBuf::slice`], and no other reference to `[start, end)` may exist meanwhile.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut<T: Elem>(&self, start: usize, end: usize) -> &mut [T] {
        debug_assert!(T::DTYPE == self.dtype && start <= end && end <= self.numel);
        // SAFETY: guaranteed by the caller (see above).
        unsafe { std::slice::from_raw_parts_mut((self.addr as *mut T).add(start), end - start) }
    }
}

/// Runs `$body` with `$T` bound to the element type of `$dtype`.
macro_rules! with_dtype {
    ($dtype:expr, |$T:ident| $body:expr) => {
        match $dtype {
            $crate::dtype::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::dtype::DType::F16 => {
                type $T = $crate::backend::cpu::convert::F16;
                $body
            }
            $crate::dtype::DType::Bf16 => {
                type $T = $crate::backend::cpu::convert::Bf16;
                $body
            }
        }
    };
}
pub(crate) use with_dtype;

/// Runs `$body` with `$P` and `$G` bound to the element types of a parameter and a gradient.
macro_rules! with_dtypes {
    ($pd:expr, $gd:expr, |$P:ident, $G:ident| $body:expr) => {
        $crate::backend::cpu::with_dtype!($pd, |$P| $crate::backend::cpu::with_dtype!($gd, |$G| {
            $body
        }))
    };
}
pub(crate) use with_dtypes;

/// Sum of `lanes` (8-wide f32 accumulators) in a fixed order.
#[inline(always)]
pub fn lane_sum(lanes: &[f32; 8]) -> f32 {
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
}

/// Adds `v[k]` to lane `k % 8`; vectorizes to one add per 8 elements.
#[inline(always)]
pub fn lane_add(lanes: &mut [f32; 8], v: &[f32]) {
    let mut it = v.chunks_exact(8);
    for c in &mut it {
        for k in 0..8 {
            lanes[k] += c[k];
        }
    }
    for (k, &x) in it.remainder().iter().enumerate() {
        lanes[k] += x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_everything() {
        for units in [0usize, 1, 7, 100, 4097, 1 << 20] {
            for unit in [1usize, 3, 4096] {
                let n = chunk_count(units, unit);
                assert!((1..=MAX_CHUNKS).contains(&n));
                let mut next = 0;
                for c in 0..n {
                    let (a, b) = chunk_range(units, n, c);
                    assert_eq!(a, next);
                    next = b;
                }
                assert_eq!(next, units);
            }
        }
    }
}
