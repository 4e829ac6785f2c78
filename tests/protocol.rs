//! The step protocol through the C API: loss-scaler sequences (overflow, back-off, grow-back,
//! hysteresis), non-finite gradients, misuse errors that leave the optimizer unchanged, and
//! concurrent submission equal to sequential submission.

mod common;

use common::*;
use lomo::Status;

const NORM: u32 = 0;
const UPDATE: u32 = 1;

fn dynamic_cfg(window: u32, hysteresis: u32) -> lomo::ffi::types::lomo_config {
    let mut cfg = config(0);
    cfg.loss_scale_mode = 2;
    cfg.loss_scale = 65536.0;
    cfg.scale_window = window;
    cfg.hysteresis = hysteresis;
    cfg
}

/// One UPDATE-only step with a gradient that is finite or not.
fn step(opt: &Opt, id: u32, finite: bool) -> lomo::ffi::types::lomo_step_info {
    // The gradient of a loss multiplied by the current scale.
    let mut g = vec![opt.loss_scale(); 4];
    if !finite {
        g[2] = f32::INFINITY;
    }
    opt.begin(UPDATE, 0.1).unwrap();
    opt.submit(id, g.as_mut_ptr().cast(), F32).unwrap();
    opt.end().unwrap();
    opt.info()
}

/// An independent model of the dynamic scaler (DeepSpeed's rule, semantics.md §4).
struct ModelScaler {
    scale: f64,
    hyst: u32,
    cur_hyst: u32,
    iter: i64,
    last_overflow: i64,
    window: i64,
}

impl ModelScaler {
    fn update(&mut self, overflow: bool) {
        if overflow {
            if self.hyst == 1 || self.cur_hyst == 1 {
                self.scale = (self.scale / 2.0).max(1.0);
            } else {
                self.cur_hyst -= 1;
            }
            self.last_overflow = self.iter;
        } else {
            let stable = self.iter - self.last_overflow - 1;
            if stable > 0 && stable % self.window == 0 {
                self.cur_hyst = self.hyst;
                self.scale *= 2.0;
            }
        }
        self.iter += 1;
    }
}

#[test]
fn dynamic_scaler_follows_the_deepspeed_rule() {
    for (window, hysteresis) in [(3u32, 1u32), (4, 2), (1, 3)] {
        let opt = Opt::new(&dynamic_cfg(window, hysteresis)).unwrap();
        let mut p = vec![0.5f32; 4];
        let id = opt
            .register("w", p.as_mut_ptr().cast(), F32, &[4], 0)
            .unwrap();
        let mut model = ModelScaler {
            scale: 65536.0,
            hyst: hysteresis,
            cur_hyst: hysteresis,
            iter: 0,
            last_overflow: -1,
            window: window as i64,
        };
        let mut rng = Rng::new(window as u64);
        for _ in 0..200 {
            let finite = rng.uniform() > -0.4;
            let before = p.clone();
            assert_eq!(opt.loss_scale() as f64, model.scale);
            let info = step(&opt, id, finite);
            model.update(!finite);
            assert_eq!(info.overflow, !finite as u32);
            assert_eq!(info.next_loss_scale as f64, model.scale);
            if !finite {
                assert_eq!(p, before, "a non-finite gradient must never be applied");
            } else {
                assert_ne!(p, before);
            }
        }
    }
}

#[test]
fn backs_off_to_the_floor_and_grows_back() {
    let opt = Opt::new(&dynamic_cfg(5, 1)).unwrap();
    let mut p = vec![0.5f32; 4];
    let id = opt
        .register("w", p.as_mut_ptr().cast(), F32, &[4], 0)
        .unwrap();
    for _ in 0..40 {
        step(&opt, id, false);
    }
    assert_eq!(
        opt.loss_scale(),
        1.0,
        "the scale floors at min_loss_scale and the run goes on"
    );
    for _ in 0..6 {
        step(&opt, id, true);
    }
    assert_eq!(
        opt.loss_scale(),
        2.0,
        "grows back after scale_window clean steps"
    );
}

