//! Shared by the distributed tests: a runner of threads as ranks through the real C ABI that
//! splits every tensor into pieces (rows, columns, flat ranges, replicas or DeepSpeed partitions)
//! and compares nothing itself: it returns the assembled parameters and every rank's step infos.

pub use super::comm::*;
use super::*;
use lomo::ffi::dist::*;
use lomo::ffi::types::lomo_step_info;

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

/// Uneven flat pieces `[a, b)` of `numel` elements over `n` ranks that cut rows anywhere: with
/// 3 ranks rank 1 holds 2 elements (inside a row when rows are longer), with 4 ranks rank 1 is
/// empty and rank 2 holds 3 elements.
pub fn flat_split(numel: usize, n: usize, r: usize) -> (usize, usize) {
    let c1 = numel / n.max(1) + 1;
    let mut cuts = match n {
        0 | 1 => vec![0, numel],
        2 => vec![0, c1, numel],
        3 => vec![0, c1, c1 + 2, numel],
        _ => {
            let mut v = vec![0, c1, c1, c1 + 3];
            v.extend((4..n).map(|k| numel * k / n + k));
            v.push(numel);
            v
        }
    };
    let mut prev = 0;
    for c in cuts.iter_mut() {
        *c = (*c).min(numel).max(prev);
        prev = *c;
    }
    (cuts[r], cuts[r + 1])
}

/// DeepSpeed ZeRO-3's partition of `numel` elements over `n` ranks: `ceil(numel / n)` each, the
/// last ones short or empty (their padding is not part of the parameter).
pub fn partition(numel: usize, n: usize, r: usize) -> (usize, usize) {
    let per = numel.div_ceil(n);
    ((r * per).min(numel), ((r + 1) * per).min(numel))
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
    /// A static loss scale of 8 (when not `dynamic`).
    pub static_scale: bool,
    pub carry: bool,
    /// (step, tensor) whose gradient gets an inf in its middle element (on the rank holding it;
    /// rank 0 when the library reduces the gradient).
    pub inf: Option<(usize, usize)>,
    /// Split matrices into pieces of columns (LOMO_LAYOUT_COLS) instead of rows; vectors are
    /// split into ranges either way.
    pub cols: bool,
    /// Split every tensor into uneven flat pieces ([`flat_split`], LOMO_LAYOUT_FLAT).
    pub flat: bool,
    /// `LOMO_GRAD_ALL_REDUCE`: every rank holds a replica (FULL) and submits its own gradient;
    /// `LOMO_GRAD_REDUCE_SCATTER`: flat partitions ([`partition`]), every rank submits its own
    /// gradient of the whole tensor. The ranks' gradients average to the one rank's.
    pub grad_mode: u32,
    /// LOMO: `LOMO_NONFINITE_PER_ELEMENT`.
    pub per_element: bool,
    /// Every rank holds every tensor whole (LOMO_LAYOUT_FULL, data-parallel replicas submitting
    /// the averaged gradient; LOMO_SHARD_NORM_DUPLICATE on every rank but 0); the replicas must
    /// stay bitwise identical.
    pub full: bool,
    /// Where the parameters live: `LOMO_DEVICE_CPU` or a CUDA ordinal (emulated in the tests).
    pub device: i32,
    /// Gradient accumulation (`lomo_accum_enable`, f32 buffers) over this many micro-batches
    /// per step (≤ 1: off): [`micro`] splits what a rank submits so that the micro-batches
    /// sum (average, with `accum_mean`) to it exactly.
    pub micro: usize,
    pub accum_mean: bool,
    /// (early, late): tensors whose gradient comes only in the first micro-batch (none in the
    /// step's NORM/UPDATE phases: run from the buffer at the phase's end), and only in the last.
    pub early_late: Option<(usize, usize)>,
    /// With accumulation: odd ranks submit in reverse order in every phase.
    pub reverse_odd: bool,
}

/// Micro-batch `j` of `k` of the gradient `v` a rank submits in a step (None: no gradient for
/// this tensor in it). SUM: v/2, v/4, …, the last two equal (exact in every dtype, and their
/// sum in an f32 buffer is v); MEAN: v each. `early`/`late`: v in the first/last only.
pub fn micro(c: &Case, v: &[f32], i: usize, j: usize) -> Option<Vec<f32>> {
    let k = c.micro;
    match c.early_late {
        Some((e, _)) if e == i => return (j == 0).then(|| v.to_vec()),
        Some((_, l)) if l == i => return (j + 1 == k).then(|| v.to_vec()),
        _ => {}
    }
    if c.accum_mean {
        return Some(v.to_vec());
    }
    let f = 0.5f32.powi((j + 1).min(k - 1) as i32);
    Some(v.iter().map(|x| x * f).collect())
}

pub const SHAPES: [&[i64]; 7] = [
    &[7, 5],
    &[40, 3],
    &[3, 5, 7],
    &[31],
    &[2, 6],
    &[1, 5],
    &[2, 40],
];
pub const STEPS: usize = 4;

