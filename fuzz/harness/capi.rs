//! Fuzz target `capi`: sequences of C API calls decoded from the fuzzer's bytes — create with
//! any config, register any descriptor over buffers the harness owns, begin/submit/end/cancel in
//! any order, groups, state save/load (memory and file), diagnostics, injected allocation
//! failures — on the CPU backend or the emulated CUDA device.
//!
//! Invariants, checked after every call:
//! 1. no panic crosses the boundary (no `LOMO_STATUS_PANIC`; a panic escaping would abort);
//! 2. a non-OK status leaves the serialized state bytes (between steps) and every registered
//!    buffer unchanged, and a gradient buffer is never written;
//! 3. a NORM-phase submission never writes a parameter;
//! 4. an OK UPDATE submission of finite gradients onto finite parameters in the representable
//!    range (|p| <= 1e4, f16: <= 100; lr <= 1e-2, |g| <= 1e3) writes only finite values;
//! 5. inputs the contract calls invalid are refused: a misaligned or NULL buffer, a shape whose
//!    element count overflows 64 bits.

use std::ffi::{c_void, CString};
use std::ptr::{null, null_mut};

use lomo::ffi::accum::*;
use lomo::ffi::api::*;
use lomo::ffi::batch::*;
use lomo::ffi::dist::*;
use lomo::ffi::optimizer::*;
use lomo::ffi::state::*;
use lomo::ffi::strides::*;
use lomo::ffi::types::*;
use lomo::Status;

use super::{elem, get, set, Bytes, Mem, Rng};

/// How often each invariant was exercised (the stable test checks the harness is not vacuous):
/// OK UPDATE submissions checked for finiteness, failed calls checked for no change.
pub static CHECKED_UPDATES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
pub static CHECKED_FAILURES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

const NAMES: [&str; 7] = ["a", "b", "w.x", "c", "", "a", "layer.0.weight"];
const DIMS: [i64; 11] = [0, 1, 2, 3, 4, 5, 7, 8, 16, 33, 64];
/// Dimensions past any memory: the registration fails (overflow or out of memory), or (LOMO,
/// which allocates nothing per element) succeeds and the harness never submits the parameter.
const HUGE: [i64; 4] = [-1, 1 << 40, 1 << 62, i64::MAX];
const VALUES: [f32; 14] = [
    0.0, -0.0, 1e-3, -1e-3, 0.5, -0.5, 1.0, -1.0, 3.0, -7.5, 1e3, -1e3, 1e-40, 6e-8,
];
const NONFINITE: [f32; 3] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY];
const LRS: [f32; 7] = [0.0, 1e-4, 1e-3, 1e-2, -1.0, f32::NAN, f32::INFINITY];
/// Buffers the harness owns hold at most this many elements.
const MAX_NUMEL: usize = 4096;

struct Param {
    id: u32,
    dtype: u32,
    numel: usize,
    /// The registered shape (for `lomo_param_set_strides`).
    dims: Vec<i64>,
    /// None: registered with a shape no buffer could hold (LOMO, huge): never submitted.
    mem: Option<Mem>,
}

struct Session {
    opt: *mut lomo_optimizer,
    params: Vec<Param>,
    /// Serialized states seen so far (to load back, mutated or not).
    snapshots: Vec<Vec<u8>>,
    phase: Option<u32>,
    dir: std::path::PathBuf,
    /// Fail this fallible allocation of the next call.
    arm: Option<u64>,
}

fn status(s: Status) -> u32 {
    let s = s as u32;
    assert_ne!(
        s,
        Status::Panic as u32,
        "panic at the boundary: {}",
        last_error()
    );
    s
}

fn last_error() -> String {
    // SAFETY: NULL/0 asks for the length; then a buffer of that length + 1.
    unsafe {
        let n = lomo_last_error_message(null_mut(), 0);
        let mut buf = vec![0u8; n + 1];
        lomo_last_error_message(buf.as_mut_ptr().cast(), buf.len());
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }
}

