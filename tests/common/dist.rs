//! Shared by the distributed tests: threads as ranks through the real C ABI — an in-process
//! communicator (`lomo_comm` callbacks over a barrier and a slot table, summing in rank order, so
//! every rank gets the same bits) and a runner that splits every tensor into row pieces.

use std::ffi::c_void;
use std::sync::Arc;

use super::*;
use lomo::ffi::dist::*;
use lomo::ffi::types::lomo_step_info;
use parking_lot::Mutex;

pub const NORM: u32 = 0;
pub const UPDATE: u32 = 1;

/// One in-process group of `n` ranks.
pub struct Group {
    pub n: usize,
    barrier: Rendezvous,
    pub slots: Mutex<Vec<Vec<f64>>>,
    /// The all-reduce returns this code instead of reducing (0: work).
    pub fail: Mutex<i32>,
}

impl Group {
    pub fn new(n: usize) -> Arc<Group> {
        Arc::new(Group {
            n,
            barrier: Rendezvous::new(n),
            slots: Mutex::new(vec![Vec::new(); n]),
            fail: Mutex::new(0),
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

pub unsafe extern "C" fn all_reduce(
    user: *mut c_void,
    buf: *mut c_void,
    count: usize,
    dtype: u32,
    op: u32,
    _stream: *mut c_void,
) -> i32 {
    // SAFETY: `user` is the RankCtx this test registered; `buf` holds `count` f64 (dtype 3).
    let ctx = unsafe { &*(user as *const RankCtx) };
    let fail = *ctx.group.fail.lock();
    if fail != 0 {
        return fail;
    }
    assert_eq!(dtype, LOMO_DTYPE_F64);
    // SAFETY: as above.
    let buf = unsafe { std::slice::from_raw_parts_mut(buf as *mut f64, count) };
    let g = &ctx.group;
    g.slots.lock()[ctx.rank] = buf.to_vec();
    if !g.barrier.wait() {
        return -99;
    }
    {
        let slots = g.slots.lock();
        for (k, v) in buf.iter_mut().enumerate() {
            let mut acc = slots[0][k];
            for s in &slots[1..g.n] {
                acc = if op == LOMO_REDUCE_SUM {
                    acc + s[k]
                } else {
                    acc.max(s[k])
                };
            }
            *v = acc;
        }
    }
    if !g.barrier.wait() {
        return -99;
    }
    0
}

pub unsafe extern "C" fn destroy(user: *mut c_void) {
    // SAFETY: the Box this test leaked into `user`, destroyed once by the optimizer.
    drop(unsafe { Box::from_raw(user as *mut RankCtx) });
}

pub fn add_comm(opt: &Opt, group: &Arc<Group>, rank: usize) -> u32 {
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
        reduce_scatter: None,
        all_gather: None,
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
    let d = lomo_shard_desc {
        struct_size: std::mem::size_of::<lomo_shard_desc>(),
        layout,
        global_ndim: global.len() as u32,
        global_shape: global.as_ptr(),
        offset,
        piece_comm: comm,
        grad_mode: LOMO_GRAD_REDUCED,
        grad_comm: LOMO_COMM_NONE,
        flags,
    };
    // SAFETY: live handle, valid pointers.
    check(unsafe { lomo_param_set_shard(opt.0, id, &d) })
}

pub fn dist_set(opt: &Opt, comm: u32, flags: u32) -> Result<(), Failure> {
    // SAFETY: live handle.
    check(unsafe { lomo_dist_set(opt.0, comm, flags) })
}

/// Dyadic values k·2⁻⁷ (|k| ≤ 64, k ≠ 0): squares and their sums are exact in f32 and f64.
pub fn dyadic(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let k = (rng.next_u64() % 64) as i32 + 1;
            let s = if rng.next_u64() % 2 == 0 { 1.0 } else { -1.0 };
            s * k as f32 / 128.0
        })
        .collect()
}

/// Rows `[a, b)` of `rows` split as evenly as `torch.chunk` does over `n` ranks.
pub fn split(rows: usize, n: usize, r: usize) -> (usize, usize) {
    let per = rows.div_ceil(n);
    ((r * per).min(rows), ((r + 1) * per).min(rows))
}

#[derive(Clone)]
pub struct Case {
    pub algorithm: u32,
    pub dtype: u32,
    pub clip_norm: f64,
    pub clip_value: f64,
    pub wd: f64,
    pub stochastic: bool,
    pub dynamic: bool,
    pub carry: bool,
    /// (step, tensor) whose gradient gets an inf in its middle element (on the rank holding it).
    pub inf: Option<(usize, usize)>,
    /// Split matrices into pieces of columns (LOMO_LAYOUT_COLS) instead of rows; vectors are
    /// split into ranges either way.
    pub cols: bool,
    /// Every rank holds every tensor whole (LOMO_LAYOUT_FULL, data-parallel replicas submitting
    /// the averaged gradient; LOMO_SHARD_NORM_DUPLICATE on every rank but 0); the replicas must
    /// stay bitwise identical.
    pub full: bool,
    /// Where the parameters live: `LOMO_DEVICE_CPU` or a CUDA ordinal (emulated in the tests).
    pub device: i32,
}

pub const SHAPES: [&[i64]; 5] = [&[7, 5], &[40, 3], &[3, 5, 7], &[31], &[2, 6]];
pub const STEPS: usize = 4;

pub fn cfg_of(c: &Case) -> lomo::ffi::types::lomo_config {
    let mut cfg = config(c.algorithm);
    cfg.clip_grad_norm = c.clip_norm;
    cfg.clip_grad_value = c.clip_value;
    cfg.weight_decay = c.wd;
    cfg.rounding = c.stochastic as u32;
    cfg.seed = 11;
    if c.dynamic {
        cfg.loss_scale_mode = 2;
        cfg.loss_scale = 64.0;
        cfg.scale_window = 2;
    }
    cfg
}

pub fn rows_cols(shape: &[i64]) -> (usize, usize) {
    let n: i64 = shape.iter().product();
    if shape.len() >= 2 {
        let c = *shape.last().unwrap();
        ((n / c) as usize, c as usize)
    } else {
        (n as usize, 1)
    }
}

/// Every tensor's values after every step (`[step][tensor][element]`).
pub type History = Vec<Vec<Vec<f32>>>;

/// Runs `c` on one rank holding everything (`n == 0`) or on `n` ranks holding rows (or
/// columns, `c.cols`); returns
/// the assembled parameters after every step and each rank's step infos.
pub fn run(c: &Case, n: usize) -> (History, Vec<Vec<lomo_step_info>>) {
    let mut rng = Rng::new(5);
    let params0: Vec<Vec<f32>> = SHAPES
        .iter()
        .map(|s| dyadic(&mut rng, rows_cols(s).0 * rows_cols(s).1))
        .collect();
    let grads: Vec<Vec<Vec<f32>>> = (0..STEPS)
        .map(|_| {
            SHAPES
                .iter()
                .map(|s| dyadic(&mut rng, rows_cols(s).0 * rows_cols(s).1))
                .collect()
        })
        .collect();
    let ranks = n.max(1);
    let group = Group::new(ranks);
    let results: Vec<(History, Vec<lomo_step_info>, Vec<Vec<usize>>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..ranks)
            .map(|r| {
                let (group, params0, grads) = (group.clone(), &params0, &grads);
                s.spawn(move || {
                    let opt = Opt::new(&cfg_of(c)).unwrap();
                    let comm = (n > 0).then(|| add_comm(&opt, &group, r));
                    let mut bufs = Vec::new();
                    let mut pieces = Vec::new();
                    for (i, shape) in SHAPES.iter().enumerate() {
                        let (rows, cols) = rows_cols(shape);
                        let by_cols = c.cols && shape.len() >= 2;
                        let units = if by_cols { cols } else { rows };
                        let (a, b) = if n > 0 && !c.full {
                            split(units, n, r)
                        } else {
                            (0, units)
                        };
                        // Global element indices of the piece, in its row-major order.
                        let idx: Vec<usize> = if by_cols {
                            (0..rows)
                                .flat_map(|i| (a..b).map(move |j| i * cols + j))
                                .collect()
                        } else {
                            (a * cols..b * cols).collect()
                        };
                        let local: Vec<i64> = match (shape.len() >= 2, by_cols) {
                            (true, true) => vec![rows as i64, (b - a) as i64],
                            (true, false) => vec![(b - a) as i64, cols as i64],
                            _ => vec![(b - a) as i64],
                        };
                        let vals: Vec<f32> = idx.iter().map(|&k| params0[i][k]).collect();
                        let mut buf = Buf::new(c.dtype, &vals);
                        let id = opt
                            .register_on(
                                &format!("p{i}"),
                                buf.ptr(),
                                c.dtype,
                                &local,
                                c.device,
                                0,
                                c.carry as u32,
                            )
                            .unwrap();
                        if let Some(comm) = comm {
                            // [3, 5, 7] is registered as its [15, 7] view.
                            let global: Vec<i64> = if shape.len() == 3 {
                                vec![15, 7]
                            } else {
                                shape.to_vec()
                            };
                            let (layout, flags) = match (c.full, by_cols) {
                                (true, _) if r > 0 => (LOMO_LAYOUT_FULL, LOMO_SHARD_NORM_DUPLICATE),
                                (true, _) => (LOMO_LAYOUT_FULL, 0),
                                (false, true) => (LOMO_LAYOUT_COLS, 0),
                                (false, false) => (LOMO_LAYOUT_ROWS, 0),
                            };
                            let global: Vec<i64> = if c.full { local.clone() } else { global };
                            shard(&opt, id, layout, &global, a as i64, comm, flags).unwrap();
                        }
                        bufs.push(buf);
                        pieces.push(idx);
                    }
                    if let Some(comm) = comm {
                        dist_set(&opt, comm, LOMO_DIST_CHECK).unwrap();
                    }
                    let mut history = Vec::new();
                    let mut infos = Vec::new();
                    for (step, g) in grads.iter().enumerate() {
                        let scale = opt.loss_scale();
                        let phases: &[u32] = if c.clip_norm > 0.0 {
                            &[NORM, UPDATE]
                        } else {
                            &[UPDATE]
                        };
                        for &phase in phases {
                            opt.begin(phase, [0.05f32, 0.02, 0.1][step % 3]).unwrap();
                            for (i, gi) in g.iter().enumerate() {
                                let idx = &pieces[i];
                                let mut piece: Vec<f32> =
                                    idx.iter().map(|&k| gi[k] * scale).collect();
                                if c.inf == Some((step, i)) {
                                    let mid = gi.len() / 2;
                                    if let Some(pos) = idx.iter().position(|&k| k == mid) {
                                        piece[pos] = f32::INFINITY;
                                    }
                                }
                                let mut gb = Buf::new(c.dtype, &piece);
                                opt.submit(i as u32, gb.ptr(), c.dtype).unwrap();
                            }
                            opt.end().unwrap();
                        }
                        infos.push(opt.info());
                        history.push(bufs.iter().map(|b| b.values()).collect::<Vec<_>>());
                    }
                    (history, infos, pieces)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    if c.full {
        for (r, (h, _, _)) in results.iter().enumerate().skip(1) {
            let bits = |h: &History| -> Vec<Vec<Vec<u32>>> {
                h.iter()
                    .map(|s| {
                        s.iter()
                            .map(|t| t.iter().map(|v| v.to_bits()).collect())
                            .collect()
                    })
                    .collect()
            };
            assert!(
                bits(h) == bits(&results[0].0),
                "replica {r} differs from replica 0"
            );
        }
    }
    // Assemble the pieces.
    let sizes: Vec<usize> = SHAPES
        .iter()
        .map(|s| rows_cols(s).0 * rows_cols(s).1)
        .collect();
    let mut assembled: History = vec![sizes.iter().map(|&n| vec![f32::NAN; n]).collect(); STEPS];
    for (history, _, pieces) in &results {
        for (step, tensors) in history.iter().enumerate() {
            for (i, t) in tensors.iter().enumerate() {
                for (&k, &v) in pieces[i].iter().zip(t) {
                    assembled[step][i][k] = v;
                }
            }
        }
    }
    (assembled, results.into_iter().map(|(_, i, _)| i).collect())
}

pub fn case(algorithm: u32) -> Case {
    Case {
        algorithm,
        dtype: F32,
        clip_norm: 0.0,
        clip_value: 0.0,
        wd: 0.0,
        stochastic: false,
        dynamic: false,
        carry: false,
        inf: None,
        cols: false,
        full: false,
        device: LOMO_DEVICE_CPU,
    }
}
