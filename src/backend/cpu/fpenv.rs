//! IEEE-754 arithmetic for the CPU backend, whatever the calling thread's floating-point
//! environment.
//!
//! Flush-to-zero (results below 2^-126 become 0) and denormals-are-zero (such operands read as
//! 0) are per-thread modes that other code sets behind our back: XLA's CPU runtime runs custom
//! calls with both set, a program linked with `-ffast-math` / `-Ofast` sets them at start-up
//! (`crtfastmath.o`), `torch.set_flush_denormal(True)` sets them, and threads inherit them from
//! the thread that creates them (our pool is created lazily by whichever thread calls first).
//! Under them, the same step on the same inputs would give other values on the CPU than on the
//! GPU (NVRTC compiles with `-ftz=false`) and than lomo-optim. The rounding direction is a
//! per-thread mode too (`fesetround`): a caller that rounds toward zero or upward would change
//! every f32 result and every f64→f32 conversion by up to one ulp. [`ieee`] clears the flush
//! modes and sets round-to-nearest-even for the duration of one piece of work, and restores the
//! caller's modes afterwards (also when the work panics).
//!
//! x86-64: MXCSR bits DAZ (6), RC (13–14) and FTZ (15). AArch64: FPCR bits FIZ (0), FZ16 (19),
//! RMode (22–23) and FZ (24). Elsewhere: nothing to do.

/// Runs `f` with flush-to-zero and denormals-are-zero cleared and round-to-nearest-even set on
/// this thread, then restores the thread's previous modes. Costs one register read when the
/// modes are already the IEEE defaults.
#[inline]
pub fn ieee<R>(f: impl FnOnce() -> R) -> R {
    let saved = arch::read();
    let want = saved & !arch::MODE_BITS;
    if want == saved {
        return f();
    }
    let _restore = Restore(saved);
    arch::write(want);
    // Not inlined: the work cannot be scheduled across the mode switch.
    call(f)
}

#[inline(never)]
fn call<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Puts the caller's modes back when dropped (the work may unwind).
struct Restore(arch::Word);

impl Drop for Restore {
    fn drop(&mut self) {
        arch::write(self.0);
    }
}

#[cfg(target_arch = "x86_64")]
mod arch {
    pub(super) type Word = u32;
    /// MXCSR: DAZ (bit 6) and FTZ (bit 15).
    pub(super) const FLUSH_BITS: Word = (1 << 6) | (1 << 15);
    /// The flush bits and RC (bits 13–14; 0 = round to nearest even).
    pub(super) const MODE_BITS: Word = FLUSH_BITS | (3 << 13);

    pub(super) fn read() -> Word {
        let mut csr: u32 = 0;
        // SAFETY: STMXCSR stores the 32-bit MXCSR into the pointed-to local (SSE is part of the
        // x86-64 baseline); it touches no other memory and no flags.
        unsafe {
            std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr as *mut u32,
                options(nostack, preserves_flags));
        }
        csr
    }

    pub(super) fn write(csr: Word) {
        // SAFETY: LDMXCSR loads MXCSR from the pointed-to local; the value is one read from
        // MXCSR with only the DAZ/FTZ/RC bits changed, so no reserved bit is set (which would
        // fault). It changes only this thread's SSE modes.
        unsafe {
            std::arch::asm!("ldmxcsr [{}]", in(reg) &csr as *const u32,
                options(nostack, preserves_flags, readonly));
        }
    }
}

#[cfg(target_arch = "aarch64")]
mod arch {
    pub(super) type Word = u64;
    /// FPCR: FIZ (bit 0, FEAT_AFP; RES0 elsewhere), FZ16 (bit 19) and FZ (bit 24).
    pub(super) const FLUSH_BITS: Word = (1 << 0) | (1 << 19) | (1 << 24);
    /// The flush bits and RMode (bits 22–23; 0 = round to nearest even).
    pub(super) const MODE_BITS: Word = FLUSH_BITS | (3 << 22);

