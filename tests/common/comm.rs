//! Shared by the distributed tests: an in-process communicator for threads as ranks through the
//! real C ABI — `lomo_comm` callbacks (all-reduce, reduce-scatter, all-gather in any dtype the
//! library hands over) over a barrier and a slot table, reducing in rank order so every rank gets
//! the same bits — and the shard and norm-group helpers.

use std::ffi::c_void;
use std::sync::Arc;

use super::*;
use lomo::ffi::dist::*;
use parking_lot::Mutex;

pub const NORM: u32 = 0;
pub const UPDATE: u32 = 1;
pub const ACCUMULATE: u32 = 2;

/// One in-process group of `n` ranks.
pub struct Group {
    pub n: usize,
    barrier: Rendezvous,
    pub slots: Mutex<Vec<Vec<f64>>>,
    /// Every callback returns this code instead of reducing (0: work).
    pub fail: Mutex<i32>,
    /// Collectives entered by all ranks together (each rank counts its own calls).
    pub calls: Mutex<u64>,
    /// (k, code): the k-th call counted in `calls` (from 1) and every later one fail with `code`.
    pub fail_from: Mutex<Option<(u64, i32)>>,
}

impl Group {
    pub fn new(n: usize) -> Arc<Group> {
        Arc::new(Group {
            n,
            barrier: Rendezvous::new(n),
            slots: Mutex::new(vec![Vec::new(); n]),
            fail: Mutex::new(0),
            calls: Mutex::new(0),
            fail_from: Mutex::new(None),
        })
    }
}

/// A barrier that gives up after 20 s, so a rank that panicked (and never arrives) fails the
/// others' collectives (code -99) instead of hanging the test.
struct Rendezvous {
    n: usize,
    state: std::sync::Mutex<(usize, u64)>,
    cv: std::sync::Condvar,
}

impl Rendezvous {
    fn new(n: usize) -> Rendezvous {
        Rendezvous {
            n,
            state: std::sync::Mutex::new((0, 0)),
            cv: std::sync::Condvar::new(),
        }
    }

    fn wait(&self) -> bool {
        let mut st = self.state.lock().unwrap();
        let generation = st.1;
        st.0 += 1;
        if st.0 == self.n {
            *st = (0, generation + 1);
            self.cv.notify_all();
            return true;
        }
        let (st, timeout) = self
            .cv
            .wait_timeout_while(st, std::time::Duration::from_secs(20), |s| {
                s.1 == generation
            })
            .unwrap();
        drop(st);
        !timeout.timed_out()
    }
}

/// A rank's `user` pointer.
pub struct RankCtx {
    pub group: Arc<Group>,
    pub rank: usize,
}

/// Reads `count` elements of a callback dtype (f64, f32, f16, bf16) as f64 (exactly).
///
/// # Safety
/// `ptr` holds `count` readable elements of `dtype`.
unsafe fn read(ptr: *const c_void, count: usize, dtype: u32) -> Vec<f64> {
    // SAFETY: guaranteed by the caller.
    unsafe {
        match dtype {
            LOMO_DTYPE_F64 => std::slice::from_raw_parts(ptr as *const f64, count).to_vec(),
            F32 => std::slice::from_raw_parts(ptr as *const f32, count)
                .iter()
                .map(|&v| v as f64)
                .collect(),
            F16 | BF16 => std::slice::from_raw_parts(ptr as *const u16, count)
                .iter()
                .map(|&b| if dtype == F16 { from_f16(b) } else { from_bf16(b) } as f64)
                .collect(),
            d => panic!("the library handed dtype {d} to a callback"),
        }
    }
}