impl Session {
    /// The state bytes, if the optimizer is between steps.
    fn state(&self) -> Option<Vec<u8>> {
        if self.opt.is_null() {
            return None;
        }
        let mut n = 0usize;
        // SAFETY: live handle, valid out pointer.
        if unsafe { lomo_state_size(self.opt, &mut n) } != Status::Ok {
            return None;
        }
        // An empty AdaLomo tensor on the emulated device may have a huge (zero) column state in
        // its checkpoint ([0, 2^40]: 4 TiB): the harness does not hold such states.
        if n > 64 << 20 {
            return None;
        }
        let mut buf = vec![0u8; n];
        let mut w = 0usize;
        // SAFETY: `buf` holds `n` writable bytes.
        let s = unsafe { lomo_state_serialize(self.opt, buf.as_mut_ptr(), n, &mut w) };
        if s == Status::OutOfMemory {
            return None; // an injected allocation failure (op 21 before op 17)
        }
        assert_eq!(s, Status::Ok, "{}", last_error());
        assert_eq!(w, n, "lomo_state_size is exact");
        Some(buf)
    }

    /// Accumulation phases pending and buffer bytes (None without an optimizer).
    fn accum(&self) -> Option<(u32, u64)> {
        let (mut pending, mut bytes) = (0u32, 0u64);
        // SAFETY: live handle (or NULL, refused), valid out pointers.
        let st = unsafe { lomo_accum_get(self.opt, &mut pending, &mut bytes) };
        (st == Status::Ok).then_some((pending, bytes))
    }

    fn buffers(&self) -> Vec<Option<Mem>> {
        self.params.iter().map(|p| p.mem.clone()).collect()
    }

    fn free(&mut self) {
        // SAFETY: NULL or a live handle, freed once.
        unsafe { lomo_optimizer_free(self.opt) };
        self.opt = null_mut();
        self.params.clear();
        self.phase = None;
    }
}

fn config(b: &mut Bytes<'_>) -> lomo_config {
    // SAFETY: all-zero is a valid lomo_config (plain numbers).
    let mut c: lomo_config = unsafe { std::mem::zeroed() };
    let algorithm = b.pick(&[0u32, 1, 1, 0, 2]);
    // SAFETY: valid out pointer.
    if unsafe { lomo_config_init(&mut c, algorithm) } != Status::Ok {
        c.struct_size = std::mem::size_of::<lomo_config>();
        c.algorithm = algorithm;
    }
    for _ in 0..b.u8() % 4 {
        match b.u8() % 17 {
            0 => c.weight_decay = b.pick(&[0.0, 0.01, 0.1, -1.0, f64::NAN]),
            1 => c.clip_grad_norm = b.pick(&[0.0, 1.0, 0.5, 1e-3, -1.0, f64::INFINITY]),
            2 => c.clip_grad_value = b.pick(&[0.0, 1.0, 1e-3, -1.0]),
            3 => c.loss_scale_mode = b.pick(&[0, 1, 2, 2, 7]),
            4 => c.loss_scale = b.pick(&[1.0, 1024.0, 65536.0, 0.0, -1.0, 1e9]),
            5 => c.scale_factor = b.pick(&[2.0, 1.0, 0.5, 4.0]),
            6 => c.scale_window = b.pick(&[1, 2, 1000, 0]),
            7 => c.min_loss_scale = b.pick(&[1.0, 0.0, 1e-4, 1e6]),
            8 => c.hysteresis = b.pick(&[1, 2, 0]),
            9 => c.eps1 = b.pick(&[1e-30, 1e-3, 0.0, -1.0]),
            10 => c.eps2 = b.pick(&[1e-3, 0.0, 1.0, -1.0]),
            11 => c.clip_threshold = b.pick(&[1.0, 0.5, 10.0, 0.0]),
            12 => c.decay_rate = b.pick(&[-0.8, -0.5, 0.5, 0.0, -1.0]),
            13 => c.rounding = b.pick(&[0, 1, 5]),
            14 => c.seed = b.u64(),
            15 => c.struct_size = b.pick(&[0, 8, std::mem::size_of::<lomo_config>() + 8]),
            _ => c.algorithm = b.pick(&[0, 1, 3]),
        }
    }
    c
}

/// A shape from the fuzzer: (dims, element count if it fits 64 bits at 4 bytes per element,
/// whether a dimension is huge or negative).
fn shape(b: &mut Bytes<'_>) -> (Vec<i64>, Option<usize>, bool) {
    let rank = match b.u8() % 16 {
        15 => 33 + (b.u8() % 8) as usize, // past the maximum rank
        r => (r % 5) as usize,
    };
    let mut dims = Vec::with_capacity(rank);
    let mut huge = false;
    for _ in 0..rank {
        if b.one_in(12) {
            huge = true;
            dims.push(b.pick(&HUGE));
        } else {
            dims.push(b.pick(&DIMS));
        }
    }
    let numel = if dims.iter().any(|&d| d < 0) {
        None
    } else if dims.contains(&0) {
        Some(0)
    } else {
        dims.iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d as usize))
            .filter(|n| n.checked_mul(4).is_some())
    };
    (dims, numel, huge)
}