    pub(super) fn read() -> Word {
        let v: u64;
        // SAFETY: reading FPCR is allowed at EL0 and has no side effects.
        unsafe {
            std::arch::asm!("mrs {}, fpcr", out(reg) v, options(nomem, nostack, preserves_flags));
        }
        v
    }

    pub(super) fn write(v: Word) {
        // SAFETY: writing FPCR is allowed at EL0; the value is one read from FPCR with only
        // flush and rounding bits cleared (clearing a RES0 bit is harmless). It changes only this thread's
        // floating-point modes.
        unsafe {
            std::arch::asm!("msr fpcr, {}", in(reg) v, options(nostack, preserves_flags));
        }
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
mod arch {
    pub(super) type Word = u32;
    pub(super) const FLUSH_BITS: Word = 0;
    pub(super) const MODE_BITS: Word = 0;
    pub(super) fn read() -> Word {
        0
    }
    pub(super) fn write(_: Word) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` with flush-to-zero and denormals-are-zero SET on this thread (the environment
    /// XLA's CPU runtime and `-ffast-math` programs give), restoring the modes after.
    fn flushing<R>(f: impl FnOnce() -> R) -> R {
        let saved = arch::read();
        let _restore = Restore(saved);
        arch::write(saved | arch::FLUSH_BITS);
        call(f)
    }

    /// 2^-140 (an f32 subnormal) times 0.5, computed at run time (not constant-folded).
    #[inline(never)]
    fn halve(x: f32) -> f32 {
        std::hint::black_box(x) * std::hint::black_box(0.5f32)
    }

    #[test]
    fn ieee_clears_the_flush_modes_and_restores_them() {
        let tiny = f32::from_bits(1 << 14); // 2^-135, subnormal
        if arch::FLUSH_BITS == 0 {
            return; // no such modes on this architecture
        }
        flushing(|| {
            assert_eq!(halve(tiny), 0.0, "the test environment must flush");
            let got = ieee(|| halve(tiny));
            assert_eq!(got.to_bits(), 1 << 13, "2^-136 under ieee()");
            assert_eq!(halve(tiny), 0.0, "the caller's modes are restored");
        });
        assert_eq!(halve(tiny).to_bits(), 1 << 13);
    }

    /// 1 + 2^-24 (halfway between two f32), computed at run time from f64.
    #[inline(never)]
    fn narrow(x: f64) -> f32 {
        std::hint::black_box(x) as f32
    }

    #[test]
    fn ieee_rounds_to_nearest_whatever_the_callers_rounding_mode() {
        if arch::MODE_BITS == arch::FLUSH_BITS {
            return;
        }
        let x = 1.0 + 3.0 * 2f64.powi(-25); // nearest: 1 + 2^-23; toward zero: 1
        let want = narrow(x);
        assert_eq!(want, 1.0 + f32::EPSILON);
        let rc = arch::MODE_BITS & !arch::FLUSH_BITS;
        let toward_zero = rc; // both RC bits: x86 11 = toward zero; AArch64 11 = toward zero
        let saved = arch::read();
        let _restore = Restore(saved);
        arch::write(saved | toward_zero);
        assert_eq!(narrow(x), 1.0, "the test environment must truncate");
        assert_eq!(ieee(|| narrow(x)), want);
        assert_eq!(
            arch::read(),
            saved | toward_zero,
            "the caller's mode is restored"
        );
    }

    #[test]
    fn ieee_restores_the_modes_when_the_work_panics() {
        if arch::FLUSH_BITS == 0 {
            return;
        }
        flushing(|| {
            let r = std::panic::catch_unwind(|| ieee(|| panic!("work failed")));
            assert!(r.is_err());
            assert_eq!(arch::read() & arch::FLUSH_BITS, arch::FLUSH_BITS);
        });
    }
}
