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

// SAFETY: forwards to the system allocator; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if ARMED.load(Ordering::Relaxed) {
            COUNT.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
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