fn fill(mem: &mut Mem, dtype: u32, numel: usize, b: &mut Bytes<'_>, nonfinite: bool) {
    let mut rng = Rng(b.u16() as u64 * 0x9E37_79B9 + 1);
    for i in 0..numel {
        set(mem, dtype, i, rng.pick(&VALUES));
    }
    if nonfinite && numel > 0 {
        let i = (rng.next() as usize) % numel;
        set(mem, dtype, i, rng.pick(&NONFINITE));
    }
}

/// Whether every element is finite and within `bound`.
fn tame(mem: &Mem, dtype: u32, numel: usize, bound: f32) -> bool {
    (0..numel).all(|i| get(mem, dtype, i).abs() <= bound)
}

fn register(s: &mut Session, b: &mut Bytes<'_>, cuda: bool) -> u32 {
    let name = CString::new(b.pick(&NAMES)).unwrap();
    let (dims, numel, huge) = shape(b);
    let dtype = b.pick(&[0u32, 1, 2, 0, 1, 2, 3]);
    let device = match b.u8() % 8 {
        0 => -2,
        1 => 1,
        2 => -1,
        3 => 0,
        _ if cuda => 0,
        _ => -1,
    };
    let group = b.pick(&[0u32, 0, 1, 7]);
    let flags = b.pick(&[0u32, 0, 1, 2]);
    let fits = numel.is_some_and(|n| n <= MAX_NUMEL);
    if !fits && !huge {
        return Status::Ok as u32; // large but ordinary: no buffer of ours holds it, skip
    }
    let n = numel.filter(|_| fits).unwrap_or(0);
    let mut mem = Mem::new(n.max(4) * elem(dtype));
    fill(&mut mem, dtype, n, b, false);
    let misalign = b.one_in(16) && elem(dtype) > 1;
    let null_data = b.one_in(16);
    let data: *mut c_void = if null_data {
        null_mut()
    } else if misalign {
        // SAFETY: one byte into our own buffer (never dereferenced by a correct library).
        unsafe { mem.ptr().add(1).cast() }
    } else {
        mem.ptr().cast()
    };
    let desc = lomo_param_desc {
        struct_size: if b.one_in(32) {
            4
        } else {
            std::mem::size_of::<lomo_param_desc>()
        },
        name: if b.one_in(32) { null() } else { name.as_ptr() },
        data,
        dtype,
        ndim: dims.len() as u32,
        shape: if dims.is_empty() {
            null()
        } else {
            dims.as_ptr()
        },
        device,
        group,
        flags,
    };
    let mut id = u32::MAX;
    // SAFETY: every pointer is valid for the call or NULL.
    let st = status(unsafe { lomo_param_register(s.opt, &desc, &mut id) });
    let valid_dtype = dtype < 3;
    if numel.is_none() && valid_dtype && desc.struct_size == std::mem::size_of::<lomo_param_desc>()
    {
        assert_ne!(st, 0, "a shape overflowing 64 bits was accepted: {dims:?}");
    }
    if misalign && valid_dtype && n > 0 {
        assert_ne!(st, 0, "a misaligned buffer was accepted");
    }
    if null_data && n > 0 {
        assert_ne!(st, 0, "a NULL buffer was accepted for {n} elements");
    }
    if st == 0 {
        assert_eq!(id as usize, s.params.len(), "ids are dense");
        let usable = fits && !misalign && !null_data;
        s.params.push(Param {
            id,
            dtype,
            numel: n,
            dims,
            mem: usable.then_some(mem),
        });
    }
    st
}