#[test]
fn norm_phase_overflow_skips_the_whole_step() {
    let mut cfg = dynamic_cfg(1000, 1);
    cfg.clip_grad_norm = 1.0;
    let opt = Opt::new(&cfg).unwrap();
    let mut a = vec![0.5f32; 8];
    let mut b = vec![0.25f32; 3];
    let ia = opt
        .register("a", a.as_mut_ptr().cast(), F32, &[2, 4], 0)
        .unwrap();
    let ib = opt
        .register("b", b.as_mut_ptr().cast(), F32, &[3], 0)
        .unwrap();
    let mut ga = vec![1.0f32; 8];
    let mut gb = vec![f32::NAN, 1.0, 1.0];
    opt.begin(NORM, 0.0).unwrap();
    opt.submit(ia, ga.as_mut_ptr().cast(), F32).unwrap();
    opt.submit(ib, gb.as_mut_ptr().cast(), F32).unwrap();
    opt.end().unwrap();
    assert!(opt.info().grad_norm.is_nan());
    // The second backward produces finite gradients for both; still nothing may change.
    gb[0] = 1.0;
    opt.begin(UPDATE, 0.1).unwrap();
    opt.submit(ia, ga.as_mut_ptr().cast(), F32).unwrap();
    opt.submit(ib, gb.as_mut_ptr().cast(), F32).unwrap();
    opt.end().unwrap();
    let info = opt.info();
    assert_eq!(
        (info.skipped, info.overflow, info.skipped_total, info.step),
        (1, 1, 1, 0)
    );
    assert_eq!(a, vec![0.5f32; 8]);
    assert_eq!(b, vec![0.25f32; 3]);
    assert_eq!(opt.loss_scale(), 32768.0);
}

#[test]
fn adalomo_state_is_untouched_by_a_non_finite_gradient() {
    let opt = Opt::new(&config(1)).unwrap();
    let mut p: Vec<f32> = (0..12).map(|i| i as f32 * 0.1 - 0.5).collect();
    let id = opt
        .register("w", p.as_mut_ptr().cast(), F32, &[3, 4], 0)
        .unwrap();
    let mut twin = p.clone();
    let twin_opt = Opt::new(&config(1)).unwrap();
    let tid = twin_opt
        .register("w", twin.as_mut_ptr().cast(), F32, &[3, 4], 0)
        .unwrap();
    let mut bad = vec![1.0f32; 12];
    bad[11] = f32::NEG_INFINITY;
    opt.begin(UPDATE, 0.01).unwrap();
    opt.submit(id, bad.as_mut_ptr().cast(), F32).unwrap();
    opt.end().unwrap();
    assert_eq!(opt.info().grads_nonfinite, 1);
    // Later steps must equal those of an optimizer that never saw the bad gradient (its step
    // counter still advanced by one).
    twin_opt.begin(UPDATE, 0.01).unwrap();
    twin_opt.end().unwrap();
    for k in 0..3 {
        let mut g: Vec<f32> = (0..12)
            .map(|i| ((i * 7 + k) % 5) as f32 * 100.0 - 200.0)
            .collect();
        for (o, i) in [(&opt, id), (&twin_opt, tid)] {
            o.begin(UPDATE, 0.01).unwrap();
            o.submit(i, g.as_mut_ptr().cast(), F32).unwrap();
            o.end().unwrap();
        }
        assert_eq!(p, twin);
    }
}

#[test]
fn a_step_without_gradients_is_valid() {
    let mut cfg = config(1);
    cfg.clip_grad_norm = 1.0;
    let opt = Opt::new(&cfg).unwrap();
    let mut p = vec![1.0f32; 4];
    opt.register("w", p.as_mut_ptr().cast(), F32, &[4], 0)
        .unwrap();
    opt.begin(NORM, 0.0).unwrap();
    opt.end().unwrap();
    assert_eq!(opt.info().grad_norm, 0.0);
    opt.begin(UPDATE, 0.1).unwrap();
    opt.end().unwrap();
    let info = opt.info();
    assert_eq!((info.step, info.overflow, info.grads_submitted), (1, 0, 0));
    assert_eq!(p, vec![1.0f32; 4]);
}

