//! Gradient accumulation (`lomo_accum_enable`, `LOMO_PHASE_ACCUMULATE`) on the CPU backend,
//! through the C API, against the independent f64 reference of `common::reference` applied to
//! the accumulated gradient: one step over k micro-batches equals one reference step on the
//! summed (or averaged) gradient — i.e. on the concatenated batch.

mod common;

use common::reference::{reference_step, ulp_of, view, Case, RefState};
use common::*;
use lomo::ffi::accum::*;
use lomo::ffi::optimizer::lomo_step_cancel;
use lomo::ffi::state::{lomo_memory_stats_get, lomo_state_save};
use lomo::ffi::types::lomo_memory_stats;

const NORM: u32 = 0;
const UPDATE: u32 = 1;
const ACCUMULATE: u32 = 2;

fn enable(opt: &Opt, buffer: u32, reduction: u32) -> Result<(), Failure> {
    // SAFETY: live handle.
    check(unsafe { lomo_accum_enable(opt.0, buffer, reduction) })
}

fn accum_get(opt: &Opt) -> (u32, u64) {
    let (mut pending, mut bytes) = (u32::MAX, u64::MAX);
    // SAFETY: live handle, valid out pointers.
    check(unsafe { lomo_accum_get(opt.0, &mut pending, &mut bytes) }).unwrap();
    (pending, bytes)
}

fn workspace_bytes(opt: &Opt) -> u64 {
    let mut st = lomo_memory_stats {
        struct_size: std::mem::size_of::<lomo_memory_stats>(),
        ..Default::default()
    };
    // SAFETY: live handle, valid out pointer.
    check(unsafe { lomo_memory_stats_get(opt.0, &mut st) }).unwrap();
    st.workspace_bytes
}

fn cancel(opt: &Opt) {
    // SAFETY: live handle.
    check(unsafe { lomo_step_cancel(opt.0) }).unwrap();
}

/// The accumulated gradient as documented: an f32 buffer is compared with the exact sum
/// (f64); a buffer in the parameter's dtype rounds every partial sum to that dtype.
fn accumulated(
    micro: &[Option<Vec<f32>>],
    n: usize,
    buf_dtype: Option<u32>,
    mean: bool,
) -> Vec<f32> {
    let k = micro.len();
    let m = if mean { 1.0 / k as f64 } else { 1.0 };
    match buf_dtype {
        None => (0..n)
            .map(|i| {
                let s: f64 = micro.iter().flatten().map(|g| g[i] as f64).sum();
                (s * m) as f32
            })
            .collect(),
        Some(d) => {
            let mut acc: Option<Vec<f32>> = None;
            let last = k - 1;
            for (j, g) in micro.iter().enumerate() {
                let f = if j == last { m as f32 } else { 1.0 };
                match (acc.as_mut(), g) {
                    (Some(a), Some(g)) => {
                        for i in 0..n {
                            a[i] = Buf::round(d, (a[i] + g[i]) * f);
                        }
                    }
                    (None, Some(g)) => {
                        acc = Some(g.iter().map(|&v| Buf::round(d, v * f)).collect());
                    }
                    (Some(a), None) if j == last => {
                        for v in a.iter_mut() {
                            *v = Buf::round(d, *v * f);
                        }
                    }
                    _ => {}
                }
            }
            acc.unwrap_or_else(|| vec![0.0; n])
        }
    }
}

fn assert_close(c: &Case, shape: &[i64], before: &[f32], got: &[f32], want: &[f64], what: &str) {
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let delta = (w - before[i] as f64).abs();
        let rounded = Buf::round(c.pdtype, w as f32);
        let ulp = if c.pdtype == F32 {
            1e-6 * w.abs()
        } else {
            (rounded as f64 - w).abs().max(ulp_of(c.pdtype, w))
        };
        assert!(
            (g as f64 - w).abs() <= ulp + 1e-5 * delta + 1e-12,
            "{what} {c:?} shape {shape:?} [{i}]: got {g:e}, want {w:e}"
        );
    }
}

