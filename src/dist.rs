//! Core layer: several ranks as one optimizer, through the caller's collectives
//! (`notes/distributed.md`). The library owns no transport: a [`Comm`] is the caller's
//! all-reduce callback (and optional reduce-scatter / all-gather), called in place on buffers the
//! optimizer owns. Where the collectives happen is `crate::orchestrate`'s two reduction points:
//! per tensor (AdaLomo's partial statistics of a piece; LOMO's non-finite flag of a piece without
//! a NORM phase) and per phase end (Σg², the non-finite count and, with `LOMO_DIST_CHECK`, the
//! agreement record).
//!
//! Supported today: pieces laid out as the whole tensor ([`Layout::Full`], optionally
//! `LOMO_SHARD_NORM_DUPLICATE`), a range of rows of the `[prod(shape[:-1]), shape[-1]]` view
//! ([`Layout::Rows`]: FSDP2's dim-0 shards, column-parallel weights) or a range of its columns
//! ([`Layout::Cols`]: row-parallel weights) — on the CPU and CUDA backends — or a flat range
//! that cuts rows ([`Layout::Flat`]: DeepSpeed ZeRO-3, FSDP1) — on the CPU, and on CUDA for
//! LOMO and for AdaLomo on rank ≤ 1 tensors; gradients already
//! reduced by the caller ([`GradMode::Reduced`]) or averaged by the library on its scratch
//! ([`GradMode::AllReduce`], [`GradMode::ReduceScatter`], `optimizer::grad`; on CUDA a device
//! scratch). On CUDA the records and gradients handed to the callbacks are device memory,
//! reduced on the caller's stream.

use std::ffi::c_void;

use crate::error::{bail, Result};

/// `all_reduce(user, buf, count, dtype, op, stream)`: in place; 0 = success.
pub type AllReduceFn =
    unsafe extern "C" fn(*mut c_void, *mut c_void, usize, u32, u32, *mut c_void) -> i32;
/// `reduce_scatter(user, send, recv, count_per_rank, dtype, op, stream)`; 0 = success.
pub type ReduceScatterFn = unsafe extern "C" fn(
    *mut c_void,
    *const c_void,
    *mut c_void,
    usize,
    u32,
    u32,
    *mut c_void,
) -> i32;
/// `all_gather(user, send, recv, count_per_rank, dtype, stream)`; 0 = success.
pub type AllGatherFn =
    unsafe extern "C" fn(*mut c_void, *const c_void, *mut c_void, usize, u32, *mut c_void) -> i32;
/// `destroy(user)`, called once when the optimizer is freed.
pub type DestroyFn = unsafe extern "C" fn(*mut c_void);

/// Reduction operators of the callbacks (`LOMO_REDUCE_SUM`, `LOMO_REDUCE_MAX`).
pub(crate) const REDUCE_SUM: u32 = 0;
pub(crate) const REDUCE_MAX: u32 = 1;
/// The dtype code of f64 buffers handed to the callbacks (the statistics and scalar records).
pub(crate) const COMM_DTYPE_F64: u32 = 3;
/// `lomo_dist_set` flag: check at every phase end that the ranks agree.
pub(crate) const DIST_CHECK: u32 = 1;
/// `lomo_shard_desc.flags`: this piece duplicates another rank's; its Σg² is not counted here.
pub(crate) const SHARD_NORM_DUPLICATE: u32 = 1;

/// A caller's communicator: this rank in a group and the callbacks that reach the others.
#[derive(Debug)]
pub struct Comm {
    pub rank: u32,
    pub size: u32,
    /// The caller's `user` pointer, handed back to every callback.
    user: usize,
    all_reduce: AllReduceFn,
    pub reduce_scatter: Option<ReduceScatterFn>,
    pub all_gather: Option<AllGatherFn>,
    destroy: Option<DestroyFn>,
}

