//! CUDA backend: Rust mirrors of the structs in `kernels/*.cu` (field by field, `#[repr(C)]`).
//! Sizes are checked against the host build of the kernels (`tests` in this module).

/// Device pointer (a plain address: CUDA device memory, or host memory under emulation).
pub type DevPtr = u64;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LomoStep {
    pub lr: f32,
    pub inv_scale: f32,
    pub coef: f32,
    pub skip: u32,
    pub beta: f32,
    pub omb: f32,
    pub steps: u64,
    pub skipped_total: u64,
    pub scale: f64,
    pub cur_hysteresis: u32,
    pub has_norm: u32,
    pub cur_iter: u64,
    pub last_overflow_iter: i64,
    pub info_grad_norm: f32,
    pub info_clip_coef: f32,
    pub info_loss_scale: f32,
    pub info_next_loss_scale: f32,
    pub info_overflow: u32,
    pub info_skipped: u32,
    pub info_nonfinite: u32,
    pub scale_f32: f32,
    pub info_step: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LomoTensor {
    pub sum_sq: f64,
    pub psq: f64,
    pub psq_carried: f64,
    pub row_sum: f64,
    pub bad: u32,
    pub ticket: u32,
    pub carried_valid: u32,
    pub row_mean: f32,
    pub decay: f32,
    pub neg_lr: f32,
    pub inv_clip: f32,
    /// [`TENSOR_NORM_DUPLICATE`].
    pub flags: u32,
}

/// `LomoTensor::flags`: a replica whose Σg² another rank counts (`LOMO_SHARD_NORM_DUPLICATE`).
pub const TENSOR_NORM_DUPLICATE: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NormArgs {
    pub g: DevPtr,
    pub n: u64,
    pub step: DevPtr,
    pub t: DevPtr,
    pub partials: DevPtr,
    pub check_only: u32,
    pub pad: u32,
    /// A piece's record (check_only): its non-finite flag as f64; 0 otherwise.
    pub piece: DevPtr,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LomoArgs {
    pub p: DevPtr,
    pub g: DevPtr,
    pub n: u64,
    pub step: DevPtr,
    pub t: DevPtr,
    pub lr_mult: f64,
    pub weight_decay: f64,
    pub clip_value: f32,
    pub param_id: u32,
    pub seed: u64,
    pub prechecked: u32,
    pub rounding: u32,
    /// A piece without a NORM phase: the reduced non-finite count; 0 otherwise.
    pub piece: DevPtr,
    /// Global index of element 0 (stochastic rounding of a piece).
    pub elem_offset: u64,
    /// A piece of columns: its columns per row (0 otherwise).
    pub cols: u64,
    /// A piece of columns: the global columns C between its rows (0 otherwise).
    pub row_stride: u64,
}

/// Tensors of one multi-tensor launch (`LOMO_MULTI` in kernels/common.cuh).
pub const MULTI: usize = 24;
/// The largest own grid of a tensor in a multi-tensor launch (`LOMO_MULTI_GRID`).
pub const MULTI_GRID: u32 = 4;

/// One tensor of a multi-tensor NORM launch (kernels/norm.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct NormDesc {
    pub g: DevPtr,
    pub n: u64,
    pub t: DevPtr,
    pub partials: DevPtr,
    pub grid: u32,
    pub block0: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NormMultiArgs {
    pub step: DevPtr,
    pub n_tensors: u32,
    pub check_only: u32,
    pub d: [NormDesc; MULTI],
}

/// One tensor of a multi-tensor LOMO launch (kernels/lomo.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LomoDesc {
    pub p: DevPtr,
    pub g: DevPtr,
    pub n: u64,
    pub t: DevPtr,
    pub lr_mult: f64,
    pub weight_decay: f64,
    pub param_id: u32,
    pub grid: u32,
    pub block0: u32,
    pub pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LomoMultiArgs {
    pub step: DevPtr,
    pub seed: u64,
    pub clip_value: f32,
    pub prechecked: u32,
    pub rounding: u32,
    pub n_tensors: u32,
    pub d: [LomoDesc; MULTI],
}

/// `AdaArgs::flags`: carry Σp² between steps.
pub const ADA_CARRY: u32 = 1;
/// `AdaArgs::flags`: column accumulators in dynamic shared memory.
pub const ADA_SMEM: u32 = 2;
/// A piece of columns, round 1: stats writes `[b (R) ‖ Σp² ‖ nf]` into the piece record.
pub const ADA_COLS1: u32 = 4;
/// A piece of columns, round 2: stats takes the new rows from the reduced record, finalize
/// leaves `Σ_{j∈J} D_j / col_j` in its last value.
pub const ADA_COLS2: u32 = 8;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AdaArgs {
    pub p: DevPtr,
    pub g: DevPtr,
    pub rows: u64,
    pub cols: u64,
    pub state_a: DevPtr,
    pub state_b: DevPtr,
    pub ws_a: DevPtr,
    pub ws_r: DevPtr,
    pub ws_c: DevPtr,
    pub col_part: DevPtr,
    pub partials: DevPtr,
    pub step: DevPtr,
    pub t: DevPtr,
    pub lr_mult: f64,
    pub weight_decay: f64,
    pub eps2: f64,
    pub clip_threshold: f64,
    pub eps1: f32,
    pub clip_value: f32,
    pub seed: u64,
    pub param_id: u32,
    pub rounding: u32,
    pub flags: u32,
    pub stats_blocks: u32,
    /// A piece of rows: its statistics record (reduced between stats and finalize); 0 otherwise.
    pub piece: DevPtr,
    /// Rows of the global `[R, C]` view (vector: global numel).
    pub global_rows: u64,
    /// Global index of the piece's element 0.
    pub elem_offset: u64,
    /// Global index distance between rows: C of the global view (factored).
    pub row_stride: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StepArgs {
    pub step: DevPtr,
    pub tensors: DevPtr,
    pub n_tensors: u32,
    pub phase: u32,
    pub lr: f32,
    pub loss_scale_mode: u32,
    pub clip_grad_norm: f64,
    pub decay_rate: f64,
    pub scale_factor: f64,
    pub min_scale: f64,
    pub scale_window: u32,
    pub hysteresis: u32,
    /// A distributed phase end: the device record `[Σg², non-finite count]`.
    pub rec: DevPtr,
    /// The end kernels read the reduced `rec` instead of gathering the tensor records.
    pub reduced: u32,
    pub pad: u32,
}

/// The argument of the `xla_*` kernels (kernels/xla.cu): records, operand scalars and results
/// of one XLA custom call.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct XlaArgs {
    pub step: DevPtr,
    pub tensors: DevPtr,
    pub lr: DevPtr,
    pub loss_scale: DevPtr,
    pub clip_coef: DevPtr,
    pub step_in: DevPtr,
    pub sum_sq_out: DevPtr,
    pub clip_coef_out: DevPtr,
    pub finite_out: DevPtr,
    pub decay_rate: f64,
    pub clip_grad_norm: f64,
    pub n_tensors: u32,
    /// 0 s32, 1 s64, 2 u32, 3 u64.
    pub step_dtype: u32,
    /// 1: an update's scalars; 0: grad_sum_sq.
    pub update: u32,
    pub pad: u32,
}

/// Views a `Copy` struct as bytes (for host ↔ device copies).
pub fn as_bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: T is a plain-old-data #[repr(C)] struct; reading its bytes is always valid.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

/// Reads a `Copy` struct from bytes of exactly its size.
pub fn from_bytes<T: Copy + Default>(b: &[u8]) -> T {
    assert_eq!(b.len(), std::mem::size_of::<T>());
    let mut v = T::default();
    // SAFETY: `b` holds size_of::<T>() bytes; every bit pattern is valid for these POD structs.
    unsafe {
        std::ptr::copy_nonoverlapping(b.as_ptr(), (&mut v as *mut T).cast::<u8>(), b.len());
    }
    v
}

#[cfg(all(test, feature = "cuda-emulation"))]
mod tests {
    use super::*;
    use crate::backend::cuda::emu;

    #[test]
    fn mirrors_match_the_kernels() {
        assert_eq!(emu::sizeof_step(), std::mem::size_of::<LomoStep>());
        assert_eq!(emu::sizeof_tensor(), std::mem::size_of::<LomoTensor>());
        assert_eq!(
            emu::arg_size("norm_sumsq_f32"),
            std::mem::size_of::<NormArgs>()
        );
        assert_eq!(
            emu::arg_size("lomo_update_bf16_f16"),
            std::mem::size_of::<LomoArgs>()
        );
        assert_eq!(
            emu::arg_size("adalomo_stats_f32_f32"),
            std::mem::size_of::<AdaArgs>()
        );
        assert_eq!(
            emu::arg_size("adalomo_finalize"),
            std::mem::size_of::<AdaArgs>()
        );
        assert_eq!(
            emu::arg_size("norm_multi_bf16"),
            std::mem::size_of::<NormMultiArgs>()
        );
        assert_eq!(
            emu::arg_size("lomo_multi_f32_bf16"),
            std::mem::size_of::<LomoMultiArgs>()
        );
        for k in [
            "adalomo_piece_gather",
            "adalomo_vfinalize",
            "adalomo_cols_finish",
        ] {
            assert_eq!(emu::arg_size(k), std::mem::size_of::<AdaArgs>());
        }
        for k in ["step_begin", "step_gather"] {
            assert_eq!(emu::arg_size(k), std::mem::size_of::<StepArgs>());
        }
        for k in ["xla_prepare", "xla_norm_finish", "xla_update_finish"] {
            assert_eq!(emu::arg_size(k), std::mem::size_of::<XlaArgs>());
        }
    }
}