fn submit(s: &mut Session, b: &mut Bytes<'_>) -> u32 {
    let k = b.u8() as usize;
    let (id, p) = if !s.params.is_empty() && k % 8 != 0 {
        let i = k % s.params.len();
        (s.params[i].id, Some(i))
    } else {
        (b.pick(&[u32::MAX, 0, 1, 5, 1000]), None)
    };
    if let Some(i) = p {
        if s.params[i].mem.is_none() {
            return 0; // a buffer we do not hold in full: never handed to the library
        }
    }
    let numel = p.map_or(0, |i| s.params[i].numel);
    let gdtype = b.pick(&[0u32, 1, 2, 0, 4]);
    let nonfinite = b.one_in(6);
    let mut g = Mem::new(numel.max(4) * elem(gdtype));
    fill(&mut g, gdtype, numel, b, nonfinite);
    let null_grad = b.one_in(24);
    let misalign = b.one_in(24) && elem(gdtype) > 1;
    let gptr: *const c_void = if null_grad {
        null()
    } else if misalign {
        // SAFETY: one byte into our own buffer.
        unsafe { g.ptr().add(1).cast() }
    } else {
        g.ptr().cast()
    };
    let before = p.map(|i| s.params[i].mem.clone().unwrap());
    let tame_before = p.is_some_and(|i| {
        let q = &s.params[i];
        let bound = if q.dtype == 1 { 100.0 } else { 1e4 };
        tame(q.mem.as_ref().unwrap(), q.dtype, numel, bound)
    });
    let g_before = g.clone();
    // SAFETY: live handle (or NULL); `gptr` holds `numel` elements of `gdtype` or is refused.
    let st = status(unsafe { lomo_grad_submit(s.opt, id, gptr, gdtype, null_mut()) });
    assert_eq!(g, g_before, "the gradient buffer was written");
    if misalign && numel > 0 && gdtype < 3 {
        assert_ne!(st, 0, "a misaligned gradient was accepted");
    }
    if let (Some(i), Some(before)) = (p, before) {
        let q = &s.params[i];
        let after = q.mem.as_ref().unwrap();
        if st != 0 || matches!(s.phase, Some(0 | 2)) {
            assert_eq!(
                after, &before,
                "a failed, NORM- or ACCUMULATE-phase submission wrote the parameter"
            );
        }
        if st == 0 && s.phase == Some(1) && tame_before && !nonfinite {
            CHECKED_UPDATES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            for j in 0..numel {
                let v = get(after, q.dtype, j);
                assert!(v.is_finite(), "an update of finite inputs wrote {v} at {j}");
            }
        }
    }
    st
}

/// `lomo_param_set_strides` of a registered parameter (or an unknown id): contiguous,
/// reversed (a transpose), a rotation, or fuzzed strides (negative, gaps, overlaps, huge), with
/// the rank right or not, or NULL.
fn set_strides(s: &mut Session, b: &mut Bytes<'_>) -> u32 {
    let k = b.u8() as usize;
    let (id, dims) = match s.params.get(k % s.params.len().max(1)) {
        Some(p) if k % 8 != 0 => (p.id, p.dims.clone()),
        _ => (b.pick(&[u32::MAX, 0, 1, 9]), vec![2, 3]),
    };
    let contiguous = |order: &[usize]| {
        // Strides of the dims laid out in `order` (outermost first).
        let mut st = vec![0i64; dims.len()];
        let mut acc = 1i64;
        for &d in order.iter().rev() {
            st[d] = acc;
            acc = acc.saturating_mul(dims[d].max(1));
        }
        st
    };
    let ident: Vec<usize> = (0..dims.len()).collect();
    let mut strides = match b.u8() % 5 {
        0 => contiguous(&ident),
        1 => contiguous(&ident.iter().rev().copied().collect::<Vec<_>>()),
        2 => {
            let mut o = ident.clone();
            let r = 1.min(o.len());
            o.rotate_left(r);
            contiguous(&o)
        }
        3 => (0..dims.len())
            .map(|_| b.pick(&[0i64, 1, 2, 3, -1, 4096, i64::MAX, 1 << 40]))
            .collect(),
        _ => {
            let mut st = contiguous(&ident);
            if let Some(x) = st.first_mut() {
                *x = x.saturating_add(b.pick(&[1i64, -1, 2]));
            }
            st
        }
    };
    if b.one_in(8) {
        strides.push(1); // rank mismatch
    }
    let ptr = if b.one_in(16) {
        null()
    } else {
        strides.as_ptr()
    };
    // SAFETY: live handle (or NULL); `strides` readable for its length (or NULL).
    status(unsafe { lomo_param_set_strides(s.opt, id, strides.len() as u32, ptr) })
}

