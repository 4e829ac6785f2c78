//! Parameters in layouts other than contiguous (`lomo_param_set_strides`, issue 13 kind 6):
//! channels_last convolution weights, permuted and transposed tensors, with AdaLomo and LOMO,
//! each against the same parameter registered contiguous (an independent run of the contiguous
//! path), bit for bit, and the refusals before anything changes.

mod common;

use common::*;
use lomo::ffi::state::{lomo_memory_stats_get, lomo_state_serialize, lomo_state_size};
use lomo::ffi::strides::lomo_param_set_strides;
use lomo::ffi::types::lomo_memory_stats;
use lomo::Status;

fn set_strides(opt: &Opt, id: u32, strides: &[i64]) -> Result<(), Failure> {
    // SAFETY: live handle; `strides` holds its length in values.
    check(unsafe { lomo_param_set_strides(opt.0, id, strides.len() as u32, strides.as_ptr()) })
}

/// The memory offset of each logical (row-major) index of `shape` under `strides`.
fn offsets(shape: &[i64], strides: &[i64]) -> Vec<usize> {
    let n: i64 = shape.iter().product();
    (0..n)
        .map(|mut k| {
            let mut off = 0;
            for d in (0..shape.len()).rev() {
                off += (k % shape[d]) * strides[d];
                k /= shape[d];
            }
            off as usize
        })
        .collect()
}

/// Values in logical order laid out in memory under `strides`.
fn to_memory(logical: &[f32], offs: &[usize]) -> Vec<f32> {
    let mut m = vec![0.0; logical.len()];
    for (k, &o) in offs.iter().enumerate() {
        m[o] = logical[k];
    }
    m
}

fn bits(b: &Buf) -> Vec<u32> {
    if b.dtype == F32 {
        b.f32s.iter().map(|v| v.to_bits()).collect()
    } else {
        b.halves.iter().map(|&h| h as u32).collect()
    }
}

fn state_bytes(opt: &Opt) -> Vec<u8> {
    let mut n = 0usize;
    // SAFETY: live handle, valid out pointers, a buffer of the reported size.
    unsafe {
        check(lomo_state_size(opt.0, &mut n)).unwrap();
        let mut buf = vec![0u8; n];
        let mut w = 0usize;
        check(lomo_state_serialize(opt.0, buf.as_mut_ptr(), n, &mut w)).unwrap();
        buf.truncate(w);
        buf
    }
}

fn workspace(opt: &Opt) -> u64 {
    // SAFETY: a zeroed lomo_memory_stats with its size set; live handle.
    unsafe {
        let mut m: lomo_memory_stats = std::mem::zeroed();
        m.struct_size = std::mem::size_of::<lomo_memory_stats>();
        check(lomo_memory_stats_get(opt.0, &mut m)).unwrap();
        m.workspace_bytes
    }
}

/// (shape, strides) of dense non-overlapping layouts other than contiguous.
const LAYOUTS: [(&[i64], &[i64]); 5] = [
    // channels_last (O, I, kH, kW): memory order O, kH, kW, I
    (&[6, 5, 3, 4], &[60, 1, 20, 5]),
    // channels_last with a 1x1 kernel (the last dimension has size 1)
    (&[4, 7, 1, 1], &[7, 1, 7, 7]),
    // a transposed matrix
    (&[9, 13], &[1, 9]),
    // a 3-D permutation whose last dimension is outermost
    (&[3, 4, 5], &[5, 15, 1]),
    // rows permuted, last dimension innermost
    (&[4, 3, 6], &[6, 24, 1]),
];

