//! CPU backend, LOMO update (`reference/semantics.md` §2.4), one fused pass over p and g:
//!
//! ```text
//! x = clamp(g / S, −v, v) · c          p ← round( fma(x, −lr, p · (1 − lr·wd)) )
//! ```
//!
//! Non-finite gradients: with the per-tensor policy the core pre-checks the gradient
//! (`norm::grad_all_finite`) and calls this only when it is finite; with the per-element policy
//! (`LomoArgs::per_element`) this is the only pass, and an element whose gradient is not finite
//! keeps its value.

use super::convert::{Elem, RoundCtx, TILE};
use super::simd::multiversion;
use super::{chunk_count, chunk_range, for_each_chunk, with_dtypes, Partials};
use crate::backend::{GradXform, RawBuf};
use crate::config::Rounding;

/// Scalars of one LOMO update.
#[derive(Clone, Copy, Debug)]
pub struct LomoArgs {
    pub xf: GradXform,
    pub decay: f32,
    pub neg_lr: f32,
    pub round: RoundCtx,
    /// `NonFinitePolicy::PerElement`: one streaming pass without staging tiles; an element whose
    /// gradient is not finite keeps its value (instead of its tile not being written).
    pub per_element: bool,
}

/// Applies the update in place and returns whether it was clean: the gradient finite and every
/// new value finite. Each tile is checked before it is written, so a non-finite element never
/// reaches the parameter: a tile with a non-finite gradient element is not written (the caller
/// runs `norm::grad_all_finite` first when the whole tensor must be left untouched in that
/// case; with `per_element` only those elements keep their value), and an element whose new
/// value overflows the parameter's dtype keeps its old value
/// (finite inputs can only give ±inf by overflow, never NaN).
pub fn lomo_update(param: &RawBuf, grad: &RawBuf, args: &LomoArgs) -> bool {
    let n = param.numel;
    let chunks = chunk_count(n, 1);
    let bad = Partials::new();
    for_each_chunk(chunks, |c| {
        let (a, b) = chunk_range(n, chunks, c);
        let ok = with_dtypes!(param.dtype, grad.dtype, |P, G| {
            // SAFETY: the core validated both buffers for `numel` elements; chunks are disjoint,
            // so this is the only reference to p[a..b]; the gradient is only read.
            let (p, g) = unsafe { (param.slice_mut::<P>(a, b), grad.slice::<G>(a, b)) };
            chunk_update::<P, G>(p, g, args, a as u64)
        });
        if !ok {
            bad.set(c, 1.0);
        }
    });
    bad.sum(chunks) == 0.0
}

multiversion! {
    fn chunk_update<P: Elem, G: Elem>(p: &mut [P], g: &[G], args: &LomoArgs, elem0: u64) -> bool {
        if args.per_element {
            return chunk_update_per_element::<P, G>(p, g, args, elem0);
        }
        let (xf, neg_lr, decay) = (args.xf, args.neg_lr, args.decay);
        let identity = xf.is_identity();
        // Each tile is computed into `tmp` (in L1) while its gradient is checked, and written
        // back only if every element was finite: one pass over p and g, streamed together.
        let mut tmp = [P::from_f32_rne(0.0); TILE];
        let mut clean = true;
        for (t, (pt, gt)) in p.chunks_mut(TILE).zip(g.chunks(TILE)).enumerate() {
            let out = &mut tmp[..pt.len()];
            let mut bad = 0u32;
            // Whether some |result| before rounding exceeds the dtype's largest value (NaN cannot
            // arise from finite operands): a tile within the range cannot round to infinity
            // under round-to-nearest, nor under stochastic rounding, which never rounds past the
            // next representable value.
            let mut big = 0u32;
            match args.round.mode {
                Rounding::Nearest if identity => {
                    for ((o, pv), gv) in out.iter_mut().zip(pt.iter()).zip(gt) {
                        bad |= (!gv.is_finite_bits()) as u32;
                        let r = gv.to_f32().mul_add(neg_lr, pv.to_f32() * decay);
                        big |= (r.abs() > P::MAX_F32) as u32;
                        *o = P::from_f32_rne(r);
                    }
                }
                Rounding::Nearest => {
                    for ((o, pv), gv) in out.iter_mut().zip(pt.iter()).zip(gt) {
                        bad |= (!gv.is_finite_bits()) as u32;
                        let x = xf.apply(gv.to_f32());
                        let r = x.mul_add(neg_lr, pv.to_f32() * decay);
                        big |= (r.abs() > P::MAX_F32) as u32;
                        *o = P::from_f32_rne(r);
                    }
                }
                Rounding::Stochastic => {
                    let e0 = elem0 + (t * TILE) as u64;
                    for (k, ((o, pv), gv)) in out.iter_mut().zip(pt.iter()).zip(gt).enumerate() {
                        bad |= (!gv.is_finite_bits()) as u32;
                        let x = xf.apply(gv.to_f32());
                        let r = x.mul_add(neg_lr, pv.to_f32() * decay);
                        big |= (r.abs() > P::MAX_F32) as u32;
                        *o = args.round.store(r, e0 + k as u64);
                    }
                }
            }
            if bad != 0 {
                return false;
            }
            if big == 0 {
                pt.copy_from_slice(out);
            } else {
                // Near the range's end: an element that rounded to infinity keeps its value.
                for (pv, o) in pt.iter_mut().zip(out.iter()) {
                    if o.is_finite_bits() {
                        *pv = *o;
                    } else {
                        clean = false;
                    }
                }
            }
        }
        clean
    }
}

/// The per-element policy's pass: one stream over p and g with no staging tile; each element
/// takes its new value when its gradient and the new value are finite, else keeps its own (the
/// same arithmetic as `chunk_update`, so written values are bit for bit the same). Returns
/// whether every element was written.
#[inline(always)]
fn chunk_update_per_element<P: Elem, G: Elem>(
    p: &mut [P],
    g: &[G],
    args: &LomoArgs,
    elem0: u64,
) -> bool {
    let (xf, neg_lr, decay) = (args.xf, args.neg_lr, args.decay);
    let mut kept = 0u32;
    match args.round.mode {
        Rounding::Nearest if xf.is_identity() => {
            for (pv, gv) in p.iter_mut().zip(g) {
                let r = gv.to_f32().mul_add(neg_lr, pv.to_f32() * decay);
                let nv = P::from_f32_rne(r);
                let ok = gv.is_finite_bits() & nv.is_finite_bits();
                kept |= (!ok) as u32;
                *pv = if ok { nv } else { *pv };
            }
        }
        Rounding::Nearest => {
            for (pv, gv) in p.iter_mut().zip(g) {
                let r = xf.apply(gv.to_f32()).mul_add(neg_lr, pv.to_f32() * decay);
                let nv = P::from_f32_rne(r);
                let ok = gv.is_finite_bits() & nv.is_finite_bits();
                kept |= (!ok) as u32;
                *pv = if ok { nv } else { *pv };
            }
        }
        Rounding::Stochastic => {
            for (k, (pv, gv)) in p.iter_mut().zip(g).enumerate() {
                let r = xf.apply(gv.to_f32()).mul_add(neg_lr, pv.to_f32() * decay);
                let nv: P = args.round.store(r, elem0 + k as u64);
                let ok = gv.is_finite_bits() & nv.is_finite_bits();
                kept |= (!ok) as u32;
                *pv = if ok { nv } else { *pv };
            }
        }
    }
    kept == 0
}
