//! CPU backend: [`CpuStep`], the [`Backend`] implementation over host memory. Its step record is
//! a handful of host values ([`HostStep`]) that the caller formed (the optimizer from its own
//! state, an XLA Host handler from its operands); its tensor records are [`CpuTensor`] fields.
//! The passes are [`super::norm`], [`super::lomo`] and [`super::adalomo`]; the scalars come from
//! [`crate::backend::scalars`]. Nothing here allocates.

use super::adalomo::{self, AdaWorkspace, ApplyArgs, StateView, StateViewMut, Stats, StatsArgs};
use super::convert::RoundCtx;
use super::{ada_cols, ada_flat, ada_piece};
use super::{lomo, norm};
use crate::backend::interface::{AccumOp, Backend, PhaseBegin, Record, TensorUpdate};
use crate::backend::{scalars, GradXform, RawBuf};
use crate::config::Config;
use crate::error::Result;

/// The per-step scalars of the CPU backend, as host values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HostStep {
    /// inv_scale (both phases), value clip and clip coefficient (UPDATE).
    pub xf: GradXform,
    /// UPDATE: the step's learning rate, before the group multiplier.
    pub lr: f64,
    /// UPDATE: AdaLomo's t (≥ 1) and the stochastic-rounding step.
    pub step: u64,
    /// UPDATE: the NORM phase found an overflow; no tensor changes.
    pub skip: bool,
}

/// The CPU backend in one call: the configuration and the host step record.
#[derive(Clone, Copy, Debug)]
pub struct CpuStep<'c> {
    /// Read: rounding, seed and AdaLomo's eps1, eps2, clip_threshold, decay_rate (the value
    /// clip is in `host.xf`; lr multiplier and weight decay come per tensor).
    pub cfg: &'c Config,
    pub host: HostStep,
}

/// AdaLomo's part of a [`CpuTensor`]: the state (updated only when the gradient is finite) and
/// the workspace holding pass A's results until pass C.
#[derive(Debug)]
pub struct CpuAda<'a> {
    pub state: StateViewMut<'a>,
    pub ws: &'a mut AdaWorkspace,
    /// Σp² carried from the previous apply (replaces the read of p for RMS(p)).
    pub carried_sum_sq: Option<f64>,
    /// Pass A's results.
    pub stats: Stats,
    /// Pass C ran (the state and the parameter changed).
    pub applied: bool,
    /// Σp² of the written values when pass C ran with `carry`.
    pub written_sum_sq: Option<f64>,
}

impl<'a> CpuAda<'a> {
    pub fn new(
        state: StateViewMut<'a>,
        ws: &'a mut AdaWorkspace,
        carried_sum_sq: Option<f64>,
    ) -> CpuAda<'a> {
        CpuAda {
            state,
            ws,
            carried_sum_sq,
            stats: Stats {
                finite: true,
                sum_u_sq: 0.0,
                sum_p_sq: 0.0,
            },
            applied: false,
            written_sum_sq: None,
        }
    }
}

/// A tensor held in pieces by several ranks: where this rank's piece lies and the buffer of its
/// partial statistics, which the core all-reduces between `ada_stats` (or `check_finite`) and
/// the pass that uses them.
#[derive(Debug)]
pub struct CpuPiece<'a> {
    /// Elements and rows of the global tensor's `[R, C]` view (`[numel, 1]` for rank ≤ 1).
    pub global_numel: usize,
    pub global_rows: usize,
    /// Global index of the piece's first element (a piece of columns: its first column).
    pub elem_offset: u64,
    /// A piece of columns of the `[R, C]` view: C (None: a range of rows or elements).
    pub cols_of: Option<usize>,
    /// AdaLomo: a flat range of a factored tensor (`ada_flat`; elements from `elem_offset`, rows
    /// cut anywhere). LOMO treats every piece as a range of elements.
    pub flat: bool,
    /// The partial record: AdaLomo `ada_piece::record_len` values (rows),
    /// `ada_cols::record_len` (columns) or `ada_flat::record_len` (flat); LOMO one value (the
    /// non-finite count).
    pub record: &'a mut [f64],
    /// AdaLomo columns and flat pieces: the round whose part of the record is reduced next (1,
    /// then 2), and mean(row) of the new rows after round 2.
    pub round: u8,
    pub row_mean: f32,
}