/// Runs `steps` steps of the same gradients on a contiguous registration and on a strided one,
/// and asserts that the parameters (compared in logical order) and the serialized states are
/// identical bit for bit after every step.
fn same_as_contiguous(algorithm: u32, dtype: u32, rounding: u32, clip: f64, grad_dtype: u32) {
    for (li, &(shape, strides)) in LAYOUTS.iter().enumerate() {
        let mut cfg = config(algorithm);
        cfg.rounding = rounding;
        cfg.seed = 7;
        cfg.clip_grad_norm = clip;
        cfg.weight_decay = 0.01;
        let n: i64 = shape.iter().product();
        let offs = offsets(shape, strides);
        let mut rng = Rng::new(li as u64 + 1);
        let w0 = rng.vec(n as usize, 0.5);
        let mut wc = Buf::new(dtype, &w0);
        let mut ws = Buf::new(dtype, &to_memory(&w0, &offs));
        let (a, b) = (Opt::new(&cfg).unwrap(), Opt::new(&cfg).unwrap());
        let ida = a.register("w", wc.ptr(), dtype, shape, 0).unwrap();
        let idb = b.register("w", ws.ptr(), dtype, shape, 0).unwrap();
        set_strides(&b, idb, strides).unwrap();
        for step in 0..4 {
            let mut g = rng.vec(n as usize, 3.0);
            if step == 1 {
                // an all-zero row and column of the logical view
                let cols = *shape.last().unwrap() as usize;
                for (k, v) in g.iter_mut().enumerate() {
                    if k / cols == 1 || k % cols == 0 {
                        *v = 0.0;
                    }
                }
            }
            let gc = Buf::new(grad_dtype, &g);
            let gs = Buf::new(grad_dtype, &to_memory(&g, &offs));
            let ptr = |b: &Buf| -> *const std::ffi::c_void {
                if b.dtype == F32 {
                    b.f32s.as_ptr().cast()
                } else {
                    b.halves.as_ptr().cast()
                }
            };
            for (opt, id, gb) in [(&a, ida, &gc), (&b, idb, &gs)] {
                if clip > 0.0 {
                    opt.begin(0, 0.0).unwrap();
                    opt.submit(id, ptr(gb), grad_dtype).unwrap();
                    opt.end().unwrap();
                }
                opt.begin(1, 0.05).unwrap();
                opt.submit(id, ptr(gb), grad_dtype).unwrap();
                opt.end().unwrap();
            }
            let strided_logical: Vec<u32> = offs.iter().map(|&o| bits(&ws)[o]).collect();
            let ctx = format!("alg {algorithm} dtype {dtype} rounding {rounding} clip {clip} {shape:?} {strides:?} step {step}");
            assert_eq!(bits(&wc), strided_logical, "{ctx}");
            assert_ne!(wc.values(), w0, "{ctx}: the step did something");
            assert_eq!(
                a.info().grad_norm.to_bits(),
                b.info().grad_norm.to_bits(),
                "{ctx}"
            );
        }
        assert_eq!(
            state_bytes(&a),
            state_bytes(&b),
            "state of {shape:?} {strides:?}"
        );
    }
}

#[test]
fn adalomo_on_channels_last_and_permuted_layouts_equals_the_contiguous_run() {
    for dtype in [F32, BF16, F16] {
        for rounding in [0, 1] {
            same_as_contiguous(1, dtype, rounding, 0.0, dtype);
        }
        same_as_contiguous(1, dtype, 0, 1.0, F32);
    }
}

#[test]
fn lomo_on_channels_last_and_permuted_layouts_equals_the_contiguous_run() {
    // LOMO is elementwise: memory order gives the same values (nearest rounding; the global
    // norm sums in memory order, which may differ in the last bit, so no norm clipping here).
    for dtype in [F32, BF16, F16] {
        same_as_contiguous(0, dtype, 0, 0.0, dtype);
    }
}