/// `lomo_grad_submit_batch` of up to 6 entries: registered parameters (held buffers only) or
/// unknown ids, duplicates, right or wrong element counts and dtypes, NULL arrays. Checks: a
/// gradient is never written; a failed batch, or one in a NORM or ACCUMULATE phase, writes no
/// parameter (the loop in `run` checks the failed ones); an OK UPDATE batch of finite
/// gradients onto tame parameters writes finite values.
fn submit_batch(s: &mut Session, b: &mut Bytes<'_>) -> u32 {
    let n = (b.u8() % 7) as usize;
    let mut ids = Vec::with_capacity(n);
    let mut grads: Vec<Mem> = Vec::with_capacity(n);
    let mut dtypes = Vec::with_capacity(n);
    let mut counts = Vec::with_capacity(n);
    let mut which = Vec::with_capacity(n);
    let mut nonfinite = false;
    for _ in 0..n {
        let k = b.u8() as usize;
        let p = (!s.params.is_empty() && k % 8 != 0)
            .then(|| k % s.params.len())
            .filter(|&i| s.params[i].mem.is_some());
        let (id, numel) = match p {
            Some(i) => (s.params[i].id, s.params[i].numel),
            None => (b.pick(&[u32::MAX, 0, 1, 5, 1000]), 0),
        };
        let gdtype = match p {
            Some(i) if !b.one_in(8) => s.params[i].dtype.min(2),
            _ => b.pick(&[0u32, 1, 2, 4]),
        };
        let bad = b.one_in(6);
        nonfinite |= bad;
        let mut g = Mem::new(numel.max(4) * elem(gdtype));
        fill(&mut g, gdtype, numel, b, bad);
        let count = if b.one_in(12) {
            numel as u64 + 1
        } else {
            numel as u64
        };
        ids.push(id);
        dtypes.push(gdtype);
        counts.push(count);
        which.push(p);
        grads.push(g);
    }
    let ptrs: Vec<*const c_void> = grads
        .iter_mut()
        .map(|g| {
            if b.one_in(32) {
                null()
            } else {
                g.ptr().cast_const().cast()
            }
        })
        .collect();
    let g_before = grads.clone();
    let bufs_before = s.buffers();
    let tame_before = which.iter().flatten().all(|&i| {
        let q = &s.params[i];
        let bound = if q.dtype == 1 { 100.0 } else { 1e4 };
        tame(q.mem.as_ref().unwrap(), q.dtype, q.numel, bound)
    });
    let null_arrays = b.one_in(24);
    let arr = |p: *const u8| if null_arrays { null() } else { p };
    // SAFETY: live handle (or NULL); arrays of `n` entries (or NULL, refused); each gradient holds
    // its parameter's element count of its dtype (or is refused by the count or dtype check).
    let st = status(unsafe {
        lomo_grad_submit_batch(
            s.opt,
            n,
            arr(ids.as_ptr().cast()).cast(),
            arr(ptrs.as_ptr().cast()).cast(),
            arr(dtypes.as_ptr().cast()).cast(),
            arr(counts.as_ptr().cast()).cast(),
            null_mut(),
        )
    });
    assert!(grads == g_before, "a gradient buffer was written");
    if null_arrays && n > 0 {
        assert_ne!(st, 0, "NULL arrays were accepted");
    }
    if st == 0 && matches!(s.phase, Some(0 | 2)) {
        assert!(
            s.buffers() == bufs_before,
            "a NORM- or ACCUMULATE-phase batch wrote a parameter"
        );
    }
    if st == 0 && s.phase == Some(1) && tame_before && !nonfinite {
        CHECKED_UPDATES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for &i in which.iter().flatten() {
            let q = &s.params[i];
            for j in 0..q.numel {
                let v = get(q.mem.as_ref().unwrap(), q.dtype, j);
                assert!(
                    v.is_finite(),
                    "a batch update of finite inputs wrote {v} at {j}"
                );
            }
        }
    }
    st
}

/// The code the one-rank communicator's next collective returns (0: success).
static COMM_FAIL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

fn comm_result() -> i32 {
    COMM_FAIL.swap(0, std::sync::atomic::Ordering::Relaxed)
}

fn elem_bytes(dtype: u32) -> usize {
    match dtype {
        1 | 2 => 2,
        3 => 8,
        _ => 4,
    }
}