/// One tensor on the CPU: the parameter, AdaLomo's state and workspace, and the tensor record.
#[derive(Debug)]
pub struct CpuTensor<'a> {
    /// The parameter (a gradient-only NORM pass may pass any buffer of the gradient's length).
    pub param: RawBuf,
    /// AdaLomo state and workspace (None for LOMO and NORM-only tensors).
    pub ada: Option<CpuAda<'a>>,
    /// The tensor is a piece of a larger one (None: the whole tensor is here).
    pub piece: Option<CpuPiece<'a>>,
    /// Record: NORM's Σ(g·inv_scale)² over a finite gradient (0 otherwise).
    pub sum_sq: f64,
    /// Record: the gradient was finite (true until a pass finds otherwise).
    pub finite: bool,
}

impl<'a> CpuTensor<'a> {
    pub fn new(param: RawBuf, ada: Option<CpuAda<'a>>) -> CpuTensor<'a> {
        CpuTensor {
            param,
            ada,
            piece: None,
            sum_sq: 0.0,
            finite: true,
        }
    }

    /// Elements of the whole tensor (of this buffer when it is not a piece).
    fn global_numel(&self) -> usize {
        self.piece
            .as_ref()
            .map_or(self.param.numel, |p| p.global_numel)
    }
}

impl CpuStep<'_> {
    fn round(&self, u: &TensorUpdate, t: &CpuTensor<'_>) -> RoundCtx {
        RoundCtx {
            mode: self.cfg.rounding,
            seed: self.cfg.seed,
            step: self.host.step,
            param_id: u.param_id,
            offset: t.piece.as_ref().map_or(0, |p| p.elem_offset),
            cols: match t.piece.as_ref().and_then(|p| p.cols_of) {
                Some(_) => local_cols(t),
                None => 0,
            },
            row_stride: t.piece.as_ref().and_then(|p| p.cols_of).unwrap_or(0) as u64,
        }
    }

    fn stats_args(&self, need_psq: bool) -> StatsArgs {
        let (beta, one_minus_beta) = scalars::adalomo_beta(self.host.step, self.cfg.decay_rate);
        StatsArgs {
            xf: self.host.xf,
            beta,
            one_minus_beta,
            eps1: self.cfg.eps1 as f32,
            need_psq,
        }
    }

    /// The tensor's lr after the group multiplier (f64, as lomo-optim forms it).
    fn lr(&self, u: &TensorUpdate) -> f64 {
        self.host.lr * u.lr_multiplier
    }
}

/// Width of the local buffer of a piece of columns: numel / rows of the `[R, C]` view.
fn local_cols(t: &CpuTensor<'_>) -> u64 {
    let rows = t.piece.as_ref().map_or(1, |p| p.global_rows).max(1);
    (t.param.numel / rows) as u64
}

fn ada<'t, 'a>(ada: &'t mut Option<CpuAda<'a>>) -> &'t mut CpuAda<'a> {
    ada.as_mut().expect("AdaLomo tensors carry AdaLomo state")
}

