//! `cargo bench --bench dist_traffic`: the collectives a distributed step issues, on paper
//! (issue 11, item 6). A Llama-2-7B-shaped and a LLaMA-65B-shaped model are registered as one
//! rank's pieces on 8 and 64 simulated ranks, every matrix as pieces of rows (`LOMO_LAYOUT_ROWS`:
//! FSDP2, column-parallel), of columns (`LOMO_LAYOUT_COLS`: row-parallel) or flat ranges that
//! cut rows (`LOMO_LAYOUT_FLAT`: DeepSpeed ZeRO-3, FSDP1), vectors as ranges, with a norm group; a counting communicator (`lomo_comm` whose all-reduce counts calls and
//! bytes and leaves the buffer as it is: no data moves) records what one step hands it — during
//! the submissions and at each phase end — for AdaLomo and LOMO (both non-finite policies), with
//! and without a NORM phase (global-norm clipping). Printed next to the gradient traffic itself: the bytes of the
//! gradients that the engine reduce-scatters (bf16) in each backward pass.
//!
//! What a step's collectives move does not depend on how many rows (ROWS) or columns (COLS) a
//! piece holds, only on the other dimension (FLAT: on neither), so each rank's piece is
//! registered as one row (one column, one element) of the global tensor: the whole 65B model then
//! fits in a few MB. The run checks that claim: the 7B model on 64 ranks is also registered with
//! rank 1's real share (torch.chunk's rule; FLAT: DeepSpeed's `ceil(numel / 64)` partition;
//! bf16, ~220 MB) and must give the same counts. The gradient reduce-scatter column is the
//! engine's (or, with `LOMO_GRAD_REDUCE_SCATTER`, the library's: the same payload, padded to 64
//! equal partitions).
//!
//! Bytes are payloads (elements × size handed to the callback). On a ring, an all-reduce of b
//! bytes sends 2(N-1)/N·b per rank and a reduce-scatter of b bytes (N-1)/N·b, so the ring ratio
//! of statistics to gradient traffic is twice the payload ratio printed here.

use std::cell::Cell;
use std::ffi::{c_void, CString};

use lomo::ffi::dist::*;
use lomo::ffi::optimizer::*;
use lomo::ffi::types::*;
use lomo::Status;

const BF16: u32 = 2;
const LAYOUTS: [u32; 3] = [LOMO_LAYOUT_ROWS, LOMO_LAYOUT_COLS, LOMO_LAYOUT_FLAT];
const NORM: u32 = 0;
const UPDATE: u32 = 1;

/// One counter per place a collective can come from.
#[derive(Clone, Copy, Default, PartialEq, Debug)]
struct Count {
    calls: u64,
    bytes: u64,
}

#[derive(Default)]
struct Counter {
    /// Index into `counts`: 0 NORM submissions, 1 NORM end, 2 UPDATE submissions, 3 UPDATE end.
    place: Cell<usize>,
    counts: Cell<[Count; 4]>,
}

unsafe extern "C" fn count_all_reduce(
    user: *mut c_void,
    _buf: *mut c_void,
    count: usize,
    dtype: u32,
    _op: u32,
    _stream: *mut c_void,
) -> i32 {
    // SAFETY: `user` is the Counter this program registered; it outlives the optimizer.
    let c = unsafe { &*(user as *const Counter) };
    let size = match dtype {
        LOMO_DTYPE_F64 => 8,
        0 => 4,
        _ => 2,
    };
    let mut counts = c.counts.get();
    let k = &mut counts[c.place.get()];
    k.calls += 1;
    k.bytes += (count * size) as u64;
    c.counts.set(counts);
    0
}

fn ok(st: Status, what: &str) {
    if st != Status::Ok {
        let mut buf = vec![0u8; 512];
        // SAFETY: a writable buffer of the given length.
        let n = unsafe { lomo::ffi::api::lomo_last_error_message(buf.as_mut_ptr().cast(), 512) };
        panic!(
            "{what}: {st:?}: {}",
            String::from_utf8_lossy(&buf[..n.min(511)])
        );
    }
}

/// `(name, torch shape)` of every parameter of a Llama model (untied embedding and head).
fn llama(hidden: i64, inter: i64, layers: usize, vocab: i64) -> Vec<(String, Vec<i64>)> {
    let mut v = vec![("embed_tokens".to_string(), vec![vocab, hidden])];
    for l in 0..layers {
        for (n, s) in [
            ("q_proj", vec![hidden, hidden]),
            ("k_proj", vec![hidden, hidden]),
            ("v_proj", vec![hidden, hidden]),
            ("o_proj", vec![hidden, hidden]),
            ("gate_proj", vec![inter, hidden]),
            ("up_proj", vec![inter, hidden]),
            ("down_proj", vec![hidden, inter]),
            ("input_layernorm", vec![hidden]),
            ("post_attention_layernorm", vec![hidden]),
        ] {
            v.push((format!("layers.{l}.{n}"), s));
        }
    }
    v.push(("norm".to_string(), vec![hidden]));
    v.push(("lm_head".to_string(), vec![vocab, hidden]));
    v
}

