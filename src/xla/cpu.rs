//! XLA FFI layer, Host platform: runs the decoded plans on host memory through the core's one
//! orchestration (`crate::orchestrate`) on the CPU backend, exactly as the C API does; the step
//! record is the call's scalar operands (`HostStep`), the state XLA's buffers.
//!
//! AdaLomo workspaces are cached per `(rows, cols, factored)` in a process-wide pool: a call
//! takes one out (or allocates it the first time), uses it, and puts it back, so steady-state
//! steps allocate nothing and concurrent calls on equal shapes each get their own.

use std::collections::HashMap;

use once_cell::sync::Lazy;
use parking_lot::Mutex;

use super::abi::dtype;
use super::frame::{invalid, Buffer, XResult};
use super::ops::{
    check_aligned, overlaps, AdaPlan, AdaStatePlan, Grad, InOut, LomoPlan, NormPlan, Scalars,
};
use crate::backend::cpu::adalomo::{AdaWorkspace, StateViewMut};
use crate::backend::cpu::step::{CpuAda, CpuStep, CpuTensor, HostStep};
use crate::backend::{GradXform, RawBuf};
use crate::config::Algorithm;
use crate::orchestrate::{self, PhaseTotals, TensorPass};

/// `(rows, cols, factored, column piece)`.
type WsKey = (usize, usize, bool, bool);

static WORKSPACES: Lazy<Mutex<HashMap<WsKey, Vec<AdaWorkspace>>>> =
    Lazy::new(|| Mutex::new(HashMap::new()));

/// A workspace borrowed from the pool; returned on drop.
pub(super) struct PooledWs {
    key: WsKey,
    pub(super) ws: Option<AdaWorkspace>,
}

impl PooledWs {
    /// A cached workspace, or a new one (`OutOfMemory` if it cannot be allocated).
    pub(super) fn take(rows: usize, cols: usize, factored: bool) -> crate::error::Result<PooledWs> {
        Self::take_for(rows, cols, factored, false)
    }

    /// [`PooledWs::take`], prepared for a piece of columns (`ada_cols`) when `cols_piece`.
    pub(super) fn take_for(
        rows: usize,
        cols: usize,
        factored: bool,
        cols_piece: bool,
    ) -> crate::error::Result<PooledWs> {
        let key = (rows, cols, factored, cols_piece);
        let cached = WORKSPACES.lock().get_mut(&key).and_then(|v| v.pop());
        let ws = match cached {
            Some(ws) => ws,
            None => {
                let mut ws = AdaWorkspace::new(rows, cols, factored)?;
                if cols_piece {
                    ws.prepare_cols()?;
                }
                ws
            }
        };
        Ok(PooledWs { key, ws: Some(ws) })
    }
}

impl Drop for PooledWs {
    fn drop(&mut self) {
        if let Some(ws) = self.ws.take() {
            WORKSPACES.lock().entry(self.key).or_default().push(ws);
        }
    }
}

/// The per-step scalars, read from host memory and checked as `lomo_step_begin` checks them.
pub(super) struct Hyper {
    lr: f32,
    inv_scale: f32,
    /// None: the clip coefficient is not finite (the norm pass found an overflow): skip.
    pub(super) coef: Option<f32>,
    step: u64,
}

pub(super) fn read_f32(b: &Buffer<'_>) -> f32 {
    // SAFETY: the plan checked a one-element f32 buffer; on the Host platform it is host memory.
    unsafe { b.data.cast::<f32>().read_unaligned() }
}

pub(super) fn hyper(s: &Scalars<'_>) -> XResult<Hyper> {
    let (lr, scale, coef) = (
        read_f32(&s.lr),
        read_f32(&s.loss_scale),
        read_f32(&s.clip_coef),
    );
    // SAFETY: the plan checked a one-element integer buffer of the tagged dtype (host memory).
    let step: i128 = unsafe {
        match s.step.dtype {
            dtype::S32 => s.step.data.cast::<i32>().read_unaligned() as i128,
            dtype::S64 => s.step.data.cast::<i64>().read_unaligned() as i128,
            dtype::U32 => s.step.data.cast::<u32>().read_unaligned() as i128,
            _ => s.step.data.cast::<u64>().read_unaligned() as i128,
        }
    };
    if !(lr.is_finite() && lr >= 0.0) {
        invalid!("lr must be finite and >= 0, got {lr}");
    }
    let inv_scale = inv_scale(scale)?;
    if step < 1 {
        invalid!("step must be >= 1 (the first update is step 1), got {step}");
    }
    if coef < 0.0 {
        invalid!("clip_coef must be >= 0 (or non-finite to skip the step), got {coef}");
    }
    Ok(Hyper {
        lr,
        inv_scale,
        coef: coef.is_finite().then_some(coef),
        step: step as u64,
    })
}