pub fn cfg_of(c: &Case) -> lomo::ffi::types::lomo_config {
    let mut cfg = config(c.algorithm);
    cfg.clip_grad_norm = c.clip_norm;
    cfg.clip_grad_value = c.clip_value;
    cfg.weight_decay = c.wd;
    cfg.rounding = c.stochastic as u32;
    cfg.seed = 11;
    cfg.nonfinite_policy = c.per_element as u32;
    if c.dynamic {
        cfg.loss_scale_mode = 2;
        cfg.loss_scale = 64.0;
        cfg.scale_window = 2;
    } else if c.static_scale {
        cfg.loss_scale_mode = 1;
        cfg.loss_scale = 8.0;
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

/// One rank's piece of a tensor: global element indices (row-major order of the piece), the
/// registered shape, and the shard description (layout, global shape, offset).
struct Piece {
    idx: Vec<usize>,
    local: Vec<i64>,
    layout: u32,
    global: Vec<i64>,
    offset: i64,
}

fn piece_of(c: &Case, shape: &[i64], n: usize, r: usize) -> Piece {
    let (rows, cols) = rows_cols(shape);
    let numel = rows * cols;
    let flat = |(a, b): (usize, usize)| Piece {
        idx: (a..b).collect(),
        local: vec![(b - a) as i64],
        layout: LOMO_LAYOUT_FLAT,
        global: shape.to_vec(),
        offset: a as i64,
    };
    if c.full || c.grad_mode == LOMO_GRAD_ALL_REDUCE {
        return Piece {
            idx: (0..numel).collect(),
            local: shape.to_vec(),
            layout: LOMO_LAYOUT_FULL,
            global: shape.to_vec(),
            offset: 0,
        };
    }
    if c.grad_mode == LOMO_GRAD_REDUCE_SCATTER {
        return flat(partition(numel, n, r));
    }
    if c.flat {
        return flat(flat_split(numel, n, r));
    }
    let by_cols = c.cols && shape.len() >= 2;
    let units = if by_cols { cols } else { rows };
    let (a, b) = split(units, n, r);
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
    Piece {
        idx,
        local,
        layout: if by_cols {
            LOMO_LAYOUT_COLS
        } else {
            LOMO_LAYOUT_ROWS
        },
        // [3, 5, 7] is registered as its [15, 7] view.
        global: if shape.len() == 3 {
            vec![15, 7]
        } else {
            shape.to_vec()
        },
        offset: a as i64,
    }
}

/// The inputs of [`run`]: element counts of [`SHAPES`], initial parameters, the (average)
/// gradients `[step][tensor]` and the deltas `[step][tensor]`: a rank that reduces gradients
/// with others submits G + D (rank 0), G − D (rank 1) or G, so the sum is n·G exactly (dyadic).
pub struct Data {
    pub sizes: Vec<usize>,
    pub params0: Vec<Vec<f32>>,
    pub grads: Vec<Vec<Vec<f32>>>,
    pub deltas: Vec<Vec<Vec<f32>>>,
}

pub fn data() -> Data {
    let mut rng = Rng::new(5);
    let sizes: Vec<usize> = SHAPES
        .iter()
        .map(|s| rows_cols(s).0 * rows_cols(s).1)
        .collect();
    let params0: Vec<Vec<f32>> = sizes.iter().map(|&k| dyadic(&mut rng, k)).collect();
    let grads: Vec<Vec<Vec<f32>>> = (0..STEPS)
        .map(|_| sizes.iter().map(|&k| dyadic(&mut rng, k)).collect())
        .collect();
    let deltas: Vec<Vec<Vec<f32>>> = (0..STEPS)
        .map(|_| sizes.iter().map(|&k| dyadic(&mut rng, k)).collect())
        .collect();
    Data {
        sizes,
        params0,
        grads,
        deltas,
    }
}

/// Runs `c` on one rank holding everything (`n == 0`, submitting the average gradient) or on
/// `n` ranks holding pieces as `c` says; returns the assembled parameters after every step
/// (checking that replicas agree bit for bit) and each rank's step infos.
pub fn run(c: &Case, n: usize) -> (History, Vec<Vec<lomo_step_info>>) {
    let Data {
        sizes,
        params0,
        grads,
        deltas,
    } = data();
    let ranks = n.max(1);
    let reduce = n > 0 && c.grad_mode != LOMO_GRAD_REDUCED;
    let group = Group::new(ranks);
    let results: Vec<(History, Vec<lomo_step_info>, Vec<Vec<usize>>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..ranks)
            .map(|r| {
                let (group, params0, grads, deltas, sizes) =
                    (group.clone(), &params0, &grads, &deltas, &sizes);
                s.spawn(move || {
                    let opt = Opt::new(&cfg_of(c)).unwrap();
                    let comm = (n > 0).then(|| add_comm(&opt, &group, r));
                    let mut bufs = Vec::new();
                    let mut pieces = Vec::new();
                    for (i, shape) in SHAPES.iter().enumerate() {
                        let p = if n > 0 {
                            piece_of(c, shape, n, r)
                        } else {
                            Piece {
                                idx: (0..sizes[i]).collect(),
                                local: shape.to_vec(),
                                layout: LOMO_LAYOUT_FULL,
                                global: shape.to_vec(),
                                offset: 0,
                            }
                        };
                        let vals: Vec<f32> = p.idx.iter().map(|&k| params0[i][k]).collect();
                        let mut buf = Buf::new(c.dtype, &vals);
                        let id = opt
                            .register_on(
                                &format!("p{i}"),
                                buf.ptr(),
                                c.dtype,
                                &p.local,
                                c.device,
                                0,
                                c.carry as u32,
                            )
                            .unwrap();
                        if let Some(comm) = comm {
                            let (piece_comm, grad, flags) = match c.grad_mode {
                                LOMO_GRAD_ALL_REDUCE => (
                                    LOMO_COMM_NONE,
                                    (LOMO_GRAD_ALL_REDUCE, comm),
                                    if r == 0 { 0 } else { LOMO_SHARD_NORM_DUPLICATE },
                                ),
                                LOMO_GRAD_REDUCE_SCATTER => {
                                    (comm, (LOMO_GRAD_REDUCE_SCATTER, comm), 0)
                                }
                                _ => (
                                    comm,
                                    (LOMO_GRAD_REDUCED, LOMO_COMM_NONE),
                                    if c.full && r > 0 {
                                        LOMO_SHARD_NORM_DUPLICATE
                                    } else {
                                        0
                                    },
                                ),
                            };
                            shard_grad(
                                &opt, id, p.layout, &p.global, p.offset, piece_comm, grad, flags,
                            )
                            .unwrap();
                        }
                        bufs.push(buf);
                        pieces.push(p.idx);
                    }
                    if let Some(comm) = comm {
                        dist_set(&opt, comm, LOMO_DIST_CHECK).unwrap();
                    }
                    let k = c.micro.max(1);
                    if k > 1 {
                        let red = c.accum_mean as u32;
                        // SAFETY: live handle.
                        check(unsafe { lomo::ffi::accum::lomo_accum_enable(opt.0, 0, red) })
                            .unwrap();
                    }
                    let mut order: Vec<usize> = (0..SHAPES.len()).collect();
                    if k > 1 && c.reverse_odd && r % 2 == 1 {
                        order.reverse();
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
                        let micro_phases = (0..k - 1).map(|j| (ACCUMULATE, j));
                        let step_phases = phases.iter().map(|&p| (p, k - 1));
                        for (phase, j) in micro_phases.chain(step_phases) {
                            opt.begin(phase, [0.05f32, 0.02, 0.1][step % 3]).unwrap();
                            for &i in &order {
                                let gi = &g[i];
                                let mid = gi.len() / 2;
                                let mut piece: Vec<f32> = if reduce {
                                    let d = &deltas[step][i];
                                    let sign = match r {
                                        0 if n > 1 => 1.0,
                                        1 => -1.0,
                                        _ => 0.0,
                                    };
                                    let mut v: Vec<f32> = gi
                                        .iter()
                                        .zip(d)
                                        .map(|(g, d)| (g + sign * d) * scale)
                                        .collect();
                                    if c.inf == Some((step, i)) && r == 0 {
                                        v[mid] = f32::INFINITY;
                                    }
                                    v
                                } else {
                                    let idx = &pieces[i];
                                    let mut v: Vec<f32> =
                                        idx.iter().map(|&k| gi[k] * scale).collect();
                                    if c.inf == Some((step, i)) {
                                        if let Some(pos) = idx.iter().position(|&k| k == mid) {
                                            v[pos] = f32::INFINITY;
                                        }
                                    }
                                    v
                                };
                                if reduce && c.grad_mode == LOMO_GRAD_ALL_REDUCE {
                                    piece.truncate(pieces[i].len());
                                }
                                let piece = if k > 1 {
                                    match micro(c, &piece, i, j) {
                                        Some(m) => m,
                                        None => continue,
                                    }
                                } else {
                                    piece
                                };
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
    // Assemble the pieces; replicas must agree bit for bit.
    let mut assembled: History = vec![sizes.iter().map(|&n| vec![f32::NAN; n]).collect(); STEPS];
    let mut seen: Vec<Vec<Vec<bool>>> =
        vec![sizes.iter().map(|&n| vec![false; n]).collect(); STEPS];
    for (r, (history, _, pieces)) in results.iter().enumerate() {
        for (step, tensors) in history.iter().enumerate() {
            for (i, t) in tensors.iter().enumerate() {
                for (&k, &v) in pieces[i].iter().zip(t) {
                    if seen[step][i][k] {
                        assert_eq!(
                            assembled[step][i][k].to_bits(),
                            v.to_bits(),
                            "rank {r} step {step} tensor {i} element {k}: replicas differ"
                        );
                    }
                    seen[step][i][k] = true;
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
        static_scale: false,
        carry: false,
        inf: None,
        cols: false,
        flat: false,
        grad_mode: LOMO_GRAD_REDUCED,
        per_element: false,
        full: false,
        device: LOMO_DEVICE_CPU,
        micro: 0,
        accum_mean: false,
        early_late: None,
        reverse_odd: false,
    }
}