/// Every misuse returns its status, leaves a message, and changes nothing.
#[test]
fn misuse_returns_its_status_and_changes_nothing() {
    let mut cfg = config(1);
    cfg.clip_grad_norm = 1.0;
    let opt = Opt::new(&cfg).unwrap();
    let mut p = vec![0.3f32; 6];
    let id = opt
        .register("w", p.as_mut_ptr().cast(), F32, &[2, 3], 0)
        .unwrap();
    let mut g = vec![0.1f32; 6];
    let snapshot = |opt: &Opt| format!("{:?} {}", opt.info(), opt.loss_scale());
    let expect = |r: Result<(), Failure>, status: Status, needle: &str| {
        let f = r.expect_err("misuse must fail");
        assert_eq!(f.status, status as u32, "{}", f.message);
        assert!(
            f.message.contains(needle),
            "message {:?} should mention {needle:?}",
            f.message
        );
    };
    let before = snapshot(&opt);
    expect(opt.begin(UPDATE, 0.1), Status::PhaseError, "NORM phase");
    expect(
        opt.submit(id, g.as_mut_ptr().cast(), F32),
        Status::PhaseError,
        "no phase",
    );
    expect(opt.end(), Status::PhaseError, "no phase");
    expect(opt.begin(7, 0.1), Status::InvalidArgument, "phase");
    assert_eq!(snapshot(&opt), before);
    assert_eq!(p, vec![0.3f32; 6]);

    opt.begin(NORM, 0.0).unwrap();
    expect(opt.begin(NORM, 0.0), Status::PhaseError, "already active");
    expect(
        opt.submit(99, g.as_mut_ptr().cast(), F32),
        Status::UnknownParam,
        "99",
    );
    expect(
        opt.submit(id, g.as_mut_ptr().cast(), 9),
        Status::InvalidArgument,
        "dtype",
    );
    expect(
        opt.submit(id, std::ptr::null(), F32),
        Status::NullArgument,
        "NULL",
    );
    let misaligned = unsafe { (g.as_mut_ptr() as *mut u8).add(1) };
    expect(
        opt.submit(id, misaligned.cast(), F32),
        Status::InvalidArgument,
        "aligned",
    );
    opt.submit(id, g.as_mut_ptr().cast(), F32).unwrap();
    expect(
        opt.submit(id, g.as_mut_ptr().cast(), F32),
        Status::DuplicateGradient,
        "already submitted",
    );
    let mut q = vec![0f32; 2];
    expect(
        opt.register("late", q.as_mut_ptr().cast(), F32, &[2], 0)
            .map(|_| ()),
        Status::PhaseError,
        "between steps",
    );
    opt.end().unwrap();
    let norm = opt.info().grad_norm;
    let want = (6.0f32 * 0.01).sqrt() / 1024.0; // AdaLomo's default static loss scale
    assert!(
        (norm - want).abs() < 1e-9,
        "duplicate submissions must not count twice: {norm} vs {want}"
    );
    expect(opt.begin(NORM, 0.0), Status::PhaseError, "UPDATE");
    expect(opt.begin(UPDATE, f32::NAN), Status::InvalidArgument, "lr");
    opt.begin(UPDATE, 0.1).unwrap();
    opt.submit(id, g.as_mut_ptr().cast(), F32).unwrap();
    expect(
        opt.submit(id, g.as_mut_ptr().cast(), F32),
        Status::DuplicateGradient,
        "already submitted",
    );
    opt.end().unwrap();
    assert_eq!(opt.info().step, 1);

    // Registration errors.
    let mut r = vec![0f32; 4];
    let bad = |name: &str, shape: &[i64], dtype: u32, group: u32, data: *mut std::ffi::c_void| {
        opt.register(name, data, dtype, shape, group).map(|_| ())
    };
    expect(
        bad("w", &[4], F32, 0, r.as_mut_ptr().cast()),
        Status::InvalidArgument,
        "already registered",
    );
    expect(
        bad("", &[4], F32, 0, r.as_mut_ptr().cast()),
        Status::InvalidArgument,
        "empty",
    );
    expect(
        bad("x", &[-4], F32, 0, r.as_mut_ptr().cast()),
        Status::InvalidArgument,
        "negative",
    );
    expect(
        bad("x", &[4], 5, 0, r.as_mut_ptr().cast()),
        Status::InvalidArgument,
        "dtype",
    );
    expect(
        bad("x", &[4], F32, 3, r.as_mut_ptr().cast()),
        Status::InvalidArgument,
        "group 3",
    );
    expect(
        bad("x", &[4], F32, 0, std::ptr::null_mut()),
        Status::NullArgument,
        "NULL",
    );
    expect(
        bad("x", &[i64::MAX, 4], F32, 0, r.as_mut_ptr().cast()),
        Status::InvalidArgument,
        "overflows",
    );
    let mut count = 0u32;
    // SAFETY: live handle and valid out pointer.
    check(unsafe { lomo::ffi::optimizer::lomo_param_count(opt.0, &mut count) }).unwrap();
    assert_eq!(count, 1, "failed registrations add nothing");
}

