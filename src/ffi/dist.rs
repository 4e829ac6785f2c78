//! FFI layer: distributed training through the caller's collectives — communicators
//! (`lomo_comm`), pieces of tensors (`lomo_shard_desc`) and the group that agrees on the step's
//! scalars (`lomo_dist_set`). See `notes/distributed.md` and the README's Distributed section.
#![allow(non_camel_case_types)]

use std::ffi::c_void;

use crate::dist::Comm;
use crate::error::Status;
use crate::ffi::guard::{check_struct_size, deref, deref_mut, guard};
use crate::ffi::optimizer::lomo_optimizer;
use crate::ffi::types::shape_from_raw;
use crate::optimizer::ShardDesc;

/// No communicator (`lomo_shard_desc.piece_comm`, `.grad_comm`; `lomo_dist_set`'s `norm_comm`).
pub const LOMO_COMM_NONE: u32 = 0xFFFF_FFFF;
/// Reduction operators handed to the callbacks.
pub const LOMO_REDUCE_SUM: u32 = 0;
pub const LOMO_REDUCE_MAX: u32 = 1;
/// The dtype code of f64 buffers handed to the callbacks (beside `LOMO_DTYPE_F32/F16/BF16`):
/// the statistics and scalar records the library reduces are f64.
pub const LOMO_DTYPE_F64: u32 = 3;

/// `lomo_shard_desc.layout`: the buffer is the whole tensor (replicas: data or tensor parallel).
pub const LOMO_LAYOUT_FULL: u32 = 0;
/// A range of rows of the `[prod(shape[:-1]), shape[-1]]` view (rank ≤ 1: of elements): FSDP2's
/// dim-0 shards, column-parallel and vocabulary-parallel weights.
pub const LOMO_LAYOUT_ROWS: u32 = 1;
/// A range of columns of that view (row-parallel weights); rank ≥ 2, every row.
pub const LOMO_LAYOUT_COLS: u32 = 2;
/// A range `[offset, offset + numel)` of the flattened tensor that may cut rows (DeepSpeed
/// ZeRO-3, FSDP1), registered as a rank ≤ 1 buffer. AdaLomo keeps the whole tensor's row and
/// column state on every rank and all-reduces twice per tensor (R + C + 2 doubles, then 1).
pub const LOMO_LAYOUT_FLAT: u32 = 3;

/// `lomo_shard_desc.grad_mode`: the caller submits the already reduced gradient of its piece.
pub const LOMO_GRAD_REDUCED: u32 = 0;
/// The caller submits its local gradient of the piece; the library copies it into its scratch,
/// all-reduces it there (SUM, in the gradient's dtype) over `grad_comm` and divides by the group
/// size: the step uses the average. The caller's buffer is only read. `grad_comm` must be the
/// group of the replicas of this piece (data parallel: FULL; HSDP: the replicate group), never
/// `piece_comm` of a piece.
pub const LOMO_GRAD_ALL_REDUCE: u32 = 1;
/// FLAT: the caller submits its local gradient of the whole tensor (`prod(global_shape)`
/// elements); the library reduce-scatters it (SUM) over `grad_comm` into its scratch and
/// divides by the group size. The pieces must be DeepSpeed ZeRO-3's partitions of `grad_comm`:
/// rank r holds `[r·P, min((r+1)·P, numel))` with `P = ceil(numel / size)` (the padding of the
/// last partitions is the library's: a tensor that does not divide is copied into a zero-padded
/// scratch first). Needs the communicator's `reduce_scatter`; `piece_comm` = `grad_comm`. The
/// caller's buffer is only read.
pub const LOMO_GRAD_REDUCE_SCATTER: u32 = 2;

/// `lomo_shard_desc.flags`: another rank counts this replica's Σg² (e.g. a norm weight
/// replicated across tensor-parallel ranks: set it on all of them but one).
pub const LOMO_SHARD_NORM_DUPLICATE: u32 = 1;
/// `lomo_dist_set` flags: at every phase end, check that the ranks agree on the gradients
/// submitted, lr, step counter, configuration (with each group's lr multiplier and weight decay) and
/// parameter count (one extra MAX all-reduce);
/// disagreement is `LOMO_STATUS_DIST_MISMATCH` on every rank instead of a hang or divergence.
pub const LOMO_DIST_CHECK: u32 = 1;