/// A communicator that reaches no other rank: all-reduce leaves the buffer (one rank's sum),
/// reduce-scatter copies this rank's slot, all-gather this rank's piece into every slot
/// (`user` is the group size as an address; rank 0).
unsafe extern "C" fn all_reduce(
    _user: *mut c_void,
    _buf: *mut c_void,
    _count: usize,
    _dtype: u32,
    _op: u32,
    _stream: *mut c_void,
) -> i32 {
    comm_result()
}

unsafe extern "C" fn reduce_scatter(
    _user: *mut c_void,
    send: *const c_void,
    recv: *mut c_void,
    count: usize,
    dtype: u32,
    _op: u32,
    _stream: *mut c_void,
) -> i32 {
    let n = count * elem_bytes(dtype);
    // SAFETY: `send` holds count × size elements and `recv` count (the callback contract);
    // rank 0's slot is the first.
    unsafe { std::ptr::copy(send.cast::<u8>(), recv.cast::<u8>(), n) };
    comm_result()
}

unsafe extern "C" fn all_gather(
    user: *mut c_void,
    send: *const c_void,
    recv: *mut c_void,
    count: usize,
    dtype: u32,
    _stream: *mut c_void,
) -> i32 {
    let n = count * elem_bytes(dtype);
    for r in 0..(user as usize).max(1) {
        // SAFETY: `send` holds count elements, `recv` count × size (the callback contract).
        unsafe { std::ptr::copy(send.cast::<u8>(), recv.cast::<u8>().add(r * n), n) };
    }
    comm_result()
}

/// `lomo_comm_add` of the one-rank communicator (size 1 mostly; 2 as rank 0 or 1: wrong sums, never
/// memory errors), with or without the optional collectives, or a bad descriptor.
fn comm_add(s: &mut Session, b: &mut Bytes<'_>) -> u32 {
    let size = b.pick(&[1u32, 1, 1, 2, 0]);
    let rank = b.pick(&[0u32, 0, 1, 2]);
    let full = b.one_in(2) || b.one_in(2);
    let c = lomo_comm {
        struct_size: if b.one_in(32) {
            4
        } else {
            std::mem::size_of::<lomo_comm>()
        },
        rank,
        size,
        user: size as usize as *mut c_void,
        all_reduce: if b.one_in(32) { None } else { Some(all_reduce) },
        reduce_scatter: if full { Some(reduce_scatter) } else { None },
        all_gather: if full { Some(all_gather) } else { None },
        destroy: None,
    };
    let mut id = u32::MAX;
    // SAFETY: live handle (or NULL); valid descriptor and out pointer.
    status(unsafe { lomo_comm_add(s.opt, &c, &mut id) })
}

/// `lomo_param_set_shard` of a registered parameter: every layout (FULL, ROWS, COLS, FLAT, bad),
/// a global shape that is the local one, twice it (along the first dimension or flat) or fuzzed,
/// offsets, communicators and gradient modes (REDUCED, ALL_REDUCE, REDUCE_SCATTER, bad).
fn set_shard(s: &mut Session, b: &mut Bytes<'_>) -> u32 {
    let k = b.u8() as usize;
    let (id, dims, numel) = match s.params.get(k % s.params.len().max(1)) {
        Some(p) if k % 8 != 0 => (p.id, p.dims.clone(), p.numel as i64),
        _ => (b.pick(&[u32::MAX, 0, 3]), vec![4, 2], 8),
    };
    let layout = b.pick(&[
        LOMO_LAYOUT_FULL,
        LOMO_LAYOUT_ROWS,
        LOMO_LAYOUT_COLS,
        LOMO_LAYOUT_FLAT,
        LOMO_LAYOUT_FLAT,
        9,
    ]);
    let mut global = dims.clone();
    match b.u8() % 5 {
        0 => {}
        1 => {
            if let Some(d) = global.first_mut() {
                *d = d.saturating_mul(2);
            }
        }
        2 => global = vec![numel.saturating_mul(2).max(1) / 2 + 1, 2],
        3 => global = vec![numel.saturating_mul(2)],
        _ => {
            for d in global.iter_mut() {
                *d = b.pick(&[0i64, 1, 3, 64, -1, 1 << 40]);
            }
        }
    }
    let grad_mode = b.pick(&[
        LOMO_GRAD_REDUCED,
        LOMO_GRAD_ALL_REDUCE,
        LOMO_GRAD_REDUCE_SCATTER,
        LOMO_GRAD_REDUCE_SCATTER,
        5,
    ]);
    let d = lomo_shard_desc {
        struct_size: std::mem::size_of::<lomo_shard_desc>(),
        layout,
        global_ndim: global.len() as u32,
        global_shape: if global.is_empty() || b.one_in(32) {
            null()
        } else {
            global.as_ptr()
        },
        offset: b.pick(&[0i64, 0, 1, numel, -1, i64::MAX]),
        piece_comm: b.pick(&[0u32, 0, 1, LOMO_COMM_NONE, 9]),
        grad_mode,
        grad_comm: b.pick(&[0u32, 0, 1, LOMO_COMM_NONE]),
        flags: b.pick(&[0u32, 0, LOMO_SHARD_NORM_DUPLICATE, 8]),
    };
    // SAFETY: live handle (or NULL); the descriptor's shape holds global_ndim values (or NULL).
    status(unsafe { lomo_param_set_shard(s.opt, id, &d) })
}