impl Comm {
    pub fn new(
        rank: u32,
        size: u32,
        user: *mut c_void,
        all_reduce: Option<AllReduceFn>,
        reduce_scatter: Option<ReduceScatterFn>,
        all_gather: Option<AllGatherFn>,
        destroy: Option<DestroyFn>,
    ) -> Result<Comm> {
        let Some(all_reduce) = all_reduce else {
            bail!(
                NullArgument,
                "lomo_comm.all_reduce is NULL (it is required)"
            );
        };
        if size == 0 || rank >= size {
            bail!(
                InvalidArgument,
                "lomo_comm: rank {rank} is not in a group of size {size}"
            );
        }
        Ok(Comm {
            rank,
            size,
            user: user as usize,
            all_reduce,
            reduce_scatter,
            all_gather,
            destroy,
        })
    }

    /// All-reduces `count` elements of dtype code `dtype` at `buf` in place (SUM) over the group:
    /// a gradient the library averages — on the host (`stream` NULL), or device memory ordered
    /// on the caller's `stream` (CUDA).
    ///
    /// # Safety
    /// `buf` holds `count` writable elements of `dtype` that nothing else uses during the call
    /// (device memory: nothing else on `stream` until the collective).
    pub unsafe fn all_reduce_grad(
        &self,
        buf: *mut c_void,
        count: usize,
        dtype: u32,
        stream: *mut c_void,
        what: &str,
    ) -> Result<()> {
        // SAFETY: the caller's callback with the documented contract; `buf` holds `count`
        // writable elements of `dtype` (the library's scratch) that live through the call.
        let rc = unsafe {
            (self.all_reduce)(
                self.user as *mut c_void,
                buf,
                count,
                dtype,
                REDUCE_SUM,
                stream,
            )
        };
        if rc != 0 {
            bail!(
                CommError,
                "the all_reduce callback failed with code {rc} on the gradient of {what} ({count} \
                 elements; rank {} of {}); nothing was changed by this call",
                self.rank,
                self.size
            );
        }
        Ok(())
    }

    /// Reduce-scatters (SUM) `count_per_rank × size` elements at `send` into `count_per_rank`
    /// at `recv` (this rank's partition), on the host (`stream` NULL) or on the caller's CUDA
    /// `stream`. `Unsupported` without the callback.
    ///
    /// # Safety
    /// `send` holds `count_per_rank × size` readable elements of `dtype`, `recv`
    /// `count_per_rank` writable ones, not overlapping, unused by anything else meanwhile.
    pub unsafe fn reduce_scatter_grad(
        &self,
        send: *const c_void,
        recv: *mut c_void,
        count_per_rank: usize,
        dtype: u32,
        stream: *mut c_void,
        what: &str,
    ) -> Result<()> {
        let Some(rs) = self.reduce_scatter else {
            bail!(
                Unsupported,
                "the communicator of {what} has no reduce_scatter callback"
            );
        };
        // SAFETY: the caller's callback with the documented contract; `send` holds
        // `count_per_rank × size` readable elements and `recv` `count_per_rank` writable ones,
        // both alive through the call.
        let rc = unsafe {
            rs(
                self.user as *mut c_void,
                send,
                recv,
                count_per_rank,
                dtype,
                REDUCE_SUM,
                stream,
            )
        };
        if rc != 0 {
            bail!(
                CommError,
                "the reduce_scatter callback failed with code {rc} on the gradient of {what} \
                 ({count_per_rank} elements per rank; rank {} of {}); nothing was changed by this \
                 call",
                self.rank,
                self.size
            );
        }
        Ok(())
    }

    /// All-reduces `buf` in place over the group (`op` `LOMO_REDUCE_SUM` or `LOMO_REDUCE_MAX`), on
    /// the host (stream NULL). `what` names the record in the error message.
    pub fn all_reduce_f64(&self, buf: &mut [f64], op: u32, what: &str) -> Result<()> {
        // SAFETY: `buf` is `len` writable f64 values of host memory that live through the call.
        unsafe { self.all_reduce_raw(buf.as_mut_ptr() as usize, buf.len(), op, 0, what) }
    }

