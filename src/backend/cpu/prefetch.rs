//! CPU backend: software prefetch, a hint that changes no result.
//!
//! Pass A of AdaLomo works tile by tile in L1 (several short loops over each tile), so between
//! the first loads of two tiles the hardware prefetchers see no demand stream and the next tile's
//! lines arrive late; prefetching the next row's tiles while the current one is worked on keeps
//! the reads in flight.

/// Asks for the cache lines of `v` (into L1). Changes no value and never faults; a no-op off
/// x86-64.
#[inline(always)]
pub(crate) fn prefetch<T>(v: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let p = v.as_ptr() as *const i8;
        let bytes = std::mem::size_of_val(v);
        let mut o = 0;
        while o < bytes {
            // SAFETY: `p + o` lies inside `v`; a prefetch reads nothing architecturally and
            // cannot fault.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.add(o)) };
            o += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = v;
}
