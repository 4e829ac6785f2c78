//! XLA FFI layer, CUDA platform: runs the decoded plans (the same as the Host platform's) on
//! XLA's stream with the CUDA backend's kernels (`kernels/*.cu`, launched through
//! `backend::cuda::passes`), with results equal to the Host handlers' within the CUDA backend's
//! tolerances (reductions run in another order).
//!
//! A call enqueues, and never waits for the device:
//! 1. a copy of the gradient into a workspace, only if it shares memory with a result;
//! 2. operand → result copies (`cuMemcpyDtoDAsync`) for every parameter or state operand that XLA
//!    did not alias to its result (no donation);
//! 3. `xla_prepare` (`kernels/xla.cu`): the step record from the 0-d operands `lr`,
//!    `loss_scale`, `clip_coef`, `step`, which are device memory and never read by the host;
//! 4. the tensor's passes, through the core's orchestration (`crate::orchestrate`) on the CUDA
//!    backend (`backend::cuda::step::CudaStep` with this call's record): grad_sum_sq one NORM
//!    pass per gradient; LOMO the non-finite pre-check and the update; AdaLomo stats, finalize
//!    and apply (stats and apply for rank ≤ 1);
//! 5. `xla_norm_finish` / `xla_update_finish`: the `sum_sq`, `clip_coef` and `finite` results.
//!
//! So the handlers need no host synchronization and can be captured in a CUDA graph once the
//! kernels are compiled (they still report no command-buffer trait to XLA: the first call
//! compiles and allocates). Invalid scalars (`lr < 0`, `step < 1`, `loss_scale ≤ 0`, ...), which
//! the Host handlers report as INVALID_ARGUMENT, cannot be seen here without a synchronization:
//! the update is skipped and `finite` is false (grad_sum_sq: NaN, NaN, false). Workspaces and
//! the device choice: [`super::cuda_ws`].

use std::ffi::c_void;

use super::abi::*;
use super::cuda_ws::{cuda_error, Dev, Need, Pooled};
use super::frame::{invalid, Buffer, Frame, XResult, XlaError};
use super::ops::{check_aligned, overlaps, AdaPlan, AdaStatePlan, Grad, InOut, LomoPlan, NormPlan};
use super::ops::{Options, Scalars};
use crate::backend::cuda::abi::{DevPtr, XlaArgs};
use crate::backend::cuda::passes::{Layout, Records, Shape, Tensor};
use crate::backend::cuda::step::{CudaStep, CudaTensor, StepRecord};
use crate::backend::{PhaseBegin, RawBuf};
use crate::config::{Algorithm, Config};
use crate::dtype::DType;
use crate::orchestrate::{self, PhaseTotals, TensorPass};

/// The platform stream of this call (a `CUstream`/`cudaStream_t` on the CUDA platform).
pub fn stream(f: &Frame<'_>) -> XResult<*mut c_void> {
    // SAFETY: `api` is XLA's table for this call (checked non-NULL and large enough below).
    let api = unsafe { f.raw.api.as_ref() }
        .ok_or_else(|| XlaError::internal("XLA_FFI_CallFrame.api is NULL"))?;
    if api.struct_size < XLA_FFI_API_SIZE_FOR_STREAM_GET {
        return Err(XlaError::internal(format!(
            "XLA_FFI_Api is {} bytes, too small for XLA_FFI_Stream_Get",
            api.struct_size
        )));
    }
    let get = api
        .XLA_FFI_Stream_Get
        .ok_or_else(|| XlaError::internal("XLA_FFI_Stream_Get is NULL"))?;
    let mut args = XLA_FFI_Stream_Get_Args {
        struct_size: XLA_FFI_STREAM_GET_ARGS_STRUCT_SIZE,
        extension_start: std::ptr::null_mut(),
        ctx: f.raw.ctx,
        stream: std::ptr::null_mut(),
    };
    // SAFETY: valid args for this call's execution context.
    let err = unsafe { get(&mut args) };
    if !err.is_null() {
        return Err(XlaError {
            code: XLA_FFI_ERROR_INTERNAL,
            message: String::new(),
            from_xla: Some(err),
        });
    }
    Ok(args.stream)
}

