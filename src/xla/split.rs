//! XLA FFI layer, split phase (`notes/distributed.md` §4.1 (c), §6 "split phase"): a step on a
//! *piece* of a tensor inside JAX's `shard_map`, where the reduction across devices must be the
//! caller's `jax.lax.psum` in the XLA program (a custom call cannot call back into it). Each
//! update becomes `stats` → `psum` → (`stats` of the next round → `psum`)* → `apply`; all of them
//! run the core's one orchestration of a tensor (`crate::orchestrate::tensor_split`) on the CPU
//! backend with the piece algebra of `backend::cpu::{ada_piece, ada_cols}` (the C API's exact
//! sharded AdaLomo): `stats` stops at the first round whose reduced record it was not given and
//! returns this device's partial record; `apply` is given every reduced record and writes.
//! (`apply` re-reads p and g for pass A: the partial statistics do not survive between calls.)
//! The NORM phase's two calls and the exported handlers are in `split_norm.rs`.
//!
//! Signatures (operands → results; R is the record dtype, f32 or f64, chosen by the caller):
//!
//! ```text
//! norm_partials:        loss_scale f32[], g_0, …, g_{n-1}      → rec R[n, 2]  ([Σ(g/S)², nf] per tensor)
//! norm_finish:          rec R[n, 2] (reduced)                  → sum_sq f32[], clip_coef f32[], finite bool[]
//!                       attrs: clip_grad_norm
//! lomo_piece_stats:     p, g, lr, S, coef, step, piece         → rec R[1]
//! lomo_piece_apply:     p, g, lr, S, coef, step, piece, red_1  → p', finite
//! adalomo_piece_stats:  p, g, row, col | v, lr, S, coef, step, piece, red_1 … red_{k-1} → rec R[len_k]
//! adalomo_piece_apply:  p, g, row, col | v, lr, S, coef, step, piece, red_1 … red_m     → p', state', finite
//! ```
//!
//! `piece` is an integer scalar (the device's index along the mesh axes the tensor is split
//! over); attributes are those of the whole-tensor updates (`ops.rs`) plus `layout` ("rows":
//! a range of rows of the `[R, C]` view, or of elements for rank ≤ 1; "cols": a range of its
//! columns), `global_rows` and `global_cols` (the whole tensor's view; rank ≤ 1: numel and 1).
//! Record lengths (`record_len`): LOMO 1; AdaLomo rows 2C + 3 (rank ≤ 1: 3); columns R + 2 then
//! 1 (two rounds). The stochastic-rounding stream of an element is keyed by its global index.

use super::abi::dtype;
use super::cpu::{self, hyper, materialize, state_slice, write_pred, PooledWs};
use super::frame::{invalid, Buffer, Frame, XResult};
use super::ops::{self, AdaStatePlan, Attrs, Grad, InOut, Options, Scalars};
use crate::backend::cpu::adalomo::StateViewMut;
use crate::backend::cpu::step::{CpuAda, CpuPiece, CpuTensor};
use crate::backend::cpu::{ada_cols, ada_piece};
use crate::backend::RawBuf;
use crate::config::Algorithm;
use crate::orchestrate::{self, Split};

/// How the piece lies in the whole tensor's `[R, C]` view.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PieceLayout {
    Rows,
    Cols,
}

/// Record length of round `round` (1-based) of a piece; None: no such round.
pub fn record_len(
    algorithm: Algorithm,
    layout: PieceLayout,
    factored: bool,
    global: (usize, usize),
    round: usize,
) -> Option<usize> {
    match (algorithm, layout, round) {
        (Algorithm::Lomo, _, 1) => Some(1),
        (Algorithm::Adalomo, PieceLayout::Rows, 1) => {
            Some(ada_piece::record_len(global.1, factored))
        }
        (Algorithm::Adalomo, PieceLayout::Cols, 1) => Some(global.0 + 2),
        (Algorithm::Adalomo, PieceLayout::Cols, 2) => Some(1),
        _ => None,
    }
}