/// One accumulation setup over two steps of `k` micro-batches. `skip(step, micro, param)`:
/// the parameter receives no gradient in that micro-batch (a zero contribution).
#[allow(clippy::too_many_arguments)]
fn run(
    c: Case,
    buffer: u32,
    mean: bool,
    k: usize,
    shapes: &[Vec<i64>],
    seed: u64,
    skip: &dyn Fn(usize, usize, usize) -> bool,
) {
    let mut cfg = config(c.algorithm);
    cfg.clip_grad_norm = c.clip_norm;
    cfg.clip_grad_value = c.clip_value;
    cfg.weight_decay = c.wd;
    cfg.loss_scale_mode = if c.scale > 0.0 { 1 } else { 0 };
    cfg.loss_scale = if c.scale > 0.0 { c.scale } else { 1.0 };
    let opt = Opt::new(&cfg).unwrap();
    let mut rng = Rng::new(seed);
    let (mut bufs, mut ids, mut states) = (Vec::new(), Vec::new(), Vec::new());
    for (p, shape) in shapes.iter().enumerate() {
        let n: usize = shape.iter().map(|&d| d as usize).product();
        let mut b = Buf::new(c.pdtype, &rng.vec(n, 0.5));
        ids.push(
            opt.register(&format!("p{p}"), b.ptr(), c.pdtype, shape, 0)
                .unwrap(),
        );
        bufs.push(b);
        let (rows, cols, factored) = view(shape);
        states.push(if factored {
            RefState::Factored(vec![0.0; rows], vec![0.0; cols])
        } else {
            RefState::Vector(vec![0.0; n])
        });
    }
    enable(
        &opt,
        buffer,
        if mean {
            LOMO_ACCUM_MEAN
        } else {
            LOMO_ACCUM_SUM
        },
    )
    .unwrap();
    let buf_dtype = (buffer == LOMO_ACCUM_PARAM_DTYPE).then_some(c.pdtype);
    for (step, lr) in [(0usize, 0.05f32), (1, 0.02)] {
        let scale = opt.loss_scale() as f64;
        // micro[j][p]: micro-batch j's gradient of parameter p (None: not submitted).
        let micro: Vec<Vec<Option<Vec<f32>>>> = (0..k)
            .map(|j| {
                bufs.iter()
                    .enumerate()
                    .map(|(p, b)| {
                        let g: Vec<f32> = (0..b.len())
                            .map(|_| {
                                Buf::round(c.gdtype, (rng.normal() as f64 * 0.3 * scale) as f32)
                            })
                            .collect();
                        (!skip(step, j, p)).then_some(g)
                    })
                    .collect()
            })
            .collect();
        let acc: Vec<Vec<f32>> = (0..bufs.len())
            .map(|p| {
                let per: Vec<Option<Vec<f32>>> = micro.iter().map(|m| m[p].clone()).collect();
                accumulated(&per, bufs[p].len(), buf_dtype, mean)
            })
            .collect();
        let before: Vec<Vec<f32>> = bufs.iter().map(Buf::values).collect();
        let want = reference_step(
            &c,
            shapes,
            &before,
            &acc,
            &mut states,
            lr as f64,
            step as u64 + 1,
        );
        let submit_all = |j: usize| {
            for p in (0..bufs.len()).rev() {
                if let Some(g) = &micro[j][p] {
                    let mut gb = Buf::new(c.gdtype, g);
                    opt.submit(ids[p], gb.ptr(), c.gdtype).unwrap();
                }
            }
        };
        for j in 0..k - 1 {
            opt.begin(ACCUMULATE, 0.0).unwrap();
            submit_all(j);
            opt.end().unwrap();
            assert_eq!(accum_get(&opt).0, j as u32 + 1);
            for (b, v) in bufs.iter().zip(&before) {
                assert_eq!(&b.values(), v, "an ACCUMULATE phase changed a parameter");
            }
        }
        if c.clip_norm > 0.0 {
            opt.begin(NORM, 0.0).unwrap();
            submit_all(k - 1);
            opt.end().unwrap();
        }
        opt.begin(UPDATE, lr).unwrap();
        submit_all(k - 1);
        opt.end().unwrap();
        assert_eq!(accum_get(&opt).0, 0);
        for (p, b) in bufs.iter().enumerate() {
            let what = format!("k={k} buffer={buffer} mean={mean} step={step}");
            assert_close(&c, &shapes[p], &before[p], &b.values(), &want[p], &what);
        }
        let info = opt.info();
        assert_eq!(
            (info.step, info.overflow, info.skipped),
            (step as u64 + 1, 0, 0)
        );
    }
}