/// Writes `v` as elements of `dtype` (rounded to nearest).
///
/// # Safety
/// `ptr` holds `v.len()` writable elements of `dtype`.
unsafe fn write(ptr: *mut c_void, v: &[f64], dtype: u32) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        match dtype {
            LOMO_DTYPE_F64 => {
                std::slice::from_raw_parts_mut(ptr as *mut f64, v.len()).copy_from_slice(v)
            }
            F32 => {
                for (o, &x) in std::slice::from_raw_parts_mut(ptr as *mut f32, v.len())
                    .iter_mut()
                    .zip(v)
                {
                    *o = x as f32;
                }
            }
            _ => {
                for (o, &x) in std::slice::from_raw_parts_mut(ptr as *mut u16, v.len())
                    .iter_mut()
                    .zip(v)
                {
                    *o = if dtype == F16 {
                        f16(x as f32)
                    } else {
                        bf16(x as f32)
                    };
                }
            }
        }
    }
}

impl RankCtx {
    /// Counts a call; `Some(code)` when `Group::fail_from` says it fails.
    fn count_call(&self) -> Option<i32> {
        let mut calls = self.group.calls.lock();
        *calls += 1;
        match *self.group.fail_from.lock() {
            Some((k, code)) if *calls >= k => Some(code),
            _ => None,
        }
    }

    /// Deposits `mine`, waits for every rank, runs `f` on the slots, waits again. None when a
    /// rank never arrived (the callback then fails with -99).
    fn exchange<T>(&self, mine: Vec<f64>, f: impl FnOnce(&[Vec<f64>]) -> T) -> Option<T> {
        let g = &self.group;
        let len = mine.len();
        g.slots.lock()[self.rank] = mine;
        if !g.barrier.wait() {
            return None;
        }
        let slots = g.slots.lock();
        // Ranks in different collectives (a test of disagreeing ranks gone wrong): fail the
        // callback instead of panicking across the C boundary.
        let same = slots[..g.n].iter().all(|s| s.len() == len);
        let out = same.then(|| f(&slots[..g.n]));
        drop(slots);
        if !g.barrier.wait() {
            return None;
        }
        out
    }
}

/// Sums (or maxes) element `k` of every slot in rank order.
fn reduce_at(slots: &[Vec<f64>], k: usize, op: u32) -> f64 {
    let mut acc = slots[0][k];
    for s in &slots[1..] {
        acc = if op == LOMO_REDUCE_SUM {
            acc + s[k]
        } else {
            acc.max(s[k])
        };
    }
    acc
}

/// In place, any dtype the library uses (f64 records; f32/f16/bf16 gradients, summed in f64 in
/// rank order and rounded once).
pub unsafe extern "C" fn all_reduce(
    user: *mut c_void,
    buf: *mut c_void,
    count: usize,
    dtype: u32,
    op: u32,
    _stream: *mut c_void,
) -> i32 {
    // SAFETY: `user` is the RankCtx this test registered; `buf` holds `count` elements.
    let ctx = unsafe { &*(user as *const RankCtx) };
    let fail = *ctx.group.fail.lock();
    if fail != 0 {
        return fail;
    }
    if let Some(code) = ctx.count_call() {
        return code;
    }
    // SAFETY: as above.
    let mine = unsafe { read(buf, count, dtype) };
    let Some(out) = ctx.exchange(mine, |slots| {
        (0..count)
            .map(|k| reduce_at(slots, k, op))
            .collect::<Vec<_>>()
    }) else {
        return -99;
    };
    // SAFETY: as above.
    unsafe { write(buf, &out, dtype) };
    0
}

/// `count_per_rank × n` elements at `send`; this rank's sum of block `rank` into `recv`.
pub unsafe extern "C" fn reduce_scatter(
    user: *mut c_void,
    send: *const c_void,
    recv: *mut c_void,
    count_per_rank: usize,
    dtype: u32,
    op: u32,
    _stream: *mut c_void,
) -> i32 {
    // SAFETY: `user` is the RankCtx this test registered; the buffers hold the documented counts.
    let ctx = unsafe { &*(user as *const RankCtx) };
    let fail = *ctx.group.fail.lock();
    if fail != 0 {
        return fail;
    }
    if let Some(code) = ctx.count_call() {
        return code;
    }
    let (n, base) = (ctx.group.n, ctx.rank * count_per_rank);
    // SAFETY: as above.
    let mine = unsafe { read(send, count_per_rank * n, dtype) };
    let Some(out) = ctx.exchange(mine, |slots| {
        (0..count_per_rank)
            .map(|k| reduce_at(slots, base + k, op))
            .collect::<Vec<_>>()
    }) else {
        return -99;
    };
    // SAFETY: as above.
    unsafe { write(recv, &out, dtype) };
    0
}

