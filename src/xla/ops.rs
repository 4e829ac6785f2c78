//! XLA FFI layer: the signature of each custom call, decoded and checked into a platform-neutral
//! plan (buffers, options). Nothing here reads array contents, so the same plans serve the Host
//! platform (`cpu.rs`) and the CUDA platform (`cuda.rs`), where the data is device memory.
//!
//! Signatures (operands → results; attributes are all optional, defaults as in `lomo_config`):
//!
//! ```text
//! grad_sum_sq:     loss_scale f32[], g_0, …, g_{n-1}            → sum_sq f32[], clip_coef f32[], finite bool[]
//!                  attrs: clip_grad_norm
//! lomo_update:     p, g, lr f32[], loss_scale f32[], clip_coef f32[], step int[]  → p', finite bool[]
//! adalomo_update:  p, g, row f32[R], col f32[C], lr, loss_scale, clip_coef, step → p', row', col', finite
//!   (rank ≤ 1:)    p, g, v f32[shape(p)],        lr, loss_scale, clip_coef, step → p', v', finite
//!   attrs (both updates): weight_decay, clip_grad_value, lr_multiplier, rounding, seed, param_id;
//!   AdaLomo also eps1, eps2, clip_threshold, decay_rate
//! ```
//!
//! p and g are f32/f16/bf16 (independently); p' has p's dtype and shape, and likewise for the
//! state. R = prod(shape[:-1]) and C = shape[-1] (`lomo_param_desc`).

use super::abi::dtype;
use super::frame::{invalid, AttrValue, Buffer, Frame, XResult};
use crate::backend::TensorUpdate;
use crate::config::{Algorithm, Config, Rounding};
use crate::dtype::DType;
use crate::orchestrate::TensorPass;

/// An operand and the result it becomes (the same buffer when XLA aliases them).
#[derive(Clone, Copy, Debug)]
pub struct InOut<'a> {
    pub input: Buffer<'a>,
    pub output: Buffer<'a>,
    pub numel: usize,
    pub elem_size: usize,
}

impl InOut<'_> {
    pub fn bytes(&self) -> usize {
        self.numel * self.elem_size
    }
    pub fn aliased(&self) -> bool {
        self.input.data == self.output.data
    }
}

/// An error unless `b` holds `numel` elements of `elem` bytes at a non-NULL, aligned address
/// (checked on the address only: the data may be device memory).
pub fn check_aligned(b: &Buffer<'_>, elem: usize, numel: usize, what: &str) -> XResult<()> {
    if numel > 0 && (b.data.is_null() || b.data as usize % elem != 0) {
        invalid!(
            "{what}: buffer {:p} is NULL or not aligned to {elem} bytes",
            b.data
        );
    }
    Ok(())
}

/// Whether the byte ranges `[a, a + a_len)` and `[b, b + b_len)` intersect.
pub fn overlaps(a: usize, a_len: usize, b: usize, b_len: usize) -> bool {
    a_len > 0 && b_len > 0 && a < b.saturating_add(b_len) && b < a.saturating_add(a_len)
}

/// A gradient (or any read-only f32/f16/bf16 array).
#[derive(Clone, Copy, Debug)]
pub struct Grad<'a> {
    pub buf: Buffer<'a>,
    pub dtype: DType,
    pub numel: usize,
}

/// The per-step scalar operands (0-d arrays, so they can be traced values under `jax.jit`).
#[derive(Clone, Copy, Debug)]
pub struct Scalars<'a> {
    pub lr: Buffer<'a>,
    pub loss_scale: Buffer<'a>,
    pub clip_coef: Buffer<'a>,
    pub step: Buffer<'a>,
}

/// Options of an update, from the attributes.
#[derive(Clone, Debug)]
pub struct Options {
    /// Validated; the fields the handler reads are weight_decay, clip_grad_value, rounding, seed
    /// and (AdaLomo) eps1, eps2, clip_threshold, decay_rate.
    pub config: Config,
    pub lr_multiplier: f64,
    /// The stochastic-rounding stream of this tensor (the C API's parameter id).
    pub param_id: u32,
}

impl Options {
    /// The update of the call's tensor, for the core's orchestration: no NORM phase checked its
    /// gradient, no Σp² is carried (an XLA call has no previous step), group 0's weight decay.
    pub fn update_pass(&self) -> TensorPass {
        TensorPass::Update(TensorUpdate {
            param_id: self.param_id,
            lr_multiplier: self.lr_multiplier,
            weight_decay: self.config.weight_decay,
            prechecked: false,
            per_element: false,
            carry: false,
        })
    }
}

