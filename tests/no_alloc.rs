//! Steps allocate nothing on the CPU backend: a counting global allocator watches every thread
//! while LOMO and AdaLomo steps (with a NORM phase, dynamic loss scaling and stochastic rounding)
//! run on tensors large enough to use the thread pool — whole, and as pieces of rows and of
//! columns with the agreement check on (one rank; its all-reduce is the identity).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use lomo::{
    Algorithm, Config, DType, Device, LossScaleMode, Optimizer, ParamDesc, Phase, Rounding,
};

struct Counting;
static ARMED: AtomicBool = AtomicBool::new(false);
static COUNT: AtomicUsize = AtomicUsize::new(0);
/// The bytes of one block of rayon's global injector queue (63 × 24 + 8).
const RAYON_INJECTOR_BLOCK: usize = 1520;

// SAFETY: forwards to the system allocator; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            COUNT.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    /// rayon's global job queue (crossbeam's `Injector`) allocates one zeroed block of 63 job
    /// slots (1520 bytes) per 63 jobs handed to the pool from outside it, whatever the library
    /// does: amortized, not per step, and not counted (docs/RELIABILITY.md). Every other zeroed
    /// allocation is.
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) && layout.size() != RAYON_INJECTOR_BLOCK {
            COUNT.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// A one-rank communicator: the all-reduce leaves the buffer as it is.
unsafe extern "C" fn identity(
    _user: *mut std::ffi::c_void,
    _buf: *mut std::ffi::c_void,
    _count: usize,
    _dtype: u32,
    _op: u32,
    _stream: *mut std::ffi::c_void,
) -> i32 {
    0
}

#[test]
fn steps_do_not_allocate() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for (algorithm, pieces) in [
        (Algorithm::Lomo, false),
        (Algorithm::Adalomo, false),
        (Algorithm::Lomo, true),
        (Algorithm::Adalomo, true),
    ] {
        let mut cfg = Config::defaults(algorithm);
        cfg.clip_grad_norm = 1.0;
        cfg.loss_scale_mode = LossScaleMode::Dynamic;
        cfg.rounding = Rounding::Stochastic;
        let mut opt = Optimizer::new(cfg).unwrap();
        let shapes: [&[i64]; 3] = [&[512, 1024], &[300_000], &[7]];
        let mut params: Vec<Vec<u16>> = Vec::new();
        let mut grads: Vec<Vec<u16>> = Vec::new();
        for s in shapes {
            let n = s.iter().product::<i64>() as usize;
            params.push(vec![0x3c00; n]);
            grads.push(vec![0x3a00; n]);
        }
        let ids: Vec<u32> = params
            .iter_mut()
            .zip(shapes)
            .enumerate()
            .map(|(k, (p, s))| {
                let name = format!("p{k}");
                opt.register(&ParamDesc {
                    name: &name,
                    addr: p.as_mut_ptr() as usize,
                    dtype: DType::Bf16,
                    shape: s,
                    device: Device::Cpu,
                    group: 0,
                    flags: 0,
                })
                .unwrap()
            })
            .collect();
        if pieces {
            let comm =
                lomo::dist::Comm::new(0, 1, std::ptr::null_mut(), Some(identity), None, None, None)
                    .unwrap();
            opt.comm_add_check().unwrap();
            let c = opt.comm_add(comm);
            for (k, (&id, s)) in ids.iter().zip(shapes).enumerate() {
                // Columns of the matrix; ranges (rows of the [n, 1] view) of the vectors.
                let layout = if k == 0 { 2 } else { 1 };
                let desc = lomo::optimizer::ShardDesc {
                    layout,
                    global_shape: s,
                    offset: 0,
                    piece_comm: Some(c),
                    grad_mode: 0,
                    grad_comm: None,
                    flags: 0,
                };
                opt.param_set_shard(id, &desc).unwrap();
            }
            opt.dist_set(Some(c), 1).unwrap();
        }
        if !pieces {
            // The matrix stored transposed (lomo_param_set_strides): AdaLomo's logical-order
            // copies live in scratch allocated here, not in the steps.
            opt.param_set_strides(ids[0], &[1, 512]).unwrap();
        }
        let step = |opt: &mut Optimizer| {
            for phase in [Phase::Norm, Phase::Update] {
                opt.begin(phase, 1e-3).unwrap();
                for (id, g) in ids.iter().zip(&grads) {
                    opt.submit(*id, g.as_ptr() as usize, DType::Bf16).unwrap();
                }
                opt.end().unwrap();
            }
        };
        step(&mut opt); // warm-up: the thread pool starts
        ARMED.store(true, Ordering::SeqCst);
        for _ in 0..3 {
            step(&mut opt);
        }
        ARMED.store(false, Ordering::SeqCst);
        assert_eq!(
            COUNT.swap(0, Ordering::SeqCst),
            0,
            "{algorithm:?} (pieces: {pieces}): steps allocated"
        );
        assert_eq!(opt.step_info().step, 4);
    }
}