/// In-place all-reduce of `count` elements of `dtype` (`LOMO_DTYPE_F64` for the statistics and
/// scalar records; the gradient's `LOMO_DTYPE_F32/F16/BF16` with `LOMO_GRAD_ALL_REDUCE`) at
/// `buf`, with `op` (`LOMO_REDUCE_SUM` or `LOMO_REDUCE_MAX`), over the communicator's group;
/// every rank must end with the same bits. CPU parameters: `buf` is host memory, valid only
/// during the call, and `stream` is NULL; reduce before returning. CUDA parameters: `buf` is
/// device memory of the optimizer's device, written by kernels already enqueued on `stream` (the
/// caller's `cudaStream_t` of the library call) and read by kernels enqueued after the callback
/// returns: enqueue the collective on `stream` (e.g. `ncclAllReduce` on it, or
/// torch.distributed under `torch.cuda.ExternalStream(stream)`) and return without waiting; the
/// buffer stays valid for the optimizer's life. The library never synchronizes around the
/// callback, except for the `LOMO_DIST_CHECK` record, which it copies back. Returns 0 on
/// success; any other value fails the library call with `LOMO_STATUS_COMM_ERROR` (the message
/// carries it).
pub type lomo_all_reduce_fn = Option<
    unsafe extern "C" fn(
        user: *mut c_void,
        buf: *mut c_void,
        count: usize,
        dtype: u32,
        op: u32,
        stream: *mut c_void,
    ) -> i32,
>;
/// Reduce-scatter (SUM) of `count_per_rank × size` elements of `dtype` at `send` into this rank's
/// `count_per_rank` at `recv` (block `rank`), host memory valid during the call, `stream` NULL
/// for CPU parameters. Optional: needed by `LOMO_GRAD_REDUCE_SCATTER` only. 0 = success; any
/// other value is `LOMO_STATUS_COMM_ERROR`.
pub type lomo_reduce_scatter_fn = Option<
    unsafe extern "C" fn(
        user: *mut c_void,
        send: *const c_void,
        recv: *mut c_void,
        count_per_rank: usize,
        dtype: u32,
        op: u32,
        stream: *mut c_void,
    ) -> i32,
>;
/// All-gather of `count_per_rank` elements from every rank into `recv` (rank order). Optional;
/// not called by this version.
pub type lomo_all_gather_fn = Option<
    unsafe extern "C" fn(
        user: *mut c_void,
        send: *const c_void,
        recv: *mut c_void,
        count_per_rank: usize,
        dtype: u32,
        stream: *mut c_void,
    ) -> i32,
>;
/// Called once with `user` when the optimizer is freed. Optional.
pub type lomo_comm_destroy_fn = Option<unsafe extern "C" fn(user: *mut c_void)>;

/// A communicator of the caller's (torch.distributed, MPI, NCCL, threads...): this rank in a
/// group and the callbacks that reach the others. The library calls them from the thread that
/// makes the library call (`lomo_grad_submit`, `lomo_step_end`), in the same order on every rank
/// when every rank makes the same calls in the same order.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct lomo_comm {
    /// `sizeof(lomo_comm)`.
    pub struct_size: usize,
    /// This rank in the group, `0 <= rank < size`.
    pub rank: u32,
    pub size: u32,
    /// Handed back to every callback; owned by the caller (see `destroy`).
    pub user: *mut c_void,
    /// Required.
    pub all_reduce: lomo_all_reduce_fn,
    /// Optional (NULL).
    pub reduce_scatter: lomo_reduce_scatter_fn,
    /// Optional (NULL).
    pub all_gather: lomo_all_gather_fn,
    /// Optional (NULL).
    pub destroy: lomo_comm_destroy_fn,
}

/// Where a registered buffer lies in a tensor held by several ranks (`lomo_param_set_shard`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct lomo_shard_desc {
    /// `sizeof(lomo_shard_desc)`.
    pub struct_size: usize,
    /// `LOMO_LAYOUT_FULL`, `LOMO_LAYOUT_ROWS`, `LOMO_LAYOUT_COLS` or `LOMO_LAYOUT_FLAT`.
    pub layout: u32,
    /// The global tensor's shape (host memory, read during the call): ROWS needs the registered
    /// shape's rank and last dimension (rank ≥ 2), or rank ≤ 1 for a range of elements; COLS
    /// needs rank ≥ 2 and the same rows of the view (`prod(shape[:-1])`); FLAT any shape, the
    /// piece registered with rank ≤ 1.
    pub global_ndim: u32,
    pub global_shape: *const i64,
    /// ROWS: the piece's first row in the `[prod(shape[:-1]), shape[-1]]` view (rank ≤ 1: first
    /// element); COLS: its first column; FLAT: its first element; FULL: 0.
    pub offset: i64,
    /// Communicator of the ranks holding the pieces of this tensor (ROWS, COLS, FLAT;
    /// `LOMO_COMM_NONE` only when the piece is the whole tensor).
    pub piece_comm: u32,
    /// `LOMO_GRAD_REDUCED`, `LOMO_GRAD_ALL_REDUCE` or `LOMO_GRAD_REDUCE_SCATTER` (FLAT).
    pub grad_mode: u32,
    /// The group the library reduces the gradient over (`LOMO_COMM_NONE` with
    /// `LOMO_GRAD_REDUCED`).
    pub grad_comm: u32,
    /// 0 or `LOMO_SHARD_NORM_DUPLICATE`.
    pub flags: u32,
}