pub struct NormPlan<'a> {
    pub loss_scale: Buffer<'a>,
    pub grads: Vec<Grad<'a>>,
    pub clip_grad_norm: f64,
    pub sum_sq: Buffer<'a>,
    pub clip_coef: Buffer<'a>,
    pub finite: Buffer<'a>,
}

pub struct LomoPlan<'a> {
    pub param: InOut<'a>,
    pub param_dtype: DType,
    pub grad: Grad<'a>,
    pub scalars: Scalars<'a>,
    pub opts: Options,
    pub finite: Buffer<'a>,
}

pub enum AdaStatePlan<'a> {
    Factored { row: InOut<'a>, col: InOut<'a> },
    Vector { v: InOut<'a> },
}

pub struct AdaPlan<'a> {
    pub param: InOut<'a>,
    pub param_dtype: DType,
    pub grad: Grad<'a>,
    pub state: AdaStatePlan<'a>,
    /// The `[rows, cols]` view (cols = 1 for vector state).
    pub rows: usize,
    pub cols: usize,
    pub scalars: Scalars<'a>,
    pub opts: Options,
    pub finite: Buffer<'a>,
}

pub(super) fn float_dtype(b: &Buffer<'_>, what: &str) -> XResult<DType> {
    match b.dtype {
        dtype::F32 => Ok(DType::F32),
        dtype::F16 => Ok(DType::F16),
        dtype::BF16 => Ok(DType::Bf16),
        _ => invalid!("{what} must be f32, f16 or bf16, got {}", b.describe()),
    }
}

pub(super) fn grad<'a>(f: &Frame<'a>, i: usize, what: &str) -> XResult<Grad<'a>> {
    let buf = f.arg(i, what)?;
    let dtype = float_dtype(&buf, what)?;
    let numel = buf.numel(what)?;
    Ok(Grad { buf, dtype, numel })
}

/// A 0-d (or one-element) operand of the given dtypes.
pub(super) fn scalar<'a>(
    f: &Frame<'a>,
    i: usize,
    what: &str,
    dtypes: &[i32],
) -> XResult<Buffer<'a>> {
    let b = f.arg(i, what)?;
    if !dtypes.contains(&b.dtype) || b.numel(what)? != 1 {
        let names: Vec<String> = dtypes.iter().map(|&d| dtype::name(d)).collect();
        invalid!(
            "{what} must be a scalar ({}), got {}",
            names.join(" or "),
            b.describe()
        );
    }
    Ok(b)
}

pub(super) fn scalar_ret<'a>(f: &Frame<'a>, i: usize, what: &str, d: i32) -> XResult<Buffer<'a>> {
    let b = f.ret(i, what)?;
    if b.dtype != d || b.numel(what)? != 1 {
        invalid!(
            "result {what} must be a scalar {}, got {}",
            dtype::name(d),
            b.describe()
        );
    }
    Ok(b)
}

pub(super) fn scalars<'a>(f: &Frame<'a>, first: usize) -> XResult<Scalars<'a>> {
    let f32_only = [dtype::F32];
    let ints = [dtype::S32, dtype::S64, dtype::U32, dtype::U64];
    Ok(Scalars {
        lr: scalar(f, first, "lr", &f32_only)?,
        loss_scale: scalar(f, first + 1, "loss_scale", &f32_only)?,
        clip_coef: scalar(f, first + 2, "clip_coef", &f32_only)?,
        step: scalar(f, first + 3, "step", &ints)?,
    })
}

/// Operand `i` and result `j`, which must have the same dtype and shape.
pub(super) fn in_out<'a>(f: &Frame<'a>, i: usize, j: usize, what: &str) -> XResult<InOut<'a>> {
    let input = f.arg(i, what)?;
    let output = f.ret(j, what)?;
    if input.dtype != output.dtype || input.dims != output.dims {
        invalid!(
            "result {what} must match its operand: operand {}, result {}",
            input.describe(),
            output.describe()
        );
    }
    let numel = input.numel(what)?;
    let elem_size = match input.dtype {
        dtype::F32 => 4,
        dtype::F16 | dtype::BF16 => 2,
        _ => invalid!("{what} must be f32, f16 or bf16, got {}", input.describe()),
    };
    Ok(InOut {
        input,
        output,
        numel,
        elem_size,
    })
}