fn case(algorithm: u32, pdtype: u32, gdtype: u32, clip_norm: f64, scale: f64) -> Case {
    Case {
        algorithm,
        pdtype,
        gdtype,
        clip_norm,
        clip_value: 0.0,
        wd: 0.01,
        scale,
        carry: false,
        pscale: 1.0,
    }
}

fn small_shapes() -> Vec<Vec<i64>> {
    vec![vec![], vec![37], vec![3, 5], vec![2, 3, 4]]
}

#[test]
fn k_micro_batches_equal_one_reference_step_on_the_accumulated_gradient() {
    let shapes = small_shapes();
    let mut seed = 1;
    for algorithm in [0, 1] {
        for pdtype in [F32, F16, BF16] {
            for buffer in [LOMO_ACCUM_F32, LOMO_ACCUM_PARAM_DTYPE] {
                for mean in [false, true] {
                    for k in 1..=4 {
                        seed += 1;
                        // Norm clipping (two-pass protocol) and a static loss scale on half
                        // of the runs, alternating.
                        let clip = if seed % 2 == 0 { 0.5 } else { 0.0 };
                        let scale = if seed % 3 == 0 { 1024.0 } else { 0.0 };
                        let c = case(algorithm, pdtype, pdtype, clip, scale);
                        run(c, buffer, mean, k, &shapes, seed, &|_, _, _| false);
                    }
                }
            }
        }
    }
}

#[test]
fn mixed_gradient_dtypes_value_clipping_and_large_tensors() {
    let mut c = case(1, BF16, F32, 1.0, 1024.0);
    c.clip_value = 0.2;
    run(
        c,
        LOMO_ACCUM_F32,
        true,
        3,
        &[vec![70_000], vec![3, 4097]],
        7,
        &|_, _, _| false,
    );
    let c = case(0, F16, BF16, 0.0, 0.0);
    run(
        c,
        LOMO_ACCUM_PARAM_DTYPE,
        false,
        2,
        &[vec![70_000], vec![2, 50_000]],
        8,
        &|_, _, _| false,
    );
}

#[test]
fn parameters_missing_from_some_micro_batches_contribute_zero() {
    // p0 gets no gradient in the last micro-batch (it runs from its buffer at step_end),
    // p1 none in the first, p2 only in the last (a step that completes it alone).
    let skip = |_: usize, j: usize, p: usize| match p {
        0 => j == 2,
        1 => j == 0,
        2 => j < 2,
        _ => false,
    };
    for algorithm in [0, 1] {
        for clip in [0.0, 0.5] {
            for buffer in [LOMO_ACCUM_F32, LOMO_ACCUM_PARAM_DTYPE] {
                let c = case(algorithm, BF16, BF16, clip, 0.0);
                run(c, buffer, true, 3, &small_shapes(), 11, &skip);
            }
        }
    }
}

fn lomo_opt(clip: f64, dynamic: bool, algorithm: u32) -> Opt {
    let mut cfg = config(algorithm);
    cfg.clip_grad_norm = clip;
    cfg.loss_scale_mode = if dynamic { 2 } else { 0 };
    Opt::new(&cfg).unwrap()
}