#[derive(Clone, Copy, PartialEq)]
enum Piece {
    /// One row (column, element) of the global tensor.
    Minimal,
    /// This rank's share by torch.chunk's rule.
    Share,
}

/// `[first, end)` of `units` split over `n` ranks as torch.chunk does.
fn chunk(units: i64, n: i64, r: i64) -> (i64, i64) {
    let per = (units + n - 1) / n;
    ((r * per).min(units), ((r + 1) * per).min(units))
}

struct Run {
    counts: [Count; 4],
    elements: u64,
}

/// An optimizer variant: (algorithm, NORM phase, LOMO's per-element non-finite policy).
type Variant = (u32, bool, bool);

const VARIANTS: [Variant; 5] = [
    (1, false, false),
    (1, true, false),
    (0, false, false),
    (0, false, true),
    (0, true, false),
];

/// Registers rank `rank` of `n` holding `piece`s of every tensor of `model`, sets the norm group
/// with `dist_flags`, steps once (NORM + UPDATE when `clip`), and returns what the communicator
/// saw.
#[allow(clippy::too_many_arguments)]
fn run(
    model: &[(String, Vec<i64>)],
    n: u32,
    rank: u32,
    layout: u32,
    (algorithm, clip, per_element): Variant,
    piece: Piece,
    dist_flags: u32,
) -> Run {
    let counter = Box::new(Counter::default());
    let mut cfg = std::mem::MaybeUninit::<lomo_config>::zeroed();
    // SAFETY: a writable config; the optimizer pointer below comes from lomo_optimizer_new and
    // lives until lomo_optimizer_free at the end; every buffer registered lives in `bufs` until
    // then; `counter` outlives the optimizer.
    unsafe {
        ok(lomo_config_init(cfg.as_mut_ptr(), algorithm), "config");
        let mut cfg = cfg.assume_init();
        if clip {
            cfg.clip_grad_norm = 1.0;
        }
        cfg.nonfinite_policy = per_element as u32;
        let mut opt = std::ptr::null_mut();
        ok(lomo_optimizer_new(&cfg, &mut opt), "new");
        let comm = lomo_comm {
            struct_size: std::mem::size_of::<lomo_comm>(),
            rank,
            size: n,
            user: &*counter as *const Counter as *mut c_void,
            all_reduce: Some(count_all_reduce),
            reduce_scatter: None,
            all_gather: None,
            destroy: None,
        };
        let mut cid = 0;
        ok(lomo_comm_add(opt, &comm, &mut cid), "comm");
        let mut bufs: Vec<Vec<u16>> = Vec::new();
        let mut elements = 0u64;
        let mut largest = 0usize;
        for (name, shape) in model {
            let (rows, cols) = if shape.len() >= 2 {
                (shape[0], shape[1])
            } else {
                (shape[0], 1)
            };
            let by_cols = layout == LOMO_LAYOUT_COLS && shape.len() >= 2;
            let flat = layout == LOMO_LAYOUT_FLAT;
            let units = match (flat, by_cols) {
                (true, _) => rows * cols,
                (_, true) => cols,
                _ => rows,
            };
            let (a, b) = match piece {
                Piece::Minimal => (rank as i64 % units, rank as i64 % units + 1),
                // DeepSpeed's partition and torch.chunk's agree on 1-D ranges.
                Piece::Share => chunk(units, n as i64, rank as i64),
            };
            let local: Vec<i64> = match (shape.len() >= 2 && !flat, by_cols) {
                (true, true) => vec![rows, b - a],
                (true, false) => vec![b - a, cols],
                _ => vec![b - a],
            };
            let numel = local.iter().product::<i64>() as usize;
            elements += numel as u64;
            largest = largest.max(numel);
            // bf16 1.0: a buffer even for an empty piece.
            bufs.push(vec![0x3F80u16; numel.max(1)]);
            let cname = CString::new(name.as_str()).unwrap();
            let d = lomo_param_desc {
                struct_size: std::mem::size_of::<lomo_param_desc>(),
                name: cname.as_ptr(),
                data: bufs.last_mut().unwrap().as_mut_ptr().cast(),
                dtype: BF16,
                ndim: local.len() as u32,
                shape: local.as_ptr(),
                device: LOMO_DEVICE_CPU,
                group: 0,
                flags: 0,
            };
            let mut id = 0;
            ok(lomo_param_register(opt, &d, &mut id), "register");
            let s = lomo_shard_desc {
                struct_size: std::mem::size_of::<lomo_shard_desc>(),
                layout: match (flat, by_cols) {
                    (true, _) => LOMO_LAYOUT_FLAT,
                    (_, true) => LOMO_LAYOUT_COLS,
                    _ => LOMO_LAYOUT_ROWS,
                },
                global_ndim: shape.len() as u32,
                global_shape: shape.as_ptr(),
                offset: a,
                piece_comm: cid,
                grad_mode: LOMO_GRAD_REDUCED,
                grad_comm: LOMO_COMM_NONE,
                flags: 0,
            };
            ok(lomo_param_set_shard(opt, id, &s), "shard");
        }
        ok(lomo_dist_set(opt, cid, dist_flags), "dist_set");
        // bf16 2^-7: finite, so no step is skipped.
        let grad = vec![0x3C00u16; largest.max(1)];
        let phases: &[u32] = if clip { &[NORM, UPDATE] } else { &[UPDATE] };
        for &phase in phases {
            let base = if phase == NORM { 0 } else { 2 };
            counter.place.set(base);
            ok(
                lomo_step_begin(opt, phase, 1e-3, std::ptr::null_mut()),
                "begin",
            );
            for id in 0..model.len() as u32 {
                ok(
                    lomo_grad_submit(opt, id, grad.as_ptr().cast(), BF16, std::ptr::null_mut()),
                    "submit",
                );
            }
            counter.place.set(base + 1);
            ok(lomo_step_end(opt, std::ptr::null_mut()), "end");
        }
        lomo_optimizer_free(opt);
        drop(bufs);
        Run {
            counts: counter.counts.get(),
            elements,
        }
    }
}