#[test]
fn config_and_struct_size_errors() {
    let mut cfg = config(1);
    cfg.decay_rate = 0.3;
    let e = Opt::new(&cfg).err().unwrap();
    assert_eq!(e.status, Status::InvalidArgument as u32);
    assert!(e.message.contains("decay_rate"));
    let mut cfg = config(0);
    // Neither the current size nor the one before `nonfinite_policy` (accepted: see
    // tests/nonfinite_policy.rs).
    cfg.struct_size -= 4;
    let e = Opt::new(&cfg).err().unwrap();
    assert!(e.message.contains("struct_size"));
    let mut cfg = config(0);
    cfg.algorithm = 4;
    assert_eq!(
        Opt::new(&cfg).err().unwrap().status,
        Status::InvalidArgument as u32
    );
    let mut out = std::ptr::null_mut();
    // SAFETY: NULL config is the error under test.
    let st = unsafe { lomo::ffi::optimizer::lomo_optimizer_new(std::ptr::null(), &mut out) };
    assert_eq!(st, Status::NullArgument);
    assert!(out.is_null());
}

#[test]
fn groups_scale_lr_and_skip_decay() {
    let mut cfg = config(0);
    cfg.weight_decay = 0.5;
    let opt = Opt::new(&cfg).unwrap();
    opt.group_set(1, 2.0, 0.0).unwrap();
    let mut w = vec![1.0f32; 2];
    let mut b = vec![1.0f32; 2];
    let iw = opt
        .register("w", w.as_mut_ptr().cast(), F32, &[2], 0)
        .unwrap();
    let ib = opt
        .register("b", b.as_mut_ptr().cast(), F32, &[2], 1)
        .unwrap();
    let mut g = vec![1.0f32; 2];
    opt.begin(UPDATE, 0.1).unwrap();
    opt.submit(iw, g.as_mut_ptr().cast(), F32).unwrap();
    opt.submit(ib, g.as_mut_ptr().cast(), F32).unwrap();
    opt.end().unwrap();
    // p ← fma(g, −lr, p·(1 − lr·wd)) with lr = f32 0.1 times the group multiplier.
    let lr = 0.1f32 as f64;
    assert_eq!(w[0], 1.0f32.mul_add(-(lr as f32), (1.0 - lr * 0.5) as f32));
    assert_eq!(b[0], 1.0f32.mul_add(-((lr * 2.0) as f32), 1.0));
    let e = opt.group_set(2, -1.0, 0.0).unwrap_err();
    assert_eq!(e.status, Status::InvalidArgument as u32);
}

#[test]
fn concurrent_submission_equals_sequential() {
    for algorithm in [0u32, 1] {
        let shapes: Vec<Vec<i64>> = (0..24)
            .map(|k| {
                if k % 3 == 0 {
                    vec![(k + 1) * 5]
                } else {
                    vec![k + 2, 300]
                }
            })
            .collect();
        let mut cfg = config(algorithm);
        cfg.clip_grad_norm = 0.7;
        cfg.rounding = 1;
        cfg.seed = 11;
        let run = |threads: usize| -> Vec<Vec<u16>> {
            let opt = Opt::new(&cfg).unwrap();
            let mut rng = Rng::new(5);
            let mut params: Vec<Vec<u16>> = Vec::new();
            let mut grads: Vec<Vec<u16>> = Vec::new();
            for s in &shapes {
                let n: usize = s.iter().product::<i64>() as usize;
                params.push(rng.vec(n, 0.5).iter().map(|&v| bf16(v)).collect());
                grads.push(rng.vec(n, 1.0).iter().map(|&v| bf16(v)).collect());
            }
            let ids: Vec<u32> = params
                .iter_mut()
                .zip(&shapes)
                .enumerate()
                .map(|(k, (p, s))| {
                    opt.register(&format!("p{k}"), p.as_mut_ptr().cast(), BF16, s, 0)
                        .unwrap()
                })
                .collect();
            for phase in [NORM, UPDATE] {
                opt.begin(phase, 0.01).unwrap();
                let next = std::sync::atomic::AtomicUsize::new(0);
                std::thread::scope(|s| {
                    for _ in 0..threads {
                        s.spawn(|| loop {
                            let k = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            if k >= ids.len() {
                                break;
                            }
                            let k = ids.len() - 1 - k;
                            opt.submit(ids[k], grads[k].as_ptr().cast(), BF16).unwrap();
                        });
                    }
                });
                opt.end().unwrap();
            }
            params
        };
        assert_eq!(run(1), run(6), "algorithm {algorithm}");
    }
}