/// 1 / loss scale, formed as the core forms it (in f64, rounded to f32).
pub(super) fn inv_scale(scale: f32) -> XResult<f32> {
    if !(scale.is_finite() && scale > 0.0) {
        invalid!("loss_scale must be finite and > 0, got {scale}");
    }
    Ok((1.0 / scale as f64) as f32)
}

pub(super) fn write_pred(b: &Buffer<'_>, v: bool) {
    // SAFETY: the plan checked a one-element PRED result (one byte of host memory).
    unsafe { b.data.cast::<u8>().write(v as u8) }
}

pub(super) fn write_f32(b: &Buffer<'_>, v: f32) {
    // SAFETY: the plan checked a one-element f32 result in host memory.
    unsafe { b.data.cast::<f32>().write_unaligned(v) }
}

/// Makes the result hold the operand's values (a copy unless XLA aliased them) and returns it.
pub(super) fn materialize(io: &InOut<'_>, what: &str) -> XResult<RawBuf> {
    check_aligned(&io.input, io.elem_size, io.numel, what)?;
    check_aligned(&io.output, io.elem_size, io.numel, what)?;
    if io.numel > 0 && !io.aliased() {
        // SAFETY: both buffers hold `numel` elements of the same dtype (checked by the plan);
        // `copy` tolerates overlap, though XLA never overlaps distinct buffers.
        unsafe {
            std::ptr::copy(
                io.input.data.cast::<u8>(),
                io.output.data.cast::<u8>(),
                io.bytes(),
            )
        };
    }
    let dtype = match io.input.dtype {
        dtype::F32 => crate::dtype::DType::F32,
        dtype::F16 => crate::dtype::DType::F16,
        _ => crate::dtype::DType::Bf16,
    };
    Ok(RawBuf {
        addr: io.output.data as usize,
        dtype,
        numel: io.numel,
    })
}

/// The gradient as a RawBuf; copied to `scratch` first if it shares memory with a result
/// (XLA may hand the same buffer to an operand and another operand's aliased result).
pub(super) fn grad_buf(
    g: &Grad<'_>,
    outputs: &[&InOut<'_>],
    scratch: &mut Vec<u64>,
) -> XResult<RawBuf> {
    check_aligned(&g.buf, g.dtype.size(), g.numel, "grad")?;
    let bytes = g.numel.saturating_mul(g.dtype.size());
    let addr = g.buf.data as usize;
    let clash = outputs
        .iter()
        .any(|o| overlaps(addr, bytes, o.output.data as usize, o.bytes()));
    let addr = if clash {
        *scratch = crate::alloc::zeros(bytes.div_ceil(8), "a copy of the gradient")?;
        // SAFETY: the gradient holds `bytes` readable bytes; scratch holds at least as many.
        unsafe {
            std::ptr::copy_nonoverlapping(
                g.buf.data.cast::<u8>(),
                scratch.as_mut_ptr().cast::<u8>(),
                bytes,
            )
        };
        scratch.as_ptr() as usize
    } else {
        addr
    };
    Ok(RawBuf {
        addr,
        dtype: g.dtype,
        numel: g.numel,
    })
}

/// The CPU backend with the call's scalars as its step record.
pub(super) fn cpu_step<'c>(h: &Hyper, coef: f32, opts: &'c super::ops::Options) -> CpuStep<'c> {
    let cfg = &opts.config;
    let v = cfg.clip_grad_value;
    CpuStep {
        cfg,
        host: HostStep {
            xf: GradXform {
                inv_scale: h.inv_scale,
                clip_value: if v > 0.0 { v as f32 } else { f32::INFINITY },
                coef,
            },
            lr: h.lr as f64,
            step: h.step,
            skip: false,
        },
    }
}

/// The CPU backend for a NORM pass: only `inv_scale` matters.
pub(super) fn norm_step(cfg: &crate::config::Config, inv_scale: f32) -> CpuStep<'_> {
    CpuStep {
        cfg,
        host: HostStep {
            xf: GradXform {
                inv_scale,
                clip_value: f32::INFINITY,
                coef: 1.0,
            },
            lr: 0.0,
            step: 1,
            skip: false,
        },
    }
}