// The C constants are the core's (`crate::dist`), written as literals for cbindgen.
const _: () = assert!(
    LOMO_REDUCE_SUM == crate::dist::REDUCE_SUM
        && LOMO_REDUCE_MAX == crate::dist::REDUCE_MAX
        && LOMO_DTYPE_F64 == crate::dist::COMM_DTYPE_F64
        && LOMO_DIST_CHECK == crate::dist::DIST_CHECK
        && LOMO_SHARD_NORM_DUPLICATE == crate::dist::SHARD_NORM_DUPLICATE
        && LOMO_LAYOUT_FULL == crate::dist::Layout::Full as u32
        && LOMO_LAYOUT_ROWS == crate::dist::Layout::Rows as u32
        && LOMO_LAYOUT_COLS == crate::dist::Layout::Cols as u32
        && LOMO_LAYOUT_FLAT == crate::dist::Layout::Flat as u32
        && LOMO_GRAD_REDUCED == crate::dist::GradMode::Reduced as u32
        && LOMO_GRAD_ALL_REDUCE == crate::dist::GradMode::AllReduce as u32
        && LOMO_GRAD_REDUCE_SCATTER == crate::dist::GradMode::ReduceScatter as u32
);

fn comm_id(c: u32) -> Option<u32> {
    (c != LOMO_COMM_NONE).then_some(c)
}

/// Adds a communicator to `opt` between steps (not while accumulated gradients of
/// `lomo_accum_enable` are pending: `LOMO_STATUS_PHASE_ERROR`) and writes its id (0, 1, ... in order) to
/// `*out_comm`. `*comm` is copied; `comm->user` stays the caller's and is passed to
/// `comm->destroy` (if any) when `opt` is freed, never when this call fails. `opt`, `comm`,
/// `out_comm` must not be NULL. One thread at a time.
///
/// # Safety
/// If a pointer is NULL the call returns `LOMO_STATUS_NULL_ARGUMENT`; otherwise `opt` must come
/// from `lomo_optimizer_new` and stay alive during the call, `comm` must point to a readable
/// `lomo_comm` whose callbacks follow the documented contract for the optimizer's lifetime, and
/// `out_comm` to a writable `uint32_t`.
#[no_mangle]
pub unsafe extern "C" fn lomo_comm_add(
    opt: *mut lomo_optimizer,
    comm: *const lomo_comm,
    out_comm: *mut u32,
) -> Status {
    guard(|| {
        // SAFETY: non-NULL pointers are valid per the documented contract.
        let (opt, c, out) = unsafe {
            (
                deref(opt, "opt")?,
                deref(comm, "comm")?,
                deref_mut(out_comm, "out_comm")?,
            )
        };
        check_struct_size("lomo_comm", c.struct_size, std::mem::size_of::<lomo_comm>())?;
        let mut o = opt.inner.write();
        o.comm_add_check()?;
        // Nothing fails after the communicator exists: its `destroy` runs at lomo_optimizer_free.
        let comm = Comm::new(
            c.rank,
            c.size,
            c.user,
            c.all_reduce,
            c.reduce_scatter,
            c.all_gather,
            c.destroy,
        )?;
        *out = o.comm_add(comm);
        Ok(())
    })
}