#[test]
fn adalomo_scratch_is_workspace_and_lomo_keeps_none() {
    for (algorithm, want) in [(0u32, 0u64), (1, 6 * 5 * 3 * 4 * (2 + 4))] {
        let opt = Opt::new(&config(algorithm)).unwrap();
        let mut w = Buf::new(BF16, &[0.5; 360]);
        let id = opt.register("w", w.ptr(), BF16, &[6, 5, 3, 4], 0).unwrap();
        let before = workspace(&opt);
        set_strides(&opt, id, &[60, 1, 20, 5]).unwrap();
        assert_eq!(workspace(&opt) - before, want, "algorithm {algorithm}");
        // contiguous strides drop the layout and its scratch
        set_strides(&opt, id, &[60, 12, 4, 1]).unwrap();
        assert_eq!(workspace(&opt), before);
    }
}

#[test]
fn layouts_that_are_not_dense_and_calls_out_of_place_are_refused_and_change_nothing() {
    for algorithm in [0u32, 1] {
        let opt = Opt::new(&config(algorithm)).unwrap();
        let mut w = Buf::new(F32, &[0.5; 360]);
        let id = opt.register("w", w.ptr(), F32, &[6, 5, 3, 4], 0).unwrap();
        let before = workspace(&opt);
        for bad in [
            &[120, 1, 20, 5][..], // a gap
            &[60, 1, 20, 4],      // overlapping
            &[60, 1, 20, -5],     // negative
            &[60, 1, 20],         // another rank
        ] {
            let e = set_strides(&opt, id, bad).unwrap_err();
            assert_eq!(e.status, Status::InvalidArgument as u32, "{bad:?}");
            assert!(e.message.contains("'w'"), "{}", e.message);
        }
        assert_eq!(
            set_strides(&opt, 9, &[60, 1, 20, 5]).unwrap_err().status,
            Status::UnknownParam as u32
        );
        // SAFETY: a NULL stride array with ndim > 0 is refused unread.
        let st = unsafe { lomo_param_set_strides(opt.0, id, 4, std::ptr::null()) };
        assert_eq!(st, Status::NullArgument);
        opt.begin(1, 0.1).unwrap();
        assert_eq!(
            set_strides(&opt, id, &[60, 1, 20, 5]).unwrap_err().status,
            Status::PhaseError as u32
        );
        opt.end().unwrap();
        assert_eq!(
            workspace(&opt),
            before,
            "nothing allocated by a refused call"
        );
        // still contiguous: a step reads the gradient in row-major order
        let g: Vec<f32> = (0..360).map(|k| k as f32 / 360.0).collect();
        let mut c = Buf::new(F32, &[0.5; 360]);
        let ref_opt = Opt::new(&config(algorithm)).unwrap();
        let rid = ref_opt
            .register("w", c.ptr(), F32, &[6, 5, 3, 4], 0)
            .unwrap();
        ref_opt.begin(1, 0.1).unwrap(); // the empty step of `opt` above
        ref_opt.end().unwrap();
        for (o, i) in [(&opt, id), (&ref_opt, rid)] {
            o.begin(1, 0.1).unwrap();
            o.submit(i, g.as_ptr().cast(), F32).unwrap();
            o.end().unwrap();
        }
        assert_eq!(w.f32s, c.f32s);
    }
}

#[test]
fn adalomo_pieces_and_strided_layouts_refuse_each_other() {
    use common::dist::shard;
    use lomo::ffi::dist::{LOMO_COMM_NONE, LOMO_LAYOUT_FULL};
    let (shape, cl) = ([6i64, 5, 3, 4], [60i64, 1, 20, 5]);
    let opt = Opt::new(&config(1)).unwrap();
    let mut w = Buf::new(F32, &[0.5; 360]);
    let mut v = Buf::new(F32, &[0.5; 360]);
    let a = opt.register("a", w.ptr(), F32, &shape, 0).unwrap();
    let b = opt.register("b", v.ptr(), F32, &shape, 0).unwrap();
    shard(&opt, a, LOMO_LAYOUT_FULL, &shape, 0, LOMO_COMM_NONE, 0).unwrap();
    let e = set_strides(&opt, a, &cl).unwrap_err();
    assert_eq!(e.status, Status::Unsupported as u32, "{}", e.message);
    set_strides(&opt, b, &cl).unwrap();
    let e = shard(&opt, b, LOMO_LAYOUT_FULL, &shape, 0, LOMO_COMM_NONE, 0).unwrap_err();
    assert_eq!(e.status, Status::Unsupported as u32, "{}", e.message);
}