fn deserialize(s: &mut Session, b: &mut Bytes<'_>) -> u32 {
    let mut bytes = if s.snapshots.is_empty() {
        Vec::new()
    } else {
        let i = b.u8() as usize % s.snapshots.len();
        s.snapshots[i].clone()
    };
    for _ in 0..b.u8() % 4 {
        if bytes.is_empty() {
            break;
        }
        let at = b.u16() as usize % bytes.len();
        match b.u8() % 3 {
            0 => bytes[at] ^= 1 << (b.u8() % 8),
            1 => bytes.truncate(at),
            _ => bytes[at] = b.u8(),
        }
    }
    let ptr = if b.one_in(32) { null() } else { bytes.as_ptr() };
    // SAFETY: live handle (or NULL); `bytes` readable for its length.
    status(unsafe { lomo_state_deserialize(s.opt, ptr, bytes.len()) })
}

/// One decoded call; returns its status.
fn step(s: &mut Session, b: &mut Bytes<'_>, cuda: bool) -> u32 {
    let op = b.u8() % 35;
    // SAFETY (every call below): `s.opt` is NULL or a live handle; out pointers are valid.
    unsafe {
        match op {
            0 => {
                let c = config(b);
                let mut o = null_mut();
                let st = status(lomo_optimizer_new(&c, &mut o));
                if st == 0 {
                    s.free();
                    s.opt = o;
                } else {
                    assert!(o.is_null(), "an output written on failure");
                }
                st
            }
            1..=4 => register(s, b, cuda),
            5 => status(lomo_group_set(
                s.opt,
                b.pick(&[0, 1, 2, 7]),
                b.pick(&[1.0, 0.0, 0.5, -1.0, f64::NAN]),
                b.pick(&[0.0, 0.1, -1.0, f64::INFINITY]),
            )),
            6 | 7 => {
                let phase = b.pick(&[0u32, 1, 1, 2, 2, 3]);
                let st = status(lomo_step_begin(s.opt, phase, b.pick(&LRS), null_mut()));
                if st == 0 {
                    s.phase = Some(phase);
                }
                st
            }
            8..=13 => submit(s, b),
            14 | 15 => {
                let st = status(lomo_step_end(s.opt, null_mut()));
                if st == 0 {
                    s.phase = None;
                }
                st
            }
            16 => {
                let st = status(lomo_step_cancel(s.opt));
                if st == 0 {
                    s.phase = None;
                }
                st
            }
            17 => {
                if let Some(st) = s.state() {
                    s.snapshots.push(st);
                    if s.snapshots.len() > 4 {
                        s.snapshots.remove(0);
                    }
                }
                0
            }
            18 => deserialize(s, b),
            19 => {
                let path = CString::new(s.dir.join("opt.safetensors").to_str().unwrap()).unwrap();
                if b.one_in(2) {
                    status(lomo_state_save(s.opt, path.as_ptr()))
                } else {
                    status(lomo_state_load(s.opt, path.as_ptr()))
                }
            }
            20 => {
                let mut info = lomo_step_info {
                    struct_size: if b.one_in(8) {
                        3
                    } else {
                        std::mem::size_of::<lomo_step_info>()
                    },
                    ..Default::default()
                };
                let st = status(lomo_step_info_get(s.opt, &mut info));
                let mut scale = 0f32;
                status(lomo_loss_scale(s.opt, &mut scale));
                let mut m = lomo_memory_stats {
                    struct_size: std::mem::size_of::<lomo_memory_stats>(),
                    ..Default::default()
                };
                status(lomo_memory_stats_get(s.opt, &mut m));
                let mut n = 0u32;
                status(lomo_param_count(s.opt, &mut n));
                let (mut lr, mut wd) = (0f64, 0f64);
                status(lomo_group_get(s.opt, b.u8() as u32 % 4, &mut lr, &mut wd));
                let mut p = null();
                status(lomo_cuda_loss_scale_ptr(s.opt, &mut p));
                let _ = lomo_status_str(b.u32());
                st
            }
            21 => {
                // The next call fails its k-th fallible allocation (the library's test hook).
                s.arm = Some(b.u8() as u64 % 8);
                0
            }
            22 => status(lomo_step_end(null_mut(), null_mut())),
            23 => {
                let mut o = null_mut();
                status(lomo_optimizer_new(null(), &mut o))
            }
            24 | 25 => submit_batch(s, b),
            26 => status(lomo_accum_enable(
                s.opt,
                b.pick(&[LOMO_ACCUM_F32, LOMO_ACCUM_PARAM_DTYPE, 2]),
                b.pick(&[LOMO_ACCUM_SUM, LOMO_ACCUM_MEAN, 7]),
            )),
            27 => status(lomo_accum_disable(s.opt)),
            28 => set_strides(s, b),
            29 => {
                let (mut pending, mut bytes) = (0u32, 0u64);
                let st = status(lomo_accum_get(s.opt, &mut pending, &mut bytes));
                let mut n = 0u64;
                status(lomo_cuda_launch_count(s.opt, &mut n));
                status(lomo_accum_get(s.opt, null_mut(), &mut bytes));
                st
            }
            30 => status(lomo_step_cancel(s.opt)),
            31 => comm_add(s, b),
            32 => set_shard(s, b),
            33 => status(lomo_dist_set(
                s.opt,
                b.pick(&[0, 1, LOMO_COMM_NONE, 7]),
                b.pick(&[0, LOMO_DIST_CHECK, 4]),
            )),
            _ => {
                // The next collective fails with this code (0: none fails).
                COMM_FAIL.store(b.pick(&[0, 0, -3, 1]), std::sync::atomic::Ordering::Relaxed);
                0
            }
        }
    }
}