/// Σ(g/S)² over all gradients (in operand order, as the C API sums in id order), the clip
/// coefficient, and whether every gradient was finite.
pub fn grad_sum_sq(plan: &NormPlan<'_>) -> XResult<()> {
    let inv = inv_scale(read_f32(&plan.loss_scale))?;
    let cfg = crate::config::Config::defaults(Algorithm::Lomo);
    let b = norm_step(&cfg, inv);
    let mut totals = PhaseTotals::default();
    for g in &plan.grads {
        let mut none = Vec::new();
        let buf = grad_buf(g, &[], &mut none)?;
        let mut t = CpuTensor::new(buf, None);
        orchestrate::tensor(&b, cfg.algorithm, &mut t, &buf, &TensorPass::Norm, None)?;
        totals.add(t.finite, t.sum_sq);
    }
    let totals = orchestrate::end(&b, false, totals, None)?;
    let d = orchestrate::norm_decision(&totals, plan.clip_grad_norm);
    let (sum_sq, coef) = if d.overflow {
        (f32::NAN, f32::NAN)
    } else {
        (totals.sum_sq as f32, d.coef)
    };
    write_f32(&plan.sum_sq, sum_sq);
    write_f32(&plan.clip_coef, coef);
    write_pred(&plan.finite, !d.overflow);
    Ok(())
}

pub fn lomo_update(plan: &LomoPlan<'_>) -> XResult<()> {
    let h = hyper(&plan.scalars)?;
    let param = materialize(&plan.param, "param")?;
    let finite = match h.coef {
        None => false,
        Some(_) if param.numel == 0 => true,
        Some(coef) => {
            let mut scratch = Vec::new();
            let grad = grad_buf(&plan.grad, &[&plan.param], &mut scratch)?;
            let mut t = CpuTensor::new(param, None);
            let b = cpu_step(&h, coef, &plan.opts);
            let pass = plan.opts.update_pass();
            orchestrate::tensor(&b, Algorithm::Lomo, &mut t, &grad, &pass, None)?;
            t.finite
        }
    };
    write_pred(&plan.finite, finite);
    Ok(())
}

/// `numel` f32 values of a materialized state result.
///
/// # Safety
/// `buf` is an f32 result buffer of `numel` elements that nothing else accesses during the call.
pub(super) unsafe fn state_slice<'a>(buf: &RawBuf) -> &'a mut [f32] {
    // SAFETY: per the contract above (non-NULL and aligned, checked by `materialize`).
    unsafe { std::slice::from_raw_parts_mut(buf.addr as *mut f32, buf.numel) }
}

pub fn adalomo_update(plan: &AdaPlan<'_>) -> XResult<()> {
    let h = hyper(&plan.scalars)?;
    let param = materialize(&plan.param, "param")?;
    let (states, outputs): (Vec<RawBuf>, Vec<&InOut<'_>>) = match &plan.state {
        AdaStatePlan::Factored { row, col } => (
            vec![materialize(row, "row")?, materialize(col, "col")?],
            vec![&plan.param, row, col],
        ),
        AdaStatePlan::Vector { v } => (vec![materialize(v, "v")?], vec![&plan.param, v]),
    };
    let finite = match h.coef {
        None => false,
        Some(_) if param.numel == 0 => true,
        Some(coef) => {
            let mut scratch = Vec::new();
            let grad = grad_buf(&plan.grad, &outputs, &mut scratch)?;
            let factored = states.len() == 2;
            // SAFETY: the state results are distinct XLA buffers of the checked sizes, used by
            // nothing else during this call.
            let view = unsafe {
                if factored {
                    StateViewMut::Factored {
                        row: state_slice(&states[0]),
                        col: state_slice(&states[1]),
                    }
                } else {
                    StateViewMut::Vector {
                        v: state_slice(&states[0]),
                    }
                }
            };
            let mut ws = PooledWs::take(plan.rows, plan.cols, factored)?;
            let ws = ws
                .ws
                .as_mut()
                .expect("a pooled workspace is present until drop");
            let mut t = CpuTensor::new(param, Some(CpuAda::new(view, ws, None)));
            let b = cpu_step(&h, coef, &plan.opts);
            let pass = plan.opts.update_pass();
            orchestrate::tensor(&b, Algorithm::Adalomo, &mut t, &grad, &pass, None)?;
            t.finite
        }
    };
    write_pred(&plan.finite, finite);
    Ok(())
}