#[test]
fn an_allocation_failure_in_set_strides_leaves_the_parameter_as_it_was() {
    let opt = Opt::new(&config(1)).unwrap();
    let mut w = Buf::new(F32, &[0.5; 360]);
    let id = opt.register("w", w.ptr(), F32, &[6, 5, 3, 4], 0).unwrap();
    let before = workspace(&opt);
    for n in 0..2 {
        lomo::alloc::fail_after(Some(n));
        let e = set_strides(&opt, id, &[60, 1, 20, 5]).unwrap_err();
        lomo::alloc::fail_after(None);
        assert_eq!(e.status, Status::OutOfMemory as u32, "{}", e.message);
        assert!(e.message.contains("'w'"), "{}", e.message);
        assert_eq!(workspace(&opt), before);
    }
    set_strides(&opt, id, &[60, 1, 20, 5]).unwrap();
    assert!(workspace(&opt) > before);
}

#[test]
fn gradient_accumulation_on_strided_layouts_equals_the_contiguous_run() {
    use lomo::ffi::accum::lomo_accum_enable;
    // Micro-batch gradients arrive in the parameter's layout and are accumulated in memory
    // order; the last micro-batch's step gathers the completed buffer into logical order.
    for dtype in [F32, BF16] {
        for &(shape, strides) in LAYOUTS.iter() {
            let mut cfg = config(1);
            cfg.clip_grad_norm = 1.0;
            let n: i64 = shape.iter().product();
            let offs = offsets(shape, strides);
            let mut rng = Rng::new(11);
            let w0 = rng.vec(n as usize, 0.5);
            let mut wc = Buf::new(dtype, &w0);
            let mut ws = Buf::new(dtype, &to_memory(&w0, &offs));
            let (a, b) = (Opt::new(&cfg).unwrap(), Opt::new(&cfg).unwrap());
            let ida = a.register("w", wc.ptr(), dtype, shape, 0).unwrap();
            let idb = b.register("w", ws.ptr(), dtype, shape, 0).unwrap();
            set_strides(&b, idb, strides).unwrap();
            for opt in [&a, &b] {
                // SAFETY: live handle.
                check(unsafe { lomo_accum_enable(opt.0, 0, 1) }).unwrap();
            }
            for _step in 0..2 {
                let micro: Vec<Vec<f32>> = (0..3).map(|_| rng.vec(n as usize, 2.0)).collect();
                for (opt, id, strided) in [(&a, ida, false), (&b, idb, true)] {
                    let gs: Vec<Vec<f32>> = micro
                        .iter()
                        .map(|g| {
                            if strided {
                                to_memory(g, &offs)
                            } else {
                                g.clone()
                            }
                        })
                        .collect();
                    for g in &gs[..2] {
                        opt.begin(2, 0.0).unwrap();
                        opt.submit(id, g.as_ptr().cast(), F32).unwrap();
                        opt.end().unwrap();
                    }
                    for phase in [0, 1] {
                        opt.begin(phase, 0.05).unwrap();
                        opt.submit(id, gs[2].as_ptr().cast(), F32).unwrap();
                        opt.end().unwrap();
                    }
                }
                let strided_logical: Vec<u32> = offs.iter().map(|&o| bits(&ws)[o]).collect();
                assert_eq!(
                    bits(&wc),
                    strided_logical,
                    "dtype {dtype} {shape:?} {strides:?}"
                );
                assert_ne!(wc.values(), w0);
                assert_eq!(a.info().grad_norm.to_bits(), b.info().grad_norm.to_bits());
            }
            assert_eq!(state_bytes(&a), state_bytes(&b), "{shape:?} {strides:?}");
        }
    }
}
