//! XLA FFI layer, split phase (see `split.rs`): the NORM phase's two calls (`norm_partials`,
//! `norm_finish`) and the exported handlers of every split-phase target (Host; the CUDA targets
//! refuse with `UNIMPLEMENTED`).

use super::abi::dtype;
use super::cpu::{self, write_f32, write_pred};
use super::frame::{invalid, Frame, XResult};
use super::ops::{self, Attrs, Grad};
use super::split::{read_record, run_piece, write_record};
use crate::backend::cpu::step::CpuTensor;
use crate::config::Algorithm;
use crate::orchestrate::{self, PhaseTotals, TensorPass};

/// `norm_partials`: per gradient `[Σ(g/S)² (0 if not finite), 1 if not finite]`, as the C API's
/// NORM phase computes each tensor record.
pub fn norm_partials(f: &Frame<'_>) -> XResult<()> {
    const OP: &str = "lomo norm_partials";
    if f.num_args() < 1 || f.num_rets() != 1 {
        invalid!("{OP}: expected operands (loss_scale, grads...) and 1 result (the record)");
    }
    Attrs::new(f, OP)?.finish()?;
    let inv = cpu::inv_scale(cpu::read_f32(&ops::scalar(
        f,
        0,
        "loss_scale",
        &[dtype::F32],
    )?))?;
    let n = f.num_args() - 1;
    let out = f.ret(0, "record")?;
    if out.dims != [n as i64, 2] {
        invalid!("{OP}: the record must be [{n}, 2], got {}", out.describe());
    }
    let cfg = crate::config::Config::defaults(Algorithm::Lomo);
    let b = cpu::norm_step(&cfg, inv);
    let mut rec = Vec::with_capacity(2 * n);
    for i in 0..n {
        let g: Grad<'_> = ops::grad(f, i + 1, &format!("grad {i}"))?;
        let buf = cpu::grad_buf(&g, &[], &mut Vec::new())?;
        let mut t = CpuTensor::new(buf, None);
        orchestrate::tensor(&b, Algorithm::Lomo, &mut t, &buf, &TensorPass::Norm, None)?;
        rec.push(if t.finite { t.sum_sq } else { 0.0 });
        rec.push((!t.finite) as u8 as f64);
    }
    write_record(&out, &rec, "record")
}

/// `norm_finish`: the NORM phase's end from the reduced per-tensor records, summed in operand
/// order as the C API sums its tensor records.
pub fn norm_finish(f: &Frame<'_>) -> XResult<()> {
    const OP: &str = "lomo norm_finish";
    ops::count(f, OP, 1, 3, "record -> sum_sq, clip_coef, finite")?;
    let mut a = Attrs::new(f, OP)?;
    let clip = a.float("clip_grad_norm", 0.0)?;
    a.finish()?;
    if !(clip.is_finite() && clip >= 0.0) {
        invalid!("clip_grad_norm must be finite and >= 0, got {clip}");
    }
    let rec_buf = f.arg(0, "record")?;
    let rec = read_record(&rec_buf, "record")?;
    if rec_buf.dims.len() != 2 || rec_buf.dims[1] != 2 {
        invalid!(
            "{OP}: the record must be [n, 2], got {}",
            rec_buf.describe()
        );
    }
    let mut totals = PhaseTotals::default();
    for r in rec.chunks_exact(2) {
        totals.add(r[1] == 0.0, r[0]);
    }
    let d = orchestrate::norm_decision(&totals, clip);
    let (sum_sq, coef) = if d.overflow {
        (f32::NAN, f32::NAN)
    } else {
        (totals.sum_sq as f32, d.coef)
    };
    write_f32(&ops::scalar_ret(f, 0, "sum_sq", dtype::F32)?, sum_sq);
    write_f32(&ops::scalar_ret(f, 1, "clip_coef", dtype::F32)?, coef);
    write_pred(&ops::scalar_ret(f, 2, "finite", dtype::PRED)?, !d.overflow);
    Ok(())
}

macro_rules! host_handler {
    ($name:ident, $label:literal, $body:expr) => {
        /// XLA FFI handler (Host platform), split phase; see `src/xla/split.rs`.
        ///
        /// # Safety
        /// Called by XLA with its call frame.
        #[no_mangle]
        pub unsafe extern "C" fn $name(
            frame: *mut super::abi::XLA_FFI_CallFrame,
        ) -> *mut super::abi::XLA_FFI_Error {
            // SAFETY: `frame` is XLA's call frame for this invocation.
            unsafe { super::frame::boundary(frame, $label, $body) }
        }
    };
}

host_handler!(lomo_xla_norm_partials, "lomo_xla_norm_partials", |f| {
    norm_partials(f)
});
host_handler!(lomo_xla_norm_finish, "lomo_xla_norm_finish", |f| {
    norm_finish(f)
});
host_handler!(
    lomo_xla_lomo_piece_stats,
    "lomo_xla_lomo_piece_stats",
    |f| { run_piece(f, Algorithm::Lomo, false) }
);
host_handler!(
    lomo_xla_lomo_piece_apply,
    "lomo_xla_lomo_piece_apply",
    |f| { run_piece(f, Algorithm::Lomo, true) }
);
host_handler!(
    lomo_xla_adalomo_piece_stats,
    "lomo_xla_adalomo_piece_stats",
    |f| { run_piece(f, Algorithm::Adalomo, false) }
);
host_handler!(
    lomo_xla_adalomo_piece_apply,
    "lomo_xla_adalomo_piece_apply",
    |f| { run_piece(f, Algorithm::Adalomo, true) }
);

macro_rules! cuda_refusal {
    ($name:ident, $label:literal) => {
        /// XLA FFI handler (CUDA platform): the split-phase operations are not implemented on
        /// CUDA yet; refuses with `UNIMPLEMENTED` and says so.
        ///
        /// # Safety
        /// Called by XLA with its call frame.
        #[no_mangle]
        pub unsafe extern "C" fn $name(
            frame: *mut super::abi::XLA_FFI_CallFrame,
        ) -> *mut super::abi::XLA_FFI_Error {
            // SAFETY: `frame` is XLA's call frame for this invocation.
            unsafe {
                super::frame::boundary(frame, $label, |_| {
                    Err(super::frame::XlaError::unimplemented(
                        "lomo's split-phase (shard_map) operations run on the CPU only so far; \
                         on CUDA use the whole-tensor operations on replicated parameters",
                    ))
                })
            }
        }
    };
}

cuda_refusal!(lomo_xla_norm_partials_cuda, "lomo_xla_norm_partials_cuda");
cuda_refusal!(lomo_xla_norm_finish_cuda, "lomo_xla_norm_finish_cuda");
cuda_refusal!(
    lomo_xla_lomo_piece_stats_cuda,
    "lomo_xla_lomo_piece_stats_cuda"
);
cuda_refusal!(
    lomo_xla_lomo_piece_apply_cuda,
    "lomo_xla_lomo_piece_apply_cuda"
);
cuda_refusal!(
    lomo_xla_adalomo_piece_stats_cuda,
    "lomo_xla_adalomo_piece_stats_cuda"
);
cuda_refusal!(
    lomo_xla_adalomo_piece_apply_cuda,
    "lomo_xla_adalomo_piece_apply_cuda"
);