#[test]
fn overflow_in_one_micro_batch_skips_the_whole_step() {
    for algorithm in [0, 1] {
        // With norm clipping: the NORM phase over the accumulated gradients finds the overflow
        // and no parameter changes.
        let opt = lomo_opt(1.0, true, algorithm);
        let mut p = [Buf::new(F32, &[0.5, -1.0, 2.0]), Buf::new(F32, &[1.0; 4])];
        let ids = [
            opt.register("a", p[0].ptr(), F32, &[3], 0).unwrap(),
            opt.register("b", p[1].ptr(), F32, &[2, 2], 0).unwrap(),
        ];
        enable(&opt, LOMO_ACCUM_F32, LOMO_ACCUM_SUM).unwrap();
        let before: Vec<Vec<f32>> = p.iter().map(Buf::values).collect();
        let scale = opt.loss_scale();
        let mut good = [Buf::new(F32, &[scale; 3]), Buf::new(F32, &[scale; 4])];
        let mut bad = Buf::new(F32, &[scale, f32::INFINITY, 0.0]);
        opt.begin(ACCUMULATE, 0.0).unwrap();
        opt.submit(ids[0], bad.ptr(), F32).unwrap();
        opt.submit(ids[1], good[1].ptr(), F32).unwrap();
        opt.end().unwrap();
        for phase in [NORM, UPDATE] {
            opt.begin(phase, 0.1).unwrap();
            for (i, g) in good.iter_mut().enumerate() {
                opt.submit(ids[i], g.ptr(), F32).unwrap();
            }
            opt.end().unwrap();
        }
        let info = opt.info();
        assert_eq!((info.skipped, info.overflow, info.step), (1, 1, 0));
        assert_eq!(info.next_loss_scale, scale / 2.0);
        for (b, v) in p.iter().zip(&before) {
            assert_eq!(&b.values(), v);
        }
        // The buffers were emptied: the next (single-batch) step sees only its own gradient.
        let scale = opt.loss_scale();
        let mut g = [Buf::new(F32, &[scale; 3]), Buf::new(F32, &[scale; 4])];
        for phase in [NORM, UPDATE] {
            opt.begin(phase, 0.1).unwrap();
            for (i, gb) in g.iter_mut().enumerate() {
                opt.submit(ids[i], gb.ptr(), F32).unwrap();
            }
            opt.end().unwrap();
        }
        let info = opt.info();
        assert_eq!((info.skipped, info.step), (0, 1));
        assert!(
            (info.grad_norm - 7f32.sqrt()).abs() < 1e-5,
            "{}",
            info.grad_norm
        );
    }
    // Without a NORM phase, as for one step: the tensor whose accumulated gradient is not
    // finite is not applied, the others are, and the step reports the overflow.
    let opt = lomo_opt(0.0, true, 0);
    let mut p = [Buf::new(F32, &[0.5, -1.0]), Buf::new(F32, &[1.0, 2.0])];
    let ids = [
        opt.register("a", p[0].ptr(), F32, &[2], 0).unwrap(),
        opt.register("b", p[1].ptr(), F32, &[2], 0).unwrap(),
    ];
    enable(&opt, LOMO_ACCUM_F32, LOMO_ACCUM_SUM).unwrap();
    let s = opt.loss_scale();
    let mut nan = Buf::new(F32, &[f32::NAN, 0.0]);
    let mut g = Buf::new(F32, &[s, s]);
    opt.begin(ACCUMULATE, 0.0).unwrap();
    opt.submit(ids[0], nan.ptr(), F32).unwrap();
    opt.submit(ids[1], g.ptr(), F32).unwrap();
    opt.end().unwrap();
    opt.begin(UPDATE, 0.5).unwrap();
    opt.submit(ids[0], g.ptr(), F32).unwrap();
    opt.submit(ids[1], g.ptr(), F32).unwrap();
    opt.end().unwrap();
    assert_eq!(p[0].values(), vec![0.5, -1.0]);
    assert_eq!(p[1].values(), vec![0.0, 1.0]);
    let info = opt.info();
    assert_eq!((info.overflow, info.grads_nonfinite), (1, 1));
}