/// The tests of this file share the counting allocator: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

mod common;

use common::{check, Opt, BF16, F32};
use lomo::ffi::accum::{lomo_accum_enable, LOMO_ACCUM_F32, LOMO_ACCUM_MEAN};
use lomo::ffi::batch::lomo_grad_submit_batch;

/// Arrays of a batch, built before counting.
struct Batch {
    ids: Vec<u32>,
    ptrs: Vec<*const std::ffi::c_void>,
    dtypes: Vec<u32>,
    counts: Vec<u64>,
}

/// One phase through `lomo_grad_submit_batch`.
fn batch_phase(opt: &Opt, phase: u32, b: &Batch) {
    opt.begin(phase, 1e-3).unwrap();
    // SAFETY: live handle; arrays of ids.len() entries; gradients of the registered sizes.
    check(unsafe {
        lomo_grad_submit_batch(
            opt.0,
            b.ids.len(),
            b.ids.as_ptr(),
            b.ptrs.as_ptr(),
            b.dtypes.as_ptr(),
            b.counts.as_ptr(),
            std::ptr::null_mut(),
        )
    })
    .unwrap();
    opt.end().unwrap();
}

/// One step: `micro` ACCUMULATE phases (accumulation on), NORM (when `norm`), UPDATE; each
/// through the batch or, `single`, submit by submit.
fn step_with(opt: &Opt, b: &Batch, micro: u32, norm: bool, single: bool) {
    let phase = |p: u32| {
        if single {
            opt.begin(p, 1e-3).unwrap();
            for (&id, &g) in b.ids.iter().zip(&b.ptrs) {
                opt.submit(id, g, b.dtypes[0]).unwrap();
            }
            opt.end().unwrap();
        } else {
            batch_phase(opt, p, b);
        }
    };
    for _ in 0..micro {
        phase(2);
    }
    if norm {
        phase(0);
    }
    phase(1);
}

/// Registers `shapes` (all of `dtype`, on `device`) with gradients; the buffers stay alive in
/// the returned vectors.
fn setup(
    opt: &Opt,
    shapes: &[&[i64]],
    dtype: u32,
    device: i32,
) -> (Batch, Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let size = if dtype == F32 { 1 } else { 2 };
    let (mut params, mut grads) = (Vec::new(), Vec::new());
    let mut b = Batch {
        ids: vec![],
        ptrs: vec![],
        dtypes: vec![],
        counts: vec![],
    };
    for (k, s) in shapes.iter().enumerate() {
        let n = s.iter().product::<i64>() as usize;
        // u32 words: n/size of them hold n elements (plus one for odd counts).
        let words = n / size + 1;
        let fill = if dtype == F32 {
            0x3f00_0000
        } else {
            0x3f00_3f00
        };
        let gfill = if dtype == F32 {
            0x3e80_0000
        } else {
            0x3e80_3e80
        };
        params.push(vec![fill; words]);
        grads.push(vec![gfill; words]);
        let id = opt
            .register_on(
                &format!("p{k}"),
                params[k].as_mut_ptr().cast(),
                dtype,
                s,
                device,
                0,
                0,
            )
            .unwrap();
        b.ids.push(id);
        b.ptrs.push(grads[k].as_ptr().cast());
        b.dtypes.push(dtype);
        b.counts.push(n as u64);
    }
    (b, params, grads)
}

