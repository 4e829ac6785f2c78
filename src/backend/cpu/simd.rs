//! CPU backend: run-time selection of AVX2+FMA code paths.
//!
//! Hot loops are written once as `#[inline(always)]` bodies over fixed-size f32 tiles that LLVM
//! vectorizes; [`multiversion!`] compiles each body twice (baseline and AVX2+FMA) and picks one at
//! run time. `f32::mul_add` is a fused multiply-add on both paths, so results are bit-identical.

use once_cell::sync::Lazy;

static AVX2_FMA: Lazy<bool> = Lazy::new(detect);

#[cfg(target_arch = "x86_64")]
fn detect() -> bool {
    std::env::var_os("LOMO_CPU_BASELINE").is_none()
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> bool {
    false
}

/// Whether the AVX2+FMA paths are used (set `LOMO_CPU_BASELINE=1` to force the baseline path).
pub fn has_avx2_fma() -> bool {
    *AVX2_FMA
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
            if $crate::backend::cpu::simd::has_avx2_fma() {
                // SAFETY: AVX2 and FMA were detected on this CPU at run time.
                return unsafe { fast $(::<$($g),*>)? ($($arg),*) };
            }
            body $(::<$($g),*>)? ($($arg),*)
        }
    };
}
pub(crate) use multiversion;