impl Backend for CpuStep<'_> {
    type Tensor<'t> = CpuTensor<'t>;

    fn accumulate(&self, acc: &RawBuf, g: Option<&RawBuf>, op: &AccumOp) -> Result<()> {
        super::accum::accumulate(acc, g, op);
        Ok(())
    }

    fn phase_begin(&self, _begin: &PhaseBegin) -> Result<()> {
        Ok(())
    }

    fn norm(&self, t: &mut CpuTensor<'_>, g: &RawBuf) -> Result<()> {
        if g.numel > 0 {
            (t.sum_sq, t.finite) = norm::grad_sum_sq(g, self.host.xf.inv_scale);
        }
        Ok(())
    }

    fn check_finite(&self, t: &mut CpuTensor<'_>, g: &RawBuf) -> Result<()> {
        if g.numel > 0 && !self.host.skip {
            t.finite = norm::grad_all_finite(g);
        }
        if let Some(p) = t.piece.as_mut() {
            p.record.fill(0.0);
            p.record[0] = (!t.finite) as u32 as f64;
        }
        Ok(())
    }

    fn lomo(&self, t: &mut CpuTensor<'_>, g: &RawBuf, u: &TensorUpdate) -> Result<()> {
        if let (Some(p), false) = (t.piece.as_ref(), u.prechecked || u.per_element) {
            // The reduced count of pieces with a non-finite gradient.
            t.finite = p.record[0] == 0.0;
        }
        if t.param.numel == 0 || self.host.skip || !t.finite {
            return Ok(());
        }
        let (decay, neg_lr) = scalars::lomo_scalars(self.lr(u), u.weight_decay);
        if !(decay.is_finite() && neg_lr.is_finite()) {
            t.finite = false; // lr · weight_decay or lr overflows f32: nothing is written
            return Ok(());
        }
        let args = lomo::LomoArgs {
            xf: self.host.xf,
            decay,
            neg_lr,
            round: self.round(u, t),
            per_element: u.per_element,
        };
        t.finite = lomo::lomo_update(&t.param, g, &args);
        Ok(())
    }

    fn ada_stats(&self, t: &mut CpuTensor<'_>, g: &RawBuf, _u: &TensorUpdate) -> Result<()> {
        if t.global_numel() == 0 || self.host.skip {
            return Ok(());
        }
        let param = t.param;
        let (a, piece) = (ada(&mut t.ada), t.piece.as_mut());
        let st = self.stats_args(a.carried_sum_sq.is_none());
        match piece {
            None => {
                a.stats = adalomo::stats(&param, g, a.state.as_view(), a.ws, &st);
                t.finite = a.stats.finite;
            }
            Some(p) if p.cols_of.is_some() => {
                p.round = 1;
                ada_cols::stats(&param, g, a.ws, &st, a.carried_sum_sq, p.record);
            }
            Some(p) if p.flat => {
                p.round = 1;
                let (view, o) = (a.state.as_view(), p.elem_offset as usize);
                let rec = &mut *p.record;
                super::fpenv::ieee(|| {
                    ada_flat::stats(&param, g, view, a.ws, &st, a.carried_sum_sq, rec, o)
                });
            }
            Some(p) => {
                let view = a.state.as_view();
                ada_piece::stats(&param, g, view, a.ws, &st, a.carried_sum_sq, p.record);
            }
        }
        Ok(())
    }

    fn ada_next_round(&self, t: &mut CpuTensor<'_>, g: &RawBuf, _u: &TensorUpdate) -> Result<bool> {
        if t.global_numel() == 0 || self.host.skip {
            return Ok(false);
        }
        let (a, piece) = (ada(&mut t.ada), t.piece.as_mut());
        let Some(p) = piece.filter(|p| (p.cols_of.is_some() || p.flat) && p.round == 1) else {
            return Ok(false);
        };
        let st = self.stats_args(a.carried_sum_sq.is_none());
        if p.flat {
            if !ada_flat::finite(p.record) {
                return Ok(false);
            }
            let (view, o) = (a.state.as_view(), p.elem_offset as usize);
            let (ws, record) = (&mut *a.ws, &mut *p.record);
            p.row_mean = super::fpenv::ieee(|| ada_flat::second(g, view, ws, &st, record, o));
            p.round = 2;
            return Ok(true);
        }
        if !ada_cols::finite(p.record) {
            return Ok(false);
        }
        let global_cols = p.cols_of.unwrap_or(0);
        let view = a.state.as_view();
        let ws = &mut *a.ws;
        let record = &mut *p.record;
        p.row_mean = super::fpenv::ieee(|| ada_cols::second(g, view, ws, &st, record, global_cols));
        p.round = 2;
        Ok(true)
    }

    fn ada_apply(&self, t: &mut CpuTensor<'_>, g: &RawBuf, u: &TensorUpdate) -> Result<()> {
        let n = t.global_numel();
        if n == 0 || self.host.skip {
            return Ok(());
        }
        let round = self.round(u, t);
        let param = t.param;
        let (a, piece) = (ada(&mut t.ada), t.piece.as_ref());
        let (sum_u_sq, sum_p_sq) = match piece {
            None if !t.finite => return Ok(()),
            None => (
                a.stats.sum_u_sq,
                a.carried_sum_sq.unwrap_or(a.stats.sum_p_sq),
            ),
            Some(p) if p.cols_of.is_some() => {
                if !ada_cols::finite(p.record) {
                    t.finite = false;
                    return Ok(());
                }
                let r2 = p.record[p.record.len() - 1];
                (r2 * p.row_mean as f64, ada_cols::sum_p_sq(p.record))
            }
            Some(p) if p.flat => {
                if !ada_flat::finite(p.record) {
                    t.finite = false;
                    return Ok(());
                }
                let r2 = p.record[p.record.len() - 1];
                (r2 * p.row_mean as f64, ada_flat::sum_p_sq(p.record))
            }
            Some(p) => {
                if !ada_piece::finite(p.record) {
                    t.finite = false;
                    return Ok(());
                }
                let st = self.stats_args(a.carried_sum_sq.is_none());
                // Reads the old column state; the new one goes to the workspace.
                let col_old = match a.state.as_view() {
                    StateView::Factored { col, .. } => Some(col),
                    StateView::Vector { .. } => None,
                };
                let ws = &mut *a.ws;
                let sum_u_sq = super::fpenv::ieee(|| {
                    ada_piece::finalize(ws, col_old, p.record, p.global_rows, &st)
                });
                (sum_u_sq, ada_piece::sum_p_sq(p.record))
            }
        };
        let rms = scalars::param_rms(sum_p_sq, n);
        let (decay, neg_lr) =
            scalars::adalomo_scalars(self.lr(u), u.weight_decay, self.cfg.eps2, rms);
        let inv_clip = 1.0 / scalars::update_clip(sum_u_sq, n, self.cfg.clip_threshold);
        // Finite gradients can still overflow the f32 statistics (g² for |g/S| ≳ 1.8e19, Σp² for
        // parameters above ~1.8e19) or the scalars: that step would write NaN or silently zero
        // updates, so it is refused like a non-finite gradient, before anything changes.
        let clean = sum_u_sq.is_finite()
            && rms.is_finite()
            && a.ws.new_state_finite()
            && decay.is_finite()
            && neg_lr.is_finite()
            && inv_clip.is_finite();
        if !clean {
            t.finite = false;
            return Ok(());
        }
        adalomo::commit(a.state.reborrow(), a.ws);
        let args = ApplyArgs {
            xf: self.host.xf,
            inv_clip,
            decay,
            neg_lr,
            round,
            carry: u.carry,
        };
        let flat_at = piece.filter(|p| p.flat).map(|p| p.elem_offset as usize);
        let (written, no_overflow) = if let Some(o) = flat_at {
            super::fpenv::ieee(|| ada_flat::apply(&param, g, a.ws, &args, o))
        } else if param.numel > 0 {
            adalomo::apply(&param, g, a.ws, &args)
        } else {
            (0.0, true)
        };
        a.applied = true;
        a.written_sum_sq = u.carry.then_some(written);
        // Elements whose new value would overflow the dtype kept their old value: reported.
        t.finite = no_overflow;
        Ok(())
    }

    fn partials<'s>(&self, t: &'s mut CpuTensor<'_>) -> Option<Record<'s>> {
        let ada = t.ada.is_some();
        t.piece.as_mut().map(|p| {
            Record::Host(if ada && (p.cols_of.is_some() || p.flat) {
                // Two rounds: the record less its last value, then that value.
                ada_cols::round_mut(p.record, p.round)
            } else {
                &mut *p.record
            })
        })
    }

    /// The host holds the CPU backend's phase totals (the core reduces them itself).
    fn phase_record(&self, _update: bool) -> Result<Option<Record<'_>>> {
        Ok(None)
    }

    fn reduce_host(
        &self,
        rec: &mut [f64],
        reduce: &mut dyn FnMut(Record<'_>) -> Result<()>,
    ) -> Result<()> {
        reduce(Record::Host(rec))
    }

    fn phase_end(&self, _update: bool, _reduced: bool) -> Result<()> {
        Ok(())
    }
}