#[test]
fn refusals_change_nothing() {
    let opt = lomo_opt(0.0, false, 1);
    let mut p = Buf::new(BF16, &[0.5, -1.0, 2.0, 4.0]);
    let id = opt.register("w", p.ptr(), BF16, &[2, 2], 0).unwrap();
    let mut g = Buf::new(F32, &[1.0; 4]);
    let phase_error = |r: Result<(), Failure>| assert_eq!(r.unwrap_err().status, 3);
    // ACCUMULATE without buffers.
    phase_error(opt.begin(ACCUMULATE, 0.0));
    let ws0 = workspace_bytes(&opt);
    // Unknown options.
    assert_eq!(enable(&opt, 2, 0).unwrap_err().status, 2);
    assert_eq!(enable(&opt, 0, 7).unwrap_err().status, 2);
    assert_eq!(accum_get(&opt), (0, 0));
    // Enabling mid-step.
    opt.begin(UPDATE, 0.1).unwrap();
    phase_error(enable(&opt, LOMO_ACCUM_F32, LOMO_ACCUM_SUM));
    opt.end().unwrap();
    assert_eq!(workspace_bytes(&opt), ws0);
    enable(&opt, LOMO_ACCUM_PARAM_DTYPE, LOMO_ACCUM_SUM).unwrap();
    assert_eq!(accum_get(&opt), (0, 8));
    assert_eq!(workspace_bytes(&opt), ws0 + 8);
    enable(&opt, LOMO_ACCUM_F32, LOMO_ACCUM_MEAN).unwrap();
    assert_eq!(accum_get(&opt), (0, 16));
    assert_eq!(workspace_bytes(&opt), ws0 + 16);
    // A parameter registered later gets its buffer.
    let mut q = Buf::new(F16, &[1.0; 3]);
    let qid = opt.register("q", q.ptr(), F16, &[3], 0).unwrap();
    assert_eq!(accum_get(&opt), (0, 28));
    let before = p.values();
    opt.begin(ACCUMULATE, 0.0).unwrap();
    opt.submit(id, g.ptr(), F32).unwrap();
    // Duplicate in one ACCUMULATE phase.
    assert_eq!(opt.submit(id, g.ptr(), F32).unwrap_err().status, 4);
    phase_error(opt.begin(ACCUMULATE, 0.0));
    opt.end().unwrap();
    assert_eq!(p.values(), before);
    // Pending: no option change, no checkpoint.
    phase_error(enable(&opt, LOMO_ACCUM_PARAM_DTYPE, LOMO_ACCUM_SUM));
    // SAFETY: live handle.
    phase_error(check(unsafe { lomo_accum_disable(opt.0) }));
    let path = std::ffi::CString::new("/tmp/lomo_accum_refusal.safetensors").unwrap();
    // SAFETY: live handle, NUL-terminated path.
    phase_error(check(unsafe { lomo_state_save(opt.0, path.as_ptr()) }));
    assert_eq!(accum_get(&opt), (1, 28));
    // ACCUMULATE after a NORM phase.
    let clip = lomo_opt(1.0, false, 0);
    let mut r = Buf::new(F32, &[1.0]);
    let rid = clip.register("r", r.ptr(), F32, &[1], 0).unwrap();
    enable(&clip, LOMO_ACCUM_F32, LOMO_ACCUM_SUM).unwrap();
    clip.begin(NORM, 0.0).unwrap();
    clip.submit(rid, g.ptr(), F32).unwrap();
    clip.end().unwrap();
    phase_error(clip.begin(ACCUMULATE, 0.0));
    // Cancel discards the accumulated gradients: the next step is a plain one.
    cancel(&opt);
    assert_eq!(accum_get(&opt), (0, 28));
    // SAFETY: live handle, NUL-terminated path.
    check(unsafe { lomo_state_save(opt.0, path.as_ptr()) }).unwrap();
    let _ = std::fs::remove_file("/tmp/lomo_accum_refusal.safetensors");
    let opt2 = lomo_opt(0.0, false, 1);
    let mut p2 = Buf::new(BF16, &before);
    let id2 = opt2.register("w", p2.ptr(), BF16, &[2, 2], 0).unwrap();
    let mut q2 = Buf::new(F16, &[1.0; 3]);
    let qid2 = opt2.register("q", q2.ptr(), F16, &[3], 0).unwrap();
    for (o, ids) in [(&opt, [id, qid]), (&opt2, [id2, qid2])] {
        o.begin(UPDATE, 0.1).unwrap();
        o.submit(ids[0], g.ptr(), F32).unwrap();
        o.submit(ids[1], g.ptr(), F32).unwrap();
        o.end().unwrap();
    }
    assert_eq!(p.values(), p2.values());
    assert_eq!(q.values(), q2.values());
    // SAFETY: live handle.
    check(unsafe { lomo_accum_disable(opt.0) }).unwrap();
    assert_eq!(accum_get(&opt), (0, 0));
    assert_eq!(workspace_bytes(&opt), workspace_bytes(&opt2));
    // NULL outputs.
    // SAFETY: NULL out pointers are refused before use.
    let s = unsafe { lomo_accum_get(opt.0, std::ptr::null_mut(), std::ptr::null_mut()) };
    assert_eq!(s as u32, 1);
}

