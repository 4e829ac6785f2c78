//! CPU backend: run-time selection of the SIMD code paths (baseline, AVX2+FMA, AVX-512).
//!
//! Hot loops are written once as `#[inline(always)]` bodies that LLVM vectorizes;
//! `multiversion!` compiles each body three times (baseline, AVX2+FMA, AVX-512) and picks one at
//! run time. `f32::mul_add` is a fused multiply-add on every path, so results are bit-identical across paths.

use once_cell::sync::Lazy;

/// The widest code path this CPU runs: 0 baseline, 1 AVX2+FMA, 2 AVX-512 (F, BW, VL).
static LEVEL: Lazy<u8> = Lazy::new(detect);

#[cfg(target_arch = "x86_64")]
fn detect() -> u8 {
    let cap = match std::env::var("LOMO_CPU_LEVEL").ok().as_deref() {
        Some("baseline") => 0,
        Some("avx2") => 1,
        _ => 2,
    };
    let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
    let avx512 = avx2
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl");
    (if avx512 {
        2
    } else if avx2 {
        1
    } else {
        0
    })
    .min(cap)
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> u8 {
    0
}

/// The code path in use: 0 baseline, 1 AVX2+FMA, 2 AVX-512. `LOMO_CPU_LEVEL=baseline|avx2`
/// caps it (all paths give bit-identical results: FMA is fused on each, and every reduction
/// uses explicit lanes).
pub fn level() -> u8 {
    *LEVEL
}

/// Whether a SIMD path (AVX2+FMA or wider) is used.
pub fn has_avx2_fma() -> bool {
    level() >= 1
}

/// Defines `fn name<T: Bound, ..>(args) -> ret` that runs `body` compiled for AVX2+FMA when the
/// CPU has them (generic parameters are optional).
macro_rules! multiversion {
    ($vis:vis fn $name:ident $(<$($g:ident : $b:path),*>)? ($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $vis fn $name $(<$($g: $b),*>)? ($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body $(<$($g: $b),*>)? ($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn fast $(<$($g: $b),*>)? ($($arg: $ty),*) $(-> $ret)? { body $(::<$($g),*>)? ($($arg),*) }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl")]
            unsafe fn wide $(<$($g: $b),*>)? ($($arg: $ty),*) $(-> $ret)? { body $(::<$($g),*>)? ($($arg),*) }
            #[cfg(target_arch = "x86_64")]
            match $crate::backend::cpu::simd::level() {
                // SAFETY: AVX-512 F/BW/VL, AVX2 and FMA were detected on this CPU at run time.
                2 => return unsafe { wide $(::<$($g),*>)? ($($arg),*) },
                // SAFETY: AVX2 and FMA were detected on this CPU at run time.
                1 => return unsafe { fast $(::<$($g),*>)? ($($arg),*) },
                _ => {}
            }
            body $(::<$($g),*>)? ($($arg),*)
        }
    };
}
pub(crate) use multiversion;