/// One call in progress: its device, stream and workspace (back to the pool on drop, after
/// every launch is enqueued).
struct Call {
    op: &'static str,
    dev: Dev,
    stream: usize,
    ws: Pooled,
}

fn addr(b: &Buffer<'_>) -> DevPtr {
    b.data as DevPtr
}

impl Call {
    fn new(op: &'static str, dev: Dev, stream: *mut c_void, need: Need) -> XResult<Call> {
        let stream = stream as usize;
        let ws = Pooled::take(&dev, stream, need, op)?;
        Ok(Call {
            op,
            dev,
            stream,
            ws,
        })
    }

    fn records(&self, i: usize) -> Records {
        Records {
            step: self.ws.ws.step,
            t: self.ws.ws.tensor(i),
        }
    }

    /// The CUDA backend on this call's launcher and stream, its step record prepared from the
    /// operands in `a` (`kernels/xla.cu`).
    fn step<'c>(&'c self, a: XlaArgs, cfg: &'c Config) -> CudaStep<'c> {
        CudaStep {
            launcher: &*self.dev.launcher,
            cfg,
            stream: self.stream,
            record: StepRecord::Xla(a),
        }
    }

    /// One phase through the core's orchestration: `xla_prepare`, each tensor's passes, then
    /// `xla_norm_finish` or `xla_update_finish`.
    /// The UPDATE phase of a call's one tensor (its record is record 0).
    fn update_one(&self, tensor: Tensor, g: RawBuf, a: XlaArgs, opts: &Options) -> XResult<()> {
        let rec = self.records(0);
        let mut tensors = [(CudaTensor { tensor, rec }, g)];
        self.phase(a, opts, &mut tensors, &opts.update_pass())
    }

    fn phase(
        &self,
        a: XlaArgs,
        opts: &Options,
        tensors: &mut [(CudaTensor, RawBuf)],
        pass: &TensorPass,
    ) -> XResult<()> {
        let update = matches!(pass, TensorPass::Update(_));
        let b = self.step(a, &opts.config);
        let begin = PhaseBegin {
            update,
            after_norm: false,
            lr: 0.0,
        };
        let algorithm = opts.config.algorithm;
        let mut run = || -> crate::error::Result<()> {
            orchestrate::begin(&b, &begin)?;
            for (t, g) in tensors.iter_mut() {
                orchestrate::tensor(&b, algorithm, t, g, pass, None)?;
            }
            orchestrate::end(&b, update, PhaseTotals::default(), None).map(|_| ())
        };
        run().map_err(|e| cuda_error(self.op, e))
    }

    fn copy(&self, dst: DevPtr, src: DevPtr, bytes: usize) -> XResult<()> {
        self.dev
            .launcher
            .copy_device(dst, src, bytes, self.stream)
            .map_err(|e| cuda_error(self.op, e))
    }

    /// The result of `io` holding the operand's values (copied unless XLA aliased them).
    fn materialize(&self, io: &InOut<'_>) -> XResult<DevPtr> {
        if io.numel > 0 && !io.aliased() {
            self.copy(addr(&io.output), addr(&io.input), io.bytes())?;
        }
        Ok(addr(&io.output))
    }

    /// The gradient's address: its copy in the workspace when `scratch` says it shares memory
    /// with a result (copied before any result is written).
    fn grad(&self, g: &Grad<'_>, scratch: usize) -> XResult<DevPtr> {
        if scratch == 0 {
            return Ok(addr(&g.buf));
        }
        self.copy(self.ws.ws.scratch, addr(&g.buf), scratch)?;
        Ok(self.ws.ws.scratch)
    }

    /// The passes' per-call arguments with the operand scalars of an update.
    fn update_args(&self, s: &Scalars<'_>, finite: &Buffer<'_>, decay_rate: f64) -> XlaArgs {
        XlaArgs {
            lr: addr(&s.lr),
            clip_coef: addr(&s.clip_coef),
            step_in: addr(&s.step),
            step_dtype: match s.step.dtype {
                dtype::S32 => 0,
                dtype::S64 => 1,
                dtype::U32 => 2,
                _ => 3,
            },
            update: 1,
            decay_rate,
            n_tensors: 1,
            ..self.args(&s.loss_scale, finite)
        }
    }