/// A record operand or result: f32 or f64, one dimension (or `[n, 2]` for the norm).
fn record_dtype(b: &Buffer<'_>, what: &str) -> XResult<()> {
    if b.dtype != dtype::F32 && b.dtype != dtype::F64 {
        invalid!("{what} must be f32 or f64, got {}", b.describe());
    }
    Ok(())
}

pub(super) fn read_record(b: &Buffer<'_>, what: &str) -> XResult<Vec<f64>> {
    record_dtype(b, what)?;
    let n = b.numel(what)?;
    ops::check_aligned(b, if b.dtype == dtype::F64 { 8 } else { 4 }, n, what)?;
    // SAFETY: `n` aligned elements of the checked dtype in host memory (Host platform).
    Ok(unsafe {
        if b.dtype == dtype::F64 {
            std::slice::from_raw_parts(b.data.cast::<f64>(), n).to_vec()
        } else {
            std::slice::from_raw_parts(b.data.cast::<f32>(), n)
                .iter()
                .map(|&v| v as f64)
                .collect()
        }
    })
}

pub(super) fn write_record(b: &Buffer<'_>, rec: &[f64], what: &str) -> XResult<()> {
    record_dtype(b, what)?;
    let n = b.numel(what)?;
    if n != rec.len() {
        invalid!(
            "{what} must have {} values, got {}",
            rec.len(),
            b.describe()
        );
    }
    ops::check_aligned(b, if b.dtype == dtype::F64 { 8 } else { 4 }, n, what)?;
    // SAFETY: as in `read_record`; a result buffer nothing else accesses during the call.
    unsafe {
        if b.dtype == dtype::F64 {
            std::slice::from_raw_parts_mut(b.data.cast::<f64>(), n).copy_from_slice(rec);
        } else {
            let out = std::slice::from_raw_parts_mut(b.data.cast::<f32>(), n);
            for (o, &v) in out.iter_mut().zip(rec) {
                *o = v as f32;
            }
        }
    }
    Ok(())
}

/// A decoded piece call.
struct PiecePlan<'a> {
    /// `apply`: the parameter and its result; `stats`: the parameter operand only.
    param: InOut<'a>,
    grad: Grad<'a>,
    state: Option<AdaStatePlan<'a>>,
    scalars: Scalars<'a>,
    piece_index: u64,
    opts: Options,
    layout: PieceLayout,
    global: (usize, usize),
    /// Local `[rows, cols]` view.
    local: (usize, usize),
    factored: bool,
    reduced: Vec<Vec<f64>>,
}

fn piece_attrs(a: &mut Attrs, op: &str) -> XResult<(PieceLayout, (usize, usize))> {
    let layout = match a.take("layout") {
        Some(super::frame::AttrValue::Str(s)) if s == "rows" => PieceLayout::Rows,
        Some(super::frame::AttrValue::Str(s)) if s == "cols" => PieceLayout::Cols,
        v => invalid!("{op}: attribute 'layout' must be \"rows\" or \"cols\", got {v:?}"),
    };
    let max = i64::MAX as i128;
    let rows = a.int("global_rows", -1, max)?;
    let cols = a.int("global_cols", -1, max)?;
    if rows < 0 || cols < 0 {
        invalid!("{op}: attributes 'global_rows' and 'global_cols' are required");
    }
    Ok((layout, (rows as usize, cols as usize)))
}