/// Allocations (all threads) of `steps` steps after a warm-up step.
fn count(opt: &Opt, b: &Batch, micro: u32, norm: bool, single: bool, steps: u32) -> usize {
    step_with(opt, b, micro, norm, single); // warm-up: thread pool, scratch, buffers
    COUNT.store(0, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
    for _ in 0..steps {
        step_with(opt, b, micro, norm, single);
    }
    ARMED.store(false, Ordering::SeqCst);
    COUNT.swap(0, Ordering::SeqCst)
}

/// `lomo_grad_submit_batch` on the CPU allocates nothing: LOMO and AdaLomo, with a NORM phase,
/// dynamic loss scaling and stochastic rounding, tensors large enough for the thread pool, a
/// batch longer than one on-stack run (64 entries, `BATCH_CHUNK`), and with gradient accumulation on (two
/// ACCUMULATE phases per step).
#[test]
fn batch_steps_do_not_allocate() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut shapes: Vec<Vec<i64>> = vec![vec![512, 1024], vec![300_000], vec![7], vec![3, 5]];
    shapes.extend((0..64).map(|k| vec![k % 9 + 1, 4]));
    let shapes: Vec<&[i64]> = shapes.iter().map(|s| &s[..]).collect();
    for algorithm in [0u32, 1] {
        for accum in [false, true] {
            let mut cfg = common::config(algorithm);
            cfg.clip_grad_norm = 1.0;
            cfg.loss_scale_mode = 2; // dynamic
            cfg.rounding = 1; // stochastic
            let opt = Opt::new(&cfg).unwrap();
            let (b, _params, _grads) = setup(&opt, &shapes, BF16, -1);
            let micro = if accum {
                // SAFETY: live handle.
                check(unsafe { lomo_accum_enable(opt.0, LOMO_ACCUM_F32, LOMO_ACCUM_MEAN) })
                    .unwrap();
                2
            } else {
                0
            };
            let n = count(&opt, &b, micro, true, false, 3);
            assert_eq!(
                n, 0,
                "algorithm {algorithm} (accumulation {accum}): batch steps allocated {n} times"
            );
            assert_eq!(opt.info().step, 4);
        }
    }
}

/// On the emulated CUDA device the kernel launches themselves allocate (the emulator, and the
/// launcher's kernel names), so the batch path is held to this: a batch of tensors that each
/// take their own launch allocates exactly what the same submits one by one do (the batch adds
/// no allocation of its own: no per-call arrays), and a batch of small tensors (multi-tensor
/// launches) at most that.
#[test]
fn cuda_batch_allocates_no_more_than_single_submits() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    std::env::set_var("LOMO_CUDA_EMULATE", "1");
    let large: [&[i64]; 3] = [&[100, 100], &[9000], &[200, 50]];
    let small: [&[i64]; 5] = [&[7], &[64, 3], &[100], &[1], &[2048]];
    for (shapes, equal) in [(&large[..], true), (&small[..], false)] {
        for norm in [false, true] {
            let counts: Vec<usize> = [true, false]
                .iter()
                .map(|&single| {
                    let mut cfg = common::config(0);
                    if norm {
                        cfg.clip_grad_norm = 1.0;
                    }
                    let opt = Opt::new(&cfg).unwrap();
                    let (b, _params, _grads) = setup(&opt, shapes, F32, 0);
                    count(&opt, &b, 0, norm, single, 2)
                })
                .collect();
            let (single, batch) = (counts[0], counts[1]);
            println!("emulated CUDA, shapes {shapes:?}, norm {norm}: {single} allocations one by one, {batch} batched");
            if equal {
                assert_eq!(
                    batch, single,
                    "the batch allocated more than the single submits"
                );
            } else {
                assert!(
                    batch <= single,
                    "the batch allocated more ({batch}) than the single submits ({single})"
                );
            }
        }
    }
}