#[test]
fn out_of_memory_at_enable_changes_nothing() {
    // Every allocation of lomo_accum_enable (the buffer list, then one buffer per parameter)
    // fails in turn: OUT_OF_MEMORY, no buffer, and a plain step still works.
    for k in 0..4 {
        let opt = lomo_opt(0.0, false, 1);
        let mut p = [Buf::new(F32, &[0.5; 6]), Buf::new(BF16, &[1.0; 3])];
        opt.register("a", p[0].ptr(), F32, &[2, 3], 0).unwrap();
        opt.register("b", p[1].ptr(), BF16, &[3], 0).unwrap();
        let ws = workspace_bytes(&opt);
        lomo::alloc::fail_after(Some(k));
        let r = enable(&opt, LOMO_ACCUM_F32, LOMO_ACCUM_SUM);
        lomo::alloc::fail_after(None);
        if k >= 3 {
            r.unwrap(); // 3 allocations in all
            assert_eq!(accum_get(&opt), (0, 36));
            continue;
        }
        assert_eq!(r.unwrap_err().status, 12, "allocation {k}");
        assert_eq!(accum_get(&opt), (0, 0));
        assert_eq!(workspace_bytes(&opt), ws);
        phase_error_of(opt.begin(ACCUMULATE, 0.0));
        let mut g = Buf::new(F32, &[1.0; 6]);
        opt.begin(UPDATE, 0.1).unwrap();
        opt.submit(0, g.ptr(), F32).unwrap();
        opt.end().unwrap();
        assert_eq!(opt.info().step, 1);
    }
}

fn phase_error_of(r: Result<(), Failure>) {
    assert_eq!(r.unwrap_err().status, 3);
}

#[test]
fn an_f16_buffer_that_overflows_overflows_the_step() {
    // Two micro-batches of 40000 sum to 80000: beyond f16 (65504) in a parameter-dtype buffer,
    // so the step reports an overflow and the tensor is left alone; an f32 buffer holds it.
    for (buffer, overflow) in [(LOMO_ACCUM_PARAM_DTYPE, 1), (LOMO_ACCUM_F32, 0)] {
        let opt = lomo_opt(0.0, false, 0);
        let mut p = Buf::new(F16, &[1.0, 2.0]);
        let id = opt.register("h", p.ptr(), F16, &[2], 0).unwrap();
        enable(&opt, buffer, LOMO_ACCUM_SUM).unwrap();
        let mut g = Buf::new(F16, &[40000.0, 0.5]);
        opt.begin(ACCUMULATE, 0.0).unwrap();
        opt.submit(id, g.ptr(), F16).unwrap();
        opt.end().unwrap();
        opt.begin(UPDATE, 1e-5).unwrap();
        opt.submit(id, g.ptr(), F16).unwrap();
        opt.end().unwrap();
        assert_eq!(opt.info().overflow, overflow, "buffer {buffer}");
        let want = if overflow == 1 {
            vec![1.0, 2.0]
        } else {
            // p - lr·(g1 + g2) in f32, rounded to f16 once
            vec![
                Buf::round(F16, (1.0f64 - 1e-5 * 80000.0) as f32),
                Buf::round(F16, (2.0f64 - 1e-5) as f32),
            ]
        };
        assert_eq!(p.values(), want, "buffer {buffer}");
    }
}