pub(super) fn count(
    f: &Frame<'_>,
    op: &str,
    args: usize,
    rets: usize,
    layout: &str,
) -> XResult<()> {
    if f.num_args() != args || f.num_rets() != rets {
        invalid!(
            "{op}: expected {args} operands and {rets} results ({layout}), got {} and {}",
            f.num_args(),
            f.num_rets()
        );
    }
    Ok(())
}

/// Attributes by name; every one must be consumed by [`Attrs::finish`].
pub(super) struct Attrs {
    op: &'static str,
    items: Vec<(String, AttrValue, bool)>,
}

impl Attrs {
    pub(super) fn new(f: &Frame<'_>, op: &'static str) -> XResult<Attrs> {
        let items = f.attrs()?.into_iter().map(|(n, v)| (n, v, false)).collect();
        Ok(Attrs { op, items })
    }

    pub(super) fn take(&mut self, name: &str) -> Option<AttrValue> {
        let item = self.items.iter_mut().find(|(n, _, _)| n == name)?;
        item.2 = true;
        Some(item.1.clone())
    }

    pub(super) fn float(&mut self, name: &str, default: f64) -> XResult<f64> {
        match self.take(name) {
            None => Ok(default),
            Some(AttrValue::Float(v)) => Ok(v),
            Some(AttrValue::Int(v)) => Ok(v as f64),
            Some(v) => invalid!(
                "{}: attribute '{name}' must be a number, got {v:?}",
                self.op
            ),
        }
    }

    pub(super) fn int(&mut self, name: &str, default: i128, max: i128) -> XResult<i128> {
        match self.take(name) {
            None => Ok(default),
            Some(AttrValue::Int(v)) if (0..=max).contains(&v) => Ok(v),
            Some(v) => invalid!(
                "{}: attribute '{name}' must be an integer in [0, {max}], got {v:?}",
                self.op
            ),
        }
    }

    fn rounding(&mut self) -> XResult<Rounding> {
        match self.take("rounding") {
            None => Ok(Rounding::Nearest),
            Some(AttrValue::Str(s)) if s == "nearest" => Ok(Rounding::Nearest),
            Some(AttrValue::Str(s)) if s == "stochastic" => Ok(Rounding::Stochastic),
            Some(AttrValue::Int(v)) if (0..=u32::MAX as i128).contains(&v) => {
                Ok(Rounding::try_from(v as u32)?)
            }
            Some(v) => invalid!(
                "{}: attribute 'rounding' must be \"nearest\" or \"stochastic\", got {v:?}",
                self.op
            ),
        }
    }

    pub(super) fn finish(self) -> XResult<()> {
        let unknown: Vec<&str> = self
            .items
            .iter()
            .filter(|(_, _, used)| !used)
            .map(|(n, _, _)| n.as_str())
            .collect();
        if !unknown.is_empty() {
            invalid!("{}: unknown attribute(s) {unknown:?}", self.op);
        }
        Ok(())
    }
}

pub(super) fn options(mut a: Attrs, algorithm: Algorithm) -> XResult<Options> {
    let mut config = Config::defaults(algorithm);
    config.weight_decay = a.float("weight_decay", config.weight_decay)?;
    config.clip_grad_value = a.float("clip_grad_value", config.clip_grad_value)?;
    config.rounding = a.rounding()?;
    config.seed = a.int("seed", 0, u64::MAX as i128)? as u64;
    if algorithm == Algorithm::Adalomo {
        config.eps1 = a.float("eps1", config.eps1)?;
        config.eps2 = a.float("eps2", config.eps2)?;
        config.clip_threshold = a.float("clip_threshold", config.clip_threshold)?;
        config.decay_rate = a.float("decay_rate", config.decay_rate)?;
    }
    let lr_multiplier = a.float("lr_multiplier", 1.0)?;
    let param_id = a.int("param_id", 0, u32::MAX as i128)? as u32;
    a.finish()?;
    config.validate()?;
    if !(lr_multiplier.is_finite() && lr_multiplier >= 0.0) {
        invalid!("lr_multiplier must be finite and >= 0, got {lr_multiplier}");
    }
    Ok(Options {
        config,
        lr_multiplier,
        param_id,
    })
}

pub(super) fn same_numel(param: &InOut<'_>, grad: &Grad<'_>) -> XResult<()> {
    if param.input.dims != grad.buf.dims {
        invalid!(
            "grad shape must equal the parameter's: param {}, grad {}",
            param.input.describe(),
            grad.buf.describe()
        );
    }
    Ok(())
}