/// Runs one fuzz input.
pub fn run(data: &[u8]) {
    COMM_FAIL.store(0, std::sync::atomic::Ordering::Relaxed);
    let mut b = Bytes::new(data);
    // The emulated CUDA device for 1 input in 8 (it runs ten times slower than the CPU).
    let cuda = b.u8() % 8 == 0;
    if cuda {
        super::emulate_cuda();
    }
    let dir = std::env::temp_dir().join(format!("lomo_fuzz_capi_{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let mut s = Session {
        opt: null_mut(),
        params: Vec::new(),
        snapshots: Vec::new(),
        phase: None,
        dir,
        arm: None,
    };
    // Start from a working optimizer most of the time.
    let algorithm = b.u8() % 2;
    // SAFETY: valid pointers.
    unsafe {
        let mut c: lomo_config = std::mem::zeroed();
        lomo_config_init(&mut c, algorithm as u32);
        let mut o = null_mut();
        assert_eq!(lomo_optimizer_new(&c, &mut o), Status::Ok);
        s.opt = o;
    }
    let mut calls = 0;
    while !b.is_empty() && calls < 256 {
        calls += 1;
        let state_before = s.state();
        let bufs_before = s.buffers();
        let accum_before = s.accum();
        lomo::alloc::fail_after(s.arm.take());
        let st = step(&mut s, &mut b, cuda);
        lomo::alloc::fail_after(None);
        if st != 0 {
            CHECKED_FAILURES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            assert_eq!(s.buffers(), bufs_before, "a failed call wrote a parameter");
            assert_eq!(
                s.accum(),
                accum_before,
                "a failed call (status {st}: {}) changed the accumulation (pending, bytes)",
                last_error()
            );
            if let (Some(before), Some(after)) = (&state_before, s.state()) {
                assert!(
                    before == &after,
                    "a failed call (status {st}: {}) changed the state",
                    last_error()
                );
            }
        }
    }
    s.free();
}