/// Decodes a piece call; `apply` says whether the parameter and state are results.
fn piece_plan<'a>(f: &Frame<'a>, algorithm: Algorithm, apply: bool) -> XResult<PiecePlan<'a>> {
    let op = match (algorithm, apply) {
        (Algorithm::Lomo, false) => "lomo lomo_piece_stats",
        (Algorithm::Lomo, true) => "lomo lomo_piece_apply",
        (Algorithm::Adalomo, false) => "lomo adalomo_piece_stats",
        (Algorithm::Adalomo, true) => "lomo adalomo_piece_apply",
    };
    let mut a = Attrs::new(f, op)?;
    let (layout, global) = piece_attrs(&mut a, op)?;
    let opts = ops::options(a, algorithm)?;
    let p = f.arg(0, "param")?;
    let rank = p.dims.len();
    let ada = algorithm == Algorithm::Adalomo;
    let factored = rank >= 2;
    let n_state = match (ada, factored) {
        (false, _) => 0,
        (true, true) => 2,
        (true, false) => 1,
    };
    let fixed = 2 + n_state + 5;
    if f.num_args() < fixed {
        invalid!(
            "{op}: expected at least {fixed} operands, got {}",
            f.num_args()
        );
    }
    let n_rets = if apply { 2 + n_state } else { 1 };
    if f.num_rets() != n_rets {
        invalid!("{op}: expected {n_rets} results, got {}", f.num_rets());
    }
    let io = |i: usize, j: usize, what: &str| -> XResult<InOut<'a>> {
        if apply {
            ops::in_out(f, i, j, what)
        } else {
            let input = f.arg(i, what)?;
            let numel = input.numel(what)?;
            let elem_size = if input.dtype == dtype::F32 { 4 } else { 2 };
            Ok(InOut {
                input,
                output: input,
                numel,
                elem_size,
            })
        }
    };
    let param = io(0, 0, "param")?;
    ops::float_dtype(&param.input, "param")?;
    let grad = ops::grad(f, 1, "grad")?;
    ops::same_numel(&param, &grad)?;
    let (local_rows, local_cols) = if factored {
        let c = p.dims[rank - 1] as usize;
        (param.numel.checked_div(c).unwrap_or(0), c)
    } else {
        (param.numel, 1)
    };
    // Where this piece's state lies: rows keep their rows and every column; columns the reverse.
    let (want_rows, want_cols) = match layout {
        PieceLayout::Rows => (local_rows, global.1),
        PieceLayout::Cols => (global.0, local_cols),
    };
    let state_io = |i: usize, j: usize, what: &str, want: &[i64]| -> XResult<InOut<'a>> {
        let s = io(i, j, what)?;
        if s.input.dtype != dtype::F32 || s.input.dims != want {
            invalid!(
                "{what} state must be f32{want:?} for this piece, got {}",
                s.input.describe()
            );
        }
        Ok(s)
    };
    let state = match n_state {
        2 => Some(AdaStatePlan::Factored {
            row: state_io(2, 1, "row", &[want_rows as i64])?,
            col: state_io(3, 2, "col", &[want_cols as i64])?,
        }),
        1 => Some(AdaStatePlan::Vector {
            v: state_io(2, 1, "v", p.dims)?,
        }),
        _ => None,
    };
    let scalars = ops::scalars(f, 2 + n_state)?;
    let idx = ops::scalar(
        f,
        6 + n_state,
        "piece",
        &[dtype::S32, dtype::S64, dtype::U32],
    )?;
    // SAFETY: a one-element integer operand of the checked dtype in host memory.
    let piece_index: i64 = unsafe {
        match idx.dtype {
            dtype::S32 => idx.data.cast::<i32>().read_unaligned() as i64,
            dtype::U32 => idx.data.cast::<u32>().read_unaligned() as i64,
            _ => idx.data.cast::<i64>().read_unaligned(),
        }
    };
    if piece_index < 0 {
        invalid!("{op}: piece must be >= 0, got {piece_index}");
    }
    let reduced = (fixed..f.num_args())
        .map(|i| read_record(&f.arg(i, "reduced record")?, "reduced record"))
        .collect::<XResult<Vec<_>>>()?;
    // The piece must fit the whole tensor's view.
    let fits = match (layout, factored) {
        (PieceLayout::Rows, true) => local_cols == global.1,
        (PieceLayout::Rows, false) => global.1 == 1,
        (PieceLayout::Cols, true) => local_rows == global.0,
        (PieceLayout::Cols, false) => false,
    };
    let (len, span) = match layout {
        PieceLayout::Rows => (local_rows, global.0),
        PieceLayout::Cols => (local_cols, global.1),
    };
    let end = (piece_index as u128 + 1) * len as u128;
    if !fits || end > span as u128 {
        invalid!(
            "{op}: piece {piece_index} of shape {} does not fit a whole tensor of [{}, {}] as a \
             range of {} (rank >= 2 for columns)",
            p.describe(),
            global.0,
            global.1,
            if layout == PieceLayout::Rows {
                "rows"
            } else {
                "columns"
            }
        );
    }
    Ok(PiecePlan {
        param,
        grad,
        state,
        scalars,
        piece_index: piece_index as u64,
        opts,
        layout,
        global,
        local: (local_rows, local_cols),
        factored,
        reduced,
    })
}