pub fn norm_plan<'a>(f: &Frame<'a>) -> XResult<NormPlan<'a>> {
    const OP: &str = "lomo grad_sum_sq";
    if f.num_args() < 1 || f.num_rets() != 3 {
        invalid!(
            "{OP}: expected operands (loss_scale, grads...) and 3 results (sum_sq, clip_coef, \
             finite), got {} operands and {} results",
            f.num_args(),
            f.num_rets()
        );
    }
    let mut a = Attrs::new(f, OP)?;
    let clip_grad_norm = a.float("clip_grad_norm", 0.0)?;
    a.finish()?;
    if !(clip_grad_norm.is_finite() && clip_grad_norm >= 0.0) {
        invalid!("clip_grad_norm must be finite and >= 0, got {clip_grad_norm}");
    }
    let grads = (1..f.num_args())
        .map(|i| grad(f, i, &format!("grad {}", i - 1)))
        .collect::<XResult<Vec<_>>>()?;
    Ok(NormPlan {
        loss_scale: scalar(f, 0, "loss_scale", &[dtype::F32])?,
        grads,
        clip_grad_norm,
        sum_sq: scalar_ret(f, 0, "sum_sq", dtype::F32)?,
        clip_coef: scalar_ret(f, 1, "clip_coef", dtype::F32)?,
        finite: scalar_ret(f, 2, "finite", dtype::PRED)?,
    })
}

pub fn lomo_plan<'a>(f: &Frame<'a>) -> XResult<LomoPlan<'a>> {
    const OP: &str = "lomo lomo_update";
    count(
        f,
        OP,
        6,
        2,
        "p, g, lr, loss_scale, clip_coef, step -> p, finite",
    )?;
    let opts = options(Attrs::new(f, OP)?, Algorithm::Lomo)?;
    let param = in_out(f, 0, 0, "param")?;
    let param_dtype = float_dtype(&param.input, "param")?;
    let grad = grad(f, 1, "grad")?;
    same_numel(&param, &grad)?;
    Ok(LomoPlan {
        param,
        param_dtype,
        grad,
        scalars: scalars(f, 2)?,
        opts,
        finite: scalar_ret(f, 1, "finite", dtype::PRED)?,
    })
}

pub fn adalomo_plan<'a>(f: &Frame<'a>) -> XResult<AdaPlan<'a>> {
    const OP: &str = "lomo adalomo_update";
    let opts = options(Attrs::new(f, OP)?, Algorithm::Adalomo)?;
    let param = f.arg(0, "param")?;
    let rank = param.dims.len();
    let factored = rank >= 2;
    if factored {
        count(
            f,
            OP,
            8,
            4,
            "rank >= 2: p, g, row, col, lr, loss_scale, clip_coef, step -> p, row, col, finite",
        )?;
    } else {
        count(
            f,
            OP,
            7,
            3,
            "rank <= 1: p, g, v, lr, loss_scale, clip_coef, step -> p, v, finite",
        )?;
    }
    let param = in_out(f, 0, 0, "param")?;
    let param_dtype = float_dtype(&param.input, "param")?;
    let grad = grad(f, 1, "grad")?;
    same_numel(&param, &grad)?;
    let (rows, cols) = if factored {
        let lead = Buffer {
            dims: &param.input.dims[..rank - 1],
            ..param.input
        };
        (lead.numel("param")?, param.input.dims[rank - 1] as usize)
    } else {
        (param.numel, 1)
    };
    let state_io = |i: usize, j: usize, what: &str, want: &[i64]| -> XResult<InOut<'a>> {
        let s = in_out(f, i, j, what)?;
        if s.input.dtype != dtype::F32 || s.input.dims != want {
            invalid!(
                "{what} state must be f32{want:?} for param {}, got {}",
                param.input.describe(),
                s.input.describe()
            );
        }
        Ok(s)
    };
    let (state, first_scalar, finite_ret) = if factored {
        let row = state_io(2, 1, "row", &[rows as i64])?;
        let col = state_io(3, 2, "col", &[cols as i64])?;
        (AdaStatePlan::Factored { row, col }, 4, 3)
    } else {
        let v = state_io(2, 1, "v", param.input.dims)?;
        (AdaStatePlan::Vector { v }, 3, 2)
    };
    Ok(AdaPlan {
        param,
        param_dtype,
        grad,
        state,
        rows,
        cols,
        scalars: scalars(f, first_scalar)?,
        opts,
        finite: scalar_ret(f, finite_ret, "finite", dtype::PRED)?,
    })
}