/// `count_per_rank` elements from every rank into `recv`, in rank order.
pub unsafe extern "C" fn all_gather(
    user: *mut c_void,
    send: *const c_void,
    recv: *mut c_void,
    count_per_rank: usize,
    dtype: u32,
    _stream: *mut c_void,
) -> i32 {
    // SAFETY: `user` is the RankCtx this test registered; the buffers hold the documented counts.
    let ctx = unsafe { &*(user as *const RankCtx) };
    let fail = *ctx.group.fail.lock();
    if fail != 0 {
        return fail;
    }
    // SAFETY: as above.
    let mine = unsafe { read(send, count_per_rank, dtype) };
    let Some(out) = ctx.exchange(mine, |slots| slots.concat()) else {
        return -99;
    };
    // SAFETY: as above.
    unsafe { write(recv, &out, dtype) };
    0
}

pub unsafe extern "C" fn destroy(user: *mut c_void) {
    // SAFETY: the Box this test leaked into `user`, destroyed once by the optimizer.
    drop(unsafe { Box::from_raw(user as *mut RankCtx) });
}

pub fn add_comm(opt: &Opt, group: &Arc<Group>, rank: usize) -> u32 {
    add_comm_with(opt, group, rank, true)
}

/// A communicator with (`full`) or without the optional reduce_scatter and all_gather.
pub fn add_comm_with(opt: &Opt, group: &Arc<Group>, rank: usize, full: bool) -> u32 {
    let user = Box::into_raw(Box::new(RankCtx {
        group: group.clone(),
        rank,
    }));
    let c = lomo_comm {
        struct_size: std::mem::size_of::<lomo_comm>(),
        rank: rank as u32,
        size: group.n as u32,
        user: user.cast(),
        all_reduce: Some(all_reduce),
        reduce_scatter: if full { Some(reduce_scatter) } else { None },
        all_gather: if full { Some(all_gather) } else { None },
        destroy: Some(destroy),
    };
    let mut id = u32::MAX;
    // SAFETY: live handle, valid pointers.
    check(unsafe { lomo_comm_add(opt.0, &c, &mut id) }).unwrap();
    id
}

pub fn shard(
    opt: &Opt,
    id: u32,
    layout: u32,
    global: &[i64],
    offset: i64,
    comm: u32,
    flags: u32,
) -> Result<(), Failure> {
    shard_grad(
        opt,
        id,
        layout,
        global,
        offset,
        comm,
        (LOMO_GRAD_REDUCED, LOMO_COMM_NONE),
        flags,
    )
}

/// [`shard`] with a gradient mode and its communicator.
#[allow(clippy::too_many_arguments)]
pub fn shard_grad(
    opt: &Opt,
    id: u32,
    layout: u32,
    global: &[i64],
    offset: i64,
    comm: u32,
    (grad_mode, grad_comm): (u32, u32),
    flags: u32,
) -> Result<(), Failure> {
    let d = lomo_shard_desc {
        struct_size: std::mem::size_of::<lomo_shard_desc>(),
        layout,
        global_ndim: global.len() as u32,
        global_shape: global.as_ptr(),
        offset,
        piece_comm: comm,
        grad_mode,
        grad_comm,
        flags,
    };
    // SAFETY: live handle, valid pointers.
    check(unsafe { lomo_param_set_shard(opt.0, id, &d) })
}

pub fn dist_set(opt: &Opt, comm: u32, flags: u32) -> Result<(), Failure> {
    // SAFETY: live handle.
    check(unsafe { lomo_dist_set(opt.0, comm, flags) })
}