    /// All-reduces `count` f64 values at `addr` in place over the group, enqueued on `stream`
    /// (CUDA: `addr` is device memory and the callback orders the collective after the work
    /// already on the stream; nothing waits for the device). `what` names the record in the
    /// error message.
    ///
    /// # Safety
    /// `addr` must hold `count` f64 values that the callback may read and write: host memory for
    /// stream 0 on the CPU backend, device memory of the stream's device on CUDA, live until the
    /// collective has run.
    pub unsafe fn all_reduce_raw(
        &self,
        addr: usize,
        count: usize,
        op: u32,
        stream: usize,
        what: &str,
    ) -> Result<()> {
        // SAFETY: `all_reduce` is the caller's callback with the documented contract; the buffer
        // is valid as the caller of this function guarantees.
        let rc = unsafe {
            (self.all_reduce)(
                self.user as *mut c_void,
                addr as *mut c_void,
                count,
                COMM_DTYPE_F64,
                op,
                stream as *mut c_void,
            )
        };
        if rc != 0 {
            bail!(
                CommError,
                "the all_reduce callback failed with code {rc} on {what} ({count} f64 values; \
                 rank {} of {}); nothing was changed by this call",
                self.rank,
                self.size
            );
        }
        Ok(())
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        if let Some(destroy) = self.destroy {
            // SAFETY: the caller's destructor for its own `user` pointer, called exactly once.
            unsafe { destroy(self.user as *mut c_void) }
        }
    }
}

/// How a registered buffer lies in the global tensor (`LOMO_LAYOUT_*`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// The buffer is the whole tensor.
    Full = 0,
    /// A range of rows of the `[prod(shape[:-1]), shape[-1]]` view (rank ≤ 1: of elements).
    Rows = 1,
    /// A range of columns of that view.
    Cols = 2,
    /// A range of the flattened tensor that may cut rows.
    Flat = 3,
}

/// What `lomo_grad_submit` receives for a piece (`LOMO_GRAD_*`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradMode {
    /// The already reduced gradient of the piece.
    Reduced = 0,
    /// The local gradient; the library averages it over `grad_comm`.
    AllReduce = 1,
    /// The full local gradient; the library reduce-scatters it to the piece.
    ReduceScatter = 2,
}

/// A registered buffer as a piece of a global tensor, checked against the registration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Shard {
    pub layout: Layout,
    /// Elements, rows and columns of the global tensor's `[R, C]` view (`[numel, 1]` for
    /// rank ≤ 1).
    pub global_numel: usize,
    pub global_rows: usize,
    pub global_cols: usize,
    /// Global index of the piece's first element (ROWS, FLAT; stochastic rounding draws by
    /// it), or its first column (COLS).
    pub elem_offset: u64,
    /// The communicator of the ranks that hold the other pieces (None: nothing to reduce).
    pub piece_comm: Option<u32>,
    /// Σg² of this piece is counted on another rank.
    pub norm_duplicate: bool,
    /// What `lomo_grad_submit` receives, and the group the library reduces it over.
    pub grad_mode: GradMode,
    pub grad_comm: Option<u32>,
    /// `REDUCE_SCATTER`: elements per rank of the padded partition, `ceil(numel / size)`.
    pub part: usize,
}

/// The optimizer's distributed setup: communicators and the group that agrees on the scalars.
#[derive(Debug, Default)]
pub struct Dist {
    pub comms: Vec<Comm>,
    /// The group of the phase-end record (`lomo_dist_set`).
    pub norm_comm: Option<u32>,
    /// `LOMO_DIST_CHECK`: check agreement at every phase end.
    pub check: bool,
    /// Configuration fingerprint for the check (formed at `lomo_dist_set`).
    pub fingerprint: u64,
    /// Where gradients reduced by the library land (`LOMO_GRAD_ALL_REDUCE`,
    /// `LOMO_GRAD_REDUCE_SCATTER`): sized at `lomo_param_set_shard`, shared by the parameters.
    pub scratch: GradScratch,
}