fn mib(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else if b >= 1 << 20 {
        format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64)
    } else if b >= 1 << 10 {
        format!("{:.2} KiB", b as f64 / (1u64 << 10) as f64)
    } else {
        format!("{b} B")
    }
}

fn main() {
    let models = [
        ("Llama-2-7B", llama(4096, 11008, 32, 32000)),
        ("LLaMA-65B", llama(8192, 22016, 80, 32000)),
    ];
    // The claim that piece sizes do not matter, checked on the 7B model, 64 ranks, rank 1.
    for layout in LAYOUTS {
        for v in VARIANTS {
            let m = &models[0].1;
            let min = run(m, 64, 1, layout, v, Piece::Minimal, 0);
            let share = run(m, 64, 1, layout, v, Piece::Share, 0);
            assert_eq!(
                min.counts, share.counts,
                "layout {layout} variant {v:?}: a real share moves other bytes than a one-row \
                 piece"
            );
            assert!(share.elements > 100_000_000);
        }
    }
    println!(
        "checked: 7B on 64 ranks, rank 1's real share (bf16) issues the same collectives as \
         a one-row/column/element piece\n"
    );
    println!(
        "| model | params | ranks | layout | algorithm | phases | per-submit all-reduces \
         (payload) | phase-end all-reduces (payload) | gradient reduce-scatter payload (bf16) \
         | statistics / gradients |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (name, model) in &models {
        let params: i64 = model.iter().map(|(_, s)| s.iter().product::<i64>()).sum();
        for n in [8u32, 64] {
            for layout in LAYOUTS {
                for v in VARIANTS {
                    let (algorithm, clip, per_element) = v;
                    let r = run(model, n, 1, layout, v, Piece::Minimal, 0);
                    let c = r.counts;
                    let passes = if clip { 2 } else { 1 };
                    let grad_bytes = params as u64 * 2 * passes;
                    let sub = Count {
                        calls: c[0].calls + c[2].calls,
                        bytes: c[0].bytes + c[2].bytes,
                    };
                    let end = Count {
                        calls: c[1].calls + c[3].calls,
                        bytes: c[1].bytes + c[3].bytes,
                    };
                    println!(
                        "| {name} | {:.2} B | {n} | {} | {} | {} | {} ({}) | {} ({} B) | {} | \
                         {:.4} % |",
                        params as f64 * 1e-9,
                        match layout {
                            LOMO_LAYOUT_ROWS => "ROWS",
                            LOMO_LAYOUT_COLS => "COLS",
                            _ => "FLAT",
                        },
                        match (algorithm, per_element) {
                            (1, _) => "AdaLomo",
                            (_, false) => "LOMO",
                            _ => "LOMO per-element",
                        },
                        if clip { "NORM+UPDATE" } else { "UPDATE" },
                        sub.calls,
                        mib(sub.bytes),
                        end.calls,
                        end.bytes,
                        mib(grad_bytes),
                        100.0 * (sub.bytes + end.bytes) as f64 / grad_bytes as f64
                    );
                }
            }
        }
    }
    let (a, b) = (
        run(
            &models[0].1,
            8,
            1,
            LOMO_LAYOUT_ROWS,
            (1, true, false),
            Piece::Minimal,
            0,
        ),
        run(
            &models[0].1,
            8,
            1,
            LOMO_LAYOUT_ROWS,
            (1, true, false),
            Piece::Minimal,
            LOMO_DIST_CHECK,
        ),
    );
    for (place, k) in [("NORM end", 1), ("UPDATE end", 3)] {
        println!(
            "\nwith LOMO_DIST_CHECK ({place}): {} all-reduces ({} B), without: {} ({} B)",
            b.counts[k].calls, b.counts[k].bytes, a.counts[k].calls, a.counts[k].bytes
        );
    }
    assert_eq!(
        (a.counts[0], a.counts[2]),
        (b.counts[0], b.counts[2]),
        "the check adds to the submissions"
    );
}