    fn args(&self, loss_scale: &Buffer<'_>, finite: &Buffer<'_>) -> XlaArgs {
        XlaArgs {
            step: self.ws.ws.step,
            tensors: self.ws.ws.tensors,
            lr: 0,
            loss_scale: addr(loss_scale),
            clip_coef: 0,
            step_in: 0,
            sum_sq_out: 0,
            clip_coef_out: 0,
            finite_out: addr(finite),
            decay_rate: 0.0,
            clip_grad_norm: 0.0,
            n_tensors: 0,
            step_dtype: 0,
            update: 0,
            pad: 0,
        }
    }
}

/// The address checks the Host handlers make (on addresses only: the data is device memory).
fn check_inputs(grad: &Grad<'_>, ios: &[(&InOut<'_>, &str)]) -> XResult<()> {
    check_aligned(&grad.buf, grad.dtype.size(), grad.numel, "grad")?;
    for (io, what) in ios {
        check_aligned(&io.input, io.elem_size, io.numel, what)?;
        check_aligned(&io.output, io.elem_size, io.numel, what)?;
    }
    Ok(())
}

fn check_scalars(s: &Scalars<'_>, finite: &Buffer<'_>) -> XResult<()> {
    check_aligned(&s.lr, 4, 1, "lr")?;
    check_aligned(&s.loss_scale, 4, 1, "loss_scale")?;
    check_aligned(&s.clip_coef, 4, 1, "clip_coef")?;
    let step_size = if matches!(s.step.dtype, dtype::S32 | dtype::U32) {
        4
    } else {
        8
    };
    check_aligned(&s.step, step_size, 1, "step")?;
    check_aligned(finite, 1, 1, "finite")
}

/// Bytes of the gradient when it shares memory with one of `outputs` (then it is copied first,
/// as the Host handler does), else 0.
fn grad_scratch(g: &Grad<'_>, outputs: &[&InOut<'_>]) -> usize {
    let bytes = g.numel * g.dtype.size();
    let clash = outputs.iter().any(|o| {
        overlaps(
            g.buf.data as usize,
            bytes,
            o.output.data as usize,
            o.bytes(),
        )
    });
    if clash {
        bytes
    } else {
        0
    }
}

fn raw(g: &Grad<'_>, addr: DevPtr) -> RawBuf {
    RawBuf {
        addr: addr as usize,
        dtype: g.dtype,
        numel: g.numel,
    }
}

/// `grad_sum_sq` on `stream`: one NORM pass per gradient (a `LomoTensor` each), then
/// `xla_norm_finish` writes sum_sq, clip_coef and finite.
pub fn grad_sum_sq(plan: &NormPlan<'_>, stream: *mut c_void) -> XResult<()> {
    const OP: &str = "grad_sum_sq";
    check_aligned(&plan.loss_scale, 4, 1, "loss_scale")?;
    check_aligned(&plan.sum_sq, 4, 1, "sum_sq")?;
    check_aligned(&plan.clip_coef, 4, 1, "clip_coef")?;
    check_aligned(&plan.finite, 1, 1, "finite")?;
    for (i, g) in plan.grads.iter().enumerate() {
        check_aligned(&g.buf, g.dtype.size(), g.numel, &format!("grad {i}"))?;
    }
    let Ok(n) = u32::try_from(plan.grads.len()) else {
        invalid!("{OP}: too many gradients ({})", plan.grads.len());
    };
    let dev = Dev::of(plan.sum_sq.data, OP)?;
    let layout = |numel: usize| {
        Layout::new(
            Shape::vector(numel as u64),
            false,
            dev.max_blocks,
            dev.max_smem,
        )
    };
    let need = Need {
        tensors: n,
        sizes: layout(0).sizes(),
        scratch: 0,
    };
    let call = Call::new(OP, dev.clone(), stream, need)?;
    let a = XlaArgs {
        sum_sq_out: addr(&plan.sum_sq),
        clip_coef_out: addr(&plan.clip_coef),
        clip_grad_norm: plan.clip_grad_norm,
        n_tensors: n,
        ..call.args(&plan.loss_scale, &plan.finite)
    };
    let mut tensors: Vec<(CudaTensor, RawBuf)> = plan
        .grads
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let tensor = Tensor {
                layout: layout(g.numel),
                bufs: call.ws.ws.bufs,
                p: 0,
                p_dtype: DType::F32,
                piece: None,
            };
            let rec = call.records(i);
            (CudaTensor { tensor, rec }, raw(g, addr(&g.buf)))
        })
        .collect();
    let opts = Options {
        config: Config::defaults(Algorithm::Lomo),
        lr_multiplier: 1.0,
        param_id: 0,
    };
    call.phase(a, &opts, &mut tensors, &TensorPass::Norm)
}