/// Declares parameter `id` of `opt` a piece of a global tensor, between steps (not while
/// accumulated gradients are pending: `LOMO_STATUS_PHASE_ERROR`; with gradient accumulation on,
/// a `LOMO_GRAD_REDUCE_SCATTER` piece's buffer is resized to the whole tensor's gradient). With
/// pieces every rank must submit the same parameters in the same order from one thread, and call
/// `lomo_step_end` on every rank even with nothing to submit: AdaLomo all-reduces each piece's
/// statistics over `piece_comm` in `lomo_grad_submit` (rows: 2C + 3 doubles, 3 for rank ≤ 1;
/// columns: R + 2 doubles, then 1 more after a second read of the gradient; flat: R + C + 2,
/// then 1 more after re-reading the ≤ 2 cut rows), LOMO its non-finite flag when no NORM phase
/// checked the gradient and the policy is `LOMO_NONFINITE_PER_TENSOR`. With
/// `LOMO_GRAD_ALL_REDUCE` / `LOMO_GRAD_REDUCE_SCATTER` the gradient is reduced over `grad_comm`
/// first, in every phase (a NORM phase doubles the gradient traffic). The library's gradient
/// scratch (one, shared by the parameters, locked for a submission) is sized here for the
/// largest such parameter: its piece, plus a padded copy of the whole tensor when a
/// REDUCE_SCATTER tensor does not divide evenly. Refused before anything changes
/// (`LOMO_STATUS_INVALID_ARGUMENT`): REDUCE_SCATTER without FLAT, without `grad_comm`, on a
/// communicator without `reduce_scatter`, or on a piece that is not the partition of its rank;
/// ALL_REDUCE over `piece_comm`; a flat piece registered with rank ≥ 2 or turned into another
/// layout. Results equal one rank holding the whole tensor
/// (within f32 rounding: the statistics are summed in another order); stochastic rounding draws
/// by the global element index. Set the norm group with
/// `lomo_dist_set` so that the clip coefficient and the overflow decision are global. CUDA
/// parameters support `LOMO_LAYOUT_FULL`, `LOMO_LAYOUT_ROWS` and `LOMO_LAYOUT_COLS`, and
/// `LOMO_LAYOUT_FLAT` for LOMO and for AdaLomo on rank ≤ 1 tensors (AdaLomo flat pieces of
/// rank ≥ 2 tensors are `LOMO_STATUS_UNSUPPORTED`), with every gradient mode: the statistics
/// records are device memory, reduced on the submit's stream (an AdaLomo piece of columns in
/// two rounds), and a gradient the library reduces is copied to a device scratch (the caller's
/// buffer is only read), handed to the callback as device memory with the submit's stream, and
/// divided by the group size on that stream — the scratch is shared by the parameters, so
/// submits of library-reduced gradients must be ordered on one stream. The call allocates the
/// piece's device record (and grows the device scratch) and synchronizes. A flat piece's AdaLomo state becomes
/// the whole tensor's `[R]` and `[C]` vectors (zeroed; checkpoints save them as `<name>.row`,
/// `<name>.col`). `opt` and `desc` must not be NULL.
///
/// # Safety
/// If `opt` or `desc` is NULL the call returns `LOMO_STATUS_NULL_ARGUMENT`; otherwise `opt` must
/// come from `lomo_optimizer_new` and stay alive during the call, and `desc` must point to a
/// readable `lomo_shard_desc` whose `global_shape` holds `global_ndim` values.
#[no_mangle]
pub unsafe extern "C" fn lomo_param_set_shard(
    opt: *mut lomo_optimizer,
    id: u32,
    desc: *const lomo_shard_desc,
) -> Status {
    guard(|| {
        // SAFETY: non-NULL pointers are valid per the documented contract.
        let (opt, d) = unsafe { (deref(opt, "opt")?, deref(desc, "desc")?) };
        let size = std::mem::size_of::<lomo_shard_desc>();
        check_struct_size("lomo_shard_desc", d.struct_size, size)?;
        // SAFETY: `global_shape` holds `global_ndim` values (the caller's contract).
        let global_shape = unsafe { shape_from_raw(d.global_shape, d.global_ndim) }?;
        let desc = ShardDesc {
            layout: d.layout,
            global_shape,
            offset: d.offset,
            piece_comm: comm_id(d.piece_comm),
            grad_mode: d.grad_mode,
            grad_comm: comm_id(d.grad_comm),
            flags: d.flags,
        };
        opt.inner.write().param_set_shard(id, &desc)
    })
}

/// Sets the group over which `opt`'s step scalars are agreed, between steps (not while
/// accumulated gradients are pending: `LOMO_STATUS_PHASE_ERROR`): at every phase end
/// one all-reduce (SUM) of `[Σg², non-finite count]` over `norm_comm`, so the clip coefficient,
/// the skip decision and the loss scaler are the same on every rank (`LOMO_COMM_NONE`: this rank
/// alone, the default); `lomo_step_info` then reports the global norm and the non-finite count
/// of every rank (`grads_submitted` stays this rank's). `flags`: 0 or `LOMO_DIST_CHECK`. CUDA
/// parameters: the record is gathered from the device tensor records and reduced on the
/// `lomo_step_end` stream, then the decision kernel reads it (no host synchronization; with
/// `LOMO_DIST_CHECK` the agreement record is staged through device memory and read back, which
/// synchronizes). `opt` must not be NULL.
///
/// # Safety
/// If `opt` is NULL the call returns `LOMO_STATUS_NULL_ARGUMENT`; otherwise it must come from
/// `lomo_optimizer_new` and stay alive during the call.
#[no_mangle]
pub unsafe extern "C" fn lomo_dist_set(
    opt: *mut lomo_optimizer,
    norm_comm: u32,
    flags: u32,
) -> Status {
    guard(|| {
        // SAFETY: a non-NULL `opt` is a live optimizer from lomo_optimizer_new.
        let opt = unsafe { deref(opt, "opt") }?;
        opt.inner.write().dist_set(comm_id(norm_comm), flags)
    })
}
