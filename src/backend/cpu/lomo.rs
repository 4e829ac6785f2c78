//! CPU backend, LOMO update (`reference/semantics.md` §2.4), one pass over p and g:
//!
//! ```text
//! x = clamp(g / S, −v, v) · c          p ← round( fma(x, −lr, p · (1 − lr·wd)) )
//! ```

use super::convert::{RoundCtx, Src, TILE};
use super::simd::multiversion;
use super::{chunk_count, chunk_range, for_each_chunk, Partials};
use crate::backend::{GradXform, RawBuf};

/// Scalars of one LOMO update.
#[derive(Clone, Copy, Debug)]
pub struct LomoArgs {
    pub xf: GradXform,
    pub decay: f32,
    pub neg_lr: f32,
    pub round: RoundCtx,
}

/// Applies the update in place and returns whether the gradient was finite. Each tile is checked
/// before it is written, so a non-finite element never reaches the parameter; the caller runs
/// `norm::grad_all_finite` first when the whole tensor must be left untouched in that case.
pub fn lomo_update(param: &RawBuf, grad: &RawBuf, args: &LomoArgs) -> bool {
    let n = param.numel;
    let chunks = chunk_count(n, 1);
    let bad = Partials::new();
    for_each_chunk(chunks, |c| {
        let (a, b) = chunk_range(n, chunks, c);
        // SAFETY: the core validated both buffers for `numel` elements; chunks are disjoint, so
        // this is the only view of p[a..b]; the gradient is only read.
        let (mut p, g) = unsafe { (param.dst(a, b), grad.src(a, b)) };
        if !chunk_update(&mut p, g, args, a as u64) {
            bad.set(c, 1.0);
        }
    });
    bad.sum(chunks) == 0.0
}

multiversion! {
    fn chunk_update(p: &mut super::convert::Dst<'_>, g: Src<'_>, args: &LomoArgs, elem0: u64) -> bool {
        let n = g.len();
        let mut gx = [0f32; TILE];
        let mut px = [0f32; TILE];
        let mut start = 0;
        while start < n {
            let len = TILE.min(n - start);
            if !g.all_finite(start, start + len) {
                return false;
            }
            let (gt, pt) = (&mut gx[..len], &mut px[..len]);
            g.load(start, gt);
            p.as_src().load(start, pt);
            for (pv, &gv) in pt.iter_mut().zip(gt.iter()) {
                let x = args.xf.apply(gv);
                *pv = x.mul_add(args.neg_lr, *pv * args.decay);
            }
            p.store(start, pt, &args.round, elem0 + start as u64);
            start += len;
        }
        true
    }
}