/// `lomo_update` on `stream`: copy p when not aliased, then the pre-check and the LOMO kernel on
/// the result.
pub fn lomo_update(plan: &LomoPlan<'_>, stream: *mut c_void) -> XResult<()> {
    const OP: &str = "lomo_update";
    check_scalars(&plan.scalars, &plan.finite)?;
    check_inputs(&plan.grad, &[(&plan.param, "param")])?;
    let dev = Dev::of(plan.finite.data, OP)?;
    let shape = Shape::vector(plan.param.numel as u64);
    let layout = Layout::new(shape, false, dev.max_blocks, dev.max_smem);
    let need = Need {
        tensors: 1,
        sizes: layout.sizes(),
        scratch: grad_scratch(&plan.grad, &[&plan.param]),
    };
    let call = Call::new(OP, dev, stream, need)?;
    let g = call.grad(&plan.grad, need.scratch)?;
    let p = call.materialize(&plan.param)?;
    let a = call.update_args(&plan.scalars, &plan.finite, 0.0);
    let t = Tensor {
        layout,
        bufs: call.ws.ws.bufs,
        p,
        p_dtype: plan.param_dtype,
        piece: None,
    };
    call.update_one(t, raw(&plan.grad, g), a, &plan.opts)
}

/// `adalomo_update` on `stream`: copy p and the state when not aliased, then the AdaLomo passes
/// on the results.
pub fn adalomo_update(plan: &AdaPlan<'_>, stream: *mut c_void) -> XResult<()> {
    const OP: &str = "adalomo_update";
    check_scalars(&plan.scalars, &plan.finite)?;
    let (states, factored): (Vec<(&InOut<'_>, &str)>, bool) = match &plan.state {
        AdaStatePlan::Factored { row, col } => (vec![(row, "row"), (col, "col")], true),
        AdaStatePlan::Vector { v } => (vec![(v, "v")], false),
    };
    let mut ios = vec![(&plan.param, "param")];
    ios.extend(states.iter().copied());
    check_inputs(&plan.grad, &ios)?;
    let dev = Dev::of(plan.finite.data, OP)?;
    let shape = Shape::new(
        plan.param.numel as u64,
        plan.rows as u64,
        plan.cols as u64,
        factored,
    );
    let layout = Layout::new(shape, true, dev.max_blocks, dev.max_smem);
    let outputs: Vec<&InOut<'_>> = ios.iter().map(|(io, _)| *io).collect();
    let need = Need {
        tensors: 1,
        sizes: layout.sizes(),
        scratch: grad_scratch(&plan.grad, &outputs),
    };
    let call = Call::new(OP, dev, stream, need)?;
    let g = call.grad(&plan.grad, need.scratch)?;
    let p = call.materialize(&plan.param)?;
    let mut bufs = call.ws.ws.bufs;
    bufs.state_a = call.materialize(states[0].0)?;
    if factored {
        bufs.state_b = call.materialize(states[1].0)?;
    }
    let a = call.update_args(&plan.scalars, &plan.finite, plan.opts.config.decay_rate);
    let t = Tensor {
        layout,
        bufs,
        p,
        p_dtype: plan.param_dtype,
        piece: None,
    };
    call.update_one(t, raw(&plan.grad, g), a, &plan.opts)
}