/// The library's gradient buffers: `recv` receives the reduced gradient (the all-reduced copy of
/// a piece, or this rank's partition of a reduce-scatter), `send` holds a zero-padded copy of a
/// full gradient whose tensor does not divide into equal partitions. f32 words (any gradient
/// dtype fits), sized for the largest parameter at `lomo_param_set_shard`, so steps allocate
/// nothing; locked for the duration of one submission.
#[derive(Debug, Default)]
pub struct GradScratch {
    pub bufs: parking_lot::Mutex<(Vec<f32>, Vec<f32>)>,
    /// Bytes held, readable while a submission holds the lock.
    held: std::sync::atomic::AtomicUsize,
}

impl GradScratch {
    /// Grows the buffers to at least `send` and `recv` f32 words (`OutOfMemory`: unchanged).
    pub fn reserve(&self, send: usize, recv: usize) -> Result<()> {
        let mut b = self.bufs.lock();
        let grow = |v: &Vec<f32>, n: usize| -> Result<Option<Vec<f32>>> {
            Ok(if n > v.len() {
                Some(crate::alloc::zeros(n, "the gradient scratch")?)
            } else {
                None
            })
        };
        let (s, r) = (grow(&b.0, send)?, grow(&b.1, recv)?);
        if let Some(s) = s {
            b.0 = s;
        }
        if let Some(r) = r {
            b.1 = r;
        }
        let bytes = 4 * (b.0.len() + b.1.len());
        self.held.store(bytes, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Bytes held (without waiting for a submission that holds the buffers).
    pub fn bytes(&self) -> usize {
        self.held.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Dist {
    /// Communicator `id`, or an error naming `what` uses it.
    pub fn comm(&self, id: u32, what: &str) -> Result<&Comm> {
        match self.comms.get(id as usize) {
            Some(c) => Ok(c),
            None => bail!(
                InvalidArgument,
                "{what}: no communicator {id} (add one with lomo_comm_add; {} so far)",
                self.comms.len()
            ),
        }
    }
}

/// The agreement record of a phase end: values every rank must hold equally. Reduced with MAX
/// over `(v, −v)` pairs, so every rank learns the largest and the smallest value of each.
pub const CHECK_FIELDS: [&str; 5] = [
    "gradients submitted in the phase",
    "learning rate",
    "step counter",
    "configuration (or a group's lr multiplier or weight decay, or the step's accumulated \
     micro-batches)",
    "registered parameters",
];

/// Reduces `values` (one per [`CHECK_FIELDS`]) with MAX over `(v, −v)` through `reduce` (an
/// in-place MAX all-reduce of the record over the norm group: on the host, or staged through
/// device memory by a CUDA backend) and fails with `DIST_MISMATCH` on every rank when any field
/// differs between ranks.
pub fn check_agreement(
    values: [f64; 5],
    reduce: impl FnOnce(&mut [f64], u32, &str) -> Result<()>,
) -> Result<()> {
    let mut rec = [0f64; 10];
    for (k, v) in values.iter().enumerate() {
        rec[2 * k] = *v;
        rec[2 * k + 1] = -*v;
    }
    reduce(
        &mut rec,
        REDUCE_MAX,
        "the agreement record (LOMO_DIST_CHECK)",
    )?;
    for (k, name) in CHECK_FIELDS.iter().enumerate() {
        let (max, min) = (rec[2 * k], -rec[2 * k + 1]);
        if max != min {
            bail!(
                DistMismatch,
                "the ranks disagree on the {name}: between {min} and {max} (every rank must \
                 submit the same parameters with the same lr and configuration in each phase)"
            );
        }
    }
    Ok(())
}