/// Runs a piece call: `stats` writes the next round's partial record, `apply` the update.
pub(super) fn run_piece(f: &Frame<'_>, algorithm: Algorithm, apply: bool) -> XResult<()> {
    let plan = piece_plan(f, algorithm, apply)?;
    let round = plan.reduced.len() + 1;
    let rec_len = |r| record_len(algorithm, plan.layout, plan.factored, plan.global, r);
    let cols_piece = algorithm == Algorithm::Adalomo && plan.layout == PieceLayout::Cols;
    let rounds = if cols_piece { 2 } else { 1 };
    // Knowable before anything is written: the rounds given and their lengths.
    if (apply && plan.reduced.len() != rounds) || (!apply && plan.reduced.len() >= rounds) {
        invalid!(
            "this piece takes {rounds} statistics round(s): {} with {} reduced record(s)",
            if apply {
                "apply is called"
            } else {
                "no statistics round follows"
            },
            plan.reduced.len()
        );
    }
    for (k, r) in plan.reduced.iter().enumerate() {
        if Some(r.len()) != rec_len(k + 1) {
            invalid!(
                "the reduced record of round {} has {} values, expected {:?}",
                k + 1,
                r.len(),
                rec_len(k + 1)
            );
        }
    }
    let n_state = match &plan.state {
        Some(AdaStatePlan::Factored { .. }) => 2,
        Some(AdaStatePlan::Vector { .. }) => 1,
        None => 0,
    };
    let h = hyper(&plan.scalars)?;
    let (param, states, outputs) = if apply {
        let param = materialize(&plan.param, "param")?;
        let states = match &plan.state {
            Some(AdaStatePlan::Factored { row, col }) => {
                vec![materialize(row, "row")?, materialize(col, "col")?]
            }
            Some(AdaStatePlan::Vector { v }) => vec![materialize(v, "v")?],
            None => vec![],
        };
        (param, states, vec![&plan.param])
    } else {
        let d = ops::float_dtype(&plan.param.input, "param")?;
        let buf = RawBuf {
            addr: plan.param.input.data as usize,
            dtype: d,
            numel: plan.param.numel,
        };
        (buf, vec![], vec![])
    };
    // Stats read the state only: from copies, so nothing of XLA's operands is ever written.
    let mut copies: Vec<Vec<f32>> = Vec::new();
    if !apply {
        let bufs: Vec<&InOut<'_>> = match &plan.state {
            Some(AdaStatePlan::Factored { row, col }) => vec![row, col],
            Some(AdaStatePlan::Vector { v }) => vec![v],
            None => vec![],
        };
        for b in bufs {
            ops::check_aligned(&b.input, 4, b.numel, "state")?;
            // SAFETY: an aligned f32 operand of `numel` elements in host memory.
            let s = unsafe { std::slice::from_raw_parts(b.input.data.cast::<f32>(), b.numel) };
            copies.push(s.to_vec());
        }
    }
    let (global_rows, global_cols) = plan.global;
    let (local_rows, local_cols) = plan.local;
    let elem_offset = match plan.layout {
        PieceLayout::Rows => plan.piece_index * (local_rows as u64) * (global_cols as u64).max(1),
        PieceLayout::Cols => plan.piece_index * local_cols as u64,
    };
    let out_rec = (!apply).then(|| f.ret(0, "record")).transpose()?;
    let skip = h.coef.is_none() || global_rows.saturating_mul(global_cols) == 0;
    if skip {
        // The clip coefficient (agreed by every device) says skip, or nothing to update.
        match &out_rec {
            Some(out) => write_record(out, &vec![0.0; rec_len(round).unwrap_or(0)], "record")?,
            None => write_pred(&f.ret(1 + n_state, "finite")?, h.coef.is_some()),
        }
        return Ok(());
    }
    let coef = h.coef.unwrap_or(1.0);
    let mut scratch = Vec::new();
    let grad = cpu::grad_buf(&plan.grad, &outputs, &mut scratch)?;
    let mut record = vec![
        0.0f64;
        match (algorithm, plan.layout) {
            (Algorithm::Adalomo, PieceLayout::Cols) => ada_cols::record_len(global_rows),
            _ => rec_len(1).unwrap_or(1),
        }
    ];
    let mut pooled = match &plan.state {
        Some(_) => Some(PooledWs::take_for(
            local_rows,
            local_cols,
            plan.factored,
            cols_piece,
        )?),
        None => None,
    };
    let view = if apply {
        // SAFETY: the state results are distinct XLA buffers of the checked sizes, used by
        // nothing else during this call.
        unsafe {
            match states.len() {
                2 => Some(StateViewMut::Factored {
                    row: state_slice(&states[0]),
                    col: state_slice(&states[1]),
                }),
                1 => Some(StateViewMut::Vector {
                    v: state_slice(&states[0]),
                }),
                _ => None,
            }
        }
    } else {
        let mut it = copies.iter_mut();
        match (it.next(), it.next()) {
            (Some(row), Some(col)) => Some(StateViewMut::Factored { row, col }),
            (Some(v), None) => Some(StateViewMut::Vector { v }),
            _ => None,
        }
    };
    let ada = match (view, pooled.as_mut()) {
        (Some(view), Some(p)) => {
            let ws =
                p.ws.as_mut()
                    .expect("a pooled workspace is present until drop");
            Some(CpuAda::new(view, ws, None))
        }
        _ => None,
    };
    let mut t = CpuTensor::new(param, ada);
    t.piece = Some(CpuPiece {
        global_numel: global_rows * global_cols,
        global_rows,
        elem_offset,
        cols_of: (plan.layout == PieceLayout::Cols).then_some(global_cols),
        flat: false,
        record: &mut record,
        round: 0,
        row_mean: 0.0,
    });
    let b = cpu::cpu_step(&h, coef, &plan.opts);
    let pass = plan.opts.update_pass();
    let mut split = Split {
        reduced: plan.reduced.iter().map(|r| r.as_slice()).collect(),
        ..Split::default()
    };
    let done = orchestrate::tensor_split(&b, algorithm, &mut t, &grad, &pass, &mut split)?;
    match (&out_rec, done) {
        (Some(out), false) => write_record(out, &split.partial, "record"),
        // A round-2 request after a non-finite round 1: nothing more to reduce.
        (Some(out), true) => {
            if t.ada.as_ref().is_some_and(|a| a.applied) {
                return Err(super::frame::XlaError::internal(
                    "a statistics call updated a tensor",
                ));
            }
            write_record(out, &vec![0.0; rec_len(round).unwrap_or(0)], "record")
        }
        (None, true) => {
            write_pred(&f.ret(1 + n_state, "finite")?, t.finite);
            Ok(())
        }
        (None, false) => invalid!(
            "apply was given {} reduced record(s); this piece needs more (call the statistics \
             of round {} and reduce it first)",
            split.used,
            split.used + 1
        ),
    }
}
