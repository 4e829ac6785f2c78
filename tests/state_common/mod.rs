//! Shared by the checkpoint tests (`state_resume.rs`, `state_damage.rs`): the state calls of
//! the C API and a deterministic trainer whose runs can be compared bit for bit.
#![allow(dead_code)]

use std::ffi::CString;

use super::common::*;
use lomo::ffi::state::*;
use lomo::ffi::types::{lomo_config, LOMO_DEVICE_CPU};
use lomo::Status;

pub const NORM: u32 = 0;
pub const UPDATE: u32 = 1;
pub const LOMO: u32 = 0;
pub const ADALOMO: u32 = 1;

// ---------------------------------------------------------------- helpers over the C API

pub fn state_bytes(opt: &Opt) -> Vec<u8> {
    let mut size = 0usize;
    // SAFETY: live handle, valid out pointer.
    check(unsafe { lomo_state_size(opt.0, &mut size) }).unwrap();
    let mut buf = vec![0u8; size];
    let mut written = 0usize;
    // SAFETY: `buf` holds `size` writable bytes.
    check(unsafe { lomo_state_serialize(opt.0, buf.as_mut_ptr(), buf.len(), &mut written) })
        .unwrap();
    assert_eq!(written, size, "lomo_state_size is exact");
    buf
}

pub fn load_bytes(opt: &Opt, bytes: &[u8]) -> Result<(), Failure> {
    // SAFETY: live handle; `bytes` is readable for its length (a dangling-but-non-NULL pointer
    // for an empty slice is fine: nothing is read).
    check(unsafe { lomo_state_deserialize(opt.0, bytes.as_ptr(), bytes.len()) })
}

pub fn save(opt: &Opt, path: &std::path::Path) -> Result<(), Failure> {
    let p = CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: live handle, NUL-terminated path.
    check(unsafe { lomo_state_save(opt.0, p.as_ptr()) })
}

pub fn load(opt: &Opt, path: &std::path::Path) -> Result<(), Failure> {
    let p = CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: live handle, NUL-terminated path.
    check(unsafe { lomo_state_load(opt.0, p.as_ptr()) })
}

/// A fresh directory of its own: tests run in parallel threads of one process, so the name
/// carries a per-call counter besides the process id.
pub fn tmpdir(tag: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("lomo_state_{tag}_{}_{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

// ---------------------------------------------------------------- a deterministic trainer

/// One parameter: name, shape, parameter dtype, gradient dtype, group, flags.
#[derive(Clone)]
pub struct Spec {
    pub name: &'static str,
    pub shape: Vec<i64>,
    pub dtype: u32,
    pub grad_dtype: u32,
    pub group: u32,
    pub flags: u32,
}

pub fn spec(name: &'static str, shape: &[i64], dtype: u32, grad_dtype: u32) -> Spec {
    Spec {
        name,
        shape: shape.to_vec(),
        dtype,
        grad_dtype,
        group: 0,
        flags: 0,
    }
}

pub struct Case {
    pub algorithm: u32,
    pub cfg: lomo_config,
    pub specs: Vec<Spec>,
    /// Gradient magnitude: with f16 gradients and a large scale this overflows naturally.
    pub grad_mag: f32,
    /// Steps at which one element of one gradient is set to infinity.
    pub inf_steps: Vec<usize>,
}

/// The trainer's parameter buffers.
pub struct Model {
    pub bufs: Vec<Buf>,
}

impl Model {
    pub fn init(case: &Case) -> Model {
        let mut rng = Rng::new(7);
        let bufs = case
            .specs
            .iter()
            .map(|s| {
                let n = s.shape.iter().product::<i64>() as usize;
                Buf::new(s.dtype, &rng.vec(n, 0.5))
            })
            .collect();
        Model { bufs }
    }
    pub fn copy(&self) -> Model {
        Model {
            bufs: self
                .bufs
                .iter()
                .map(|b| Buf {
                    dtype: b.dtype,
                    f32s: b.f32s.clone(),
                    halves: b.halves.clone(),
                })
                .collect(),
        }
    }
    pub fn bits(&self) -> Vec<Vec<u32>> {
        self.bufs
            .iter()
            .map(|b| {
                if b.dtype == F32 {
                    b.f32s.iter().map(|v| v.to_bits()).collect()
                } else {
                    b.halves.iter().map(|&v| v as u32).collect()
                }
            })
            .collect()
    }
}

/// An optimizer over `model` on the CPU, registering the parameters in `order`.
pub fn optimizer(
    case: &Case,
    cfg: &lomo_config,
    model: &mut Model,
    order: &[usize],
) -> (Opt, Vec<u32>) {
    optimizer_on(case, cfg, model, order, LOMO_DEVICE_CPU)
}

/// [`optimizer`] with the parameters registered on `device` (a CUDA ordinal under
/// `LOMO_CUDA_EMULATE=1`, where host memory stands in for device memory).
pub fn optimizer_on(
    case: &Case,
    cfg: &lomo_config,
    model: &mut Model,
    order: &[usize],
    device: i32,
) -> (Opt, Vec<u32>) {
    let opt = Opt::new(cfg).unwrap();
    opt.group_set(1, 0.5, 0.0).unwrap();
    let mut ids = vec![0u32; case.specs.len()];
    for &i in order {
        let s = &case.specs[i];
        let ptr = model.bufs[i].ptr();
        ids[i] = opt
            .register_on(s.name, ptr, s.dtype, &s.shape, device, s.group, s.flags)
            .unwrap();
    }
    (opt, ids)
}

pub fn natural(case: &Case) -> Vec<usize> {
    (0..case.specs.len()).collect()
}

/// Gradients of ½‖p − target‖² plus step-dependent noise, times the loss scale.
pub fn grads(case: &Case, model: &Model, step: usize, scale: f32) -> Vec<Buf> {
    let mut rng = Rng::new(1000 + step as u64);
    case.specs
        .iter()
        .zip(&model.bufs)
        .enumerate()
        .map(|(k, (s, b))| {
            let mut g: Vec<f32> = b
                .values()
                .iter()
                .map(|&p| (p - 0.25 + 0.3 * rng.normal()) * case.grad_mag * scale)
                .collect();
            if case.inf_steps.contains(&step) && k == 0 && !g.is_empty() {
                g[0] = f32::INFINITY;
            }
            Buf::new(s.grad_dtype, &g)
        })
        .collect()
}

/// Trains steps `from..to`, submitting gradients in reverse (backward) order.
pub fn train(case: &Case, opt: &Opt, ids: &[u32], model: &Model, from: usize, to: usize) {
    let clip = case.cfg.clip_grad_norm > 0.0;
    for step in from..to {
        let lr = 0.05 * (1.0 - step as f32 / 40.0);
        let mut g = grads(case, model, step, opt.loss_scale());
        let phases: &[u32] = if clip { &[NORM, UPDATE] } else { &[UPDATE] };
        for &phase in phases {
            opt.begin(phase, lr).unwrap();
            for k in (0..g.len()).rev() {
                let ptr = g[k].ptr();
                opt.submit(ids[k], ptr, case.specs[k].grad_dtype).unwrap();
            }
            opt.end().unwrap();
        }
    }
}

pub const N: usize = 14;
pub const K: usize = 6;

/// N steps straight = K steps, checkpoint, new optimizer and loaded state, N − K steps.
pub fn check_resume(case: &Case, via_file: bool, state_matters: bool) {
    check_resume_on(case, via_file, state_matters, LOMO_DEVICE_CPU)
}

/// [`check_resume`] with every optimizer's parameters on `device`.
pub fn check_resume_on(case: &Case, via_file: bool, state_matters: bool, device: i32) {
    let optimizer = |case: &Case, cfg: &lomo_config, m: &mut Model, order: &[usize]| {
        optimizer_on(case, cfg, m, order, device)
    };
    let mut a = Model::init(case);
    let (opt_a, ids_a) = optimizer(case, &case.cfg, &mut a, &natural(case));
    train(case, &opt_a, &ids_a, &a, 0, N);

    let mut b = Model::init(case);
    let (opt_b, ids_b) = optimizer(case, &case.cfg, &mut b, &natural(case));
    train(case, &opt_b, &ids_b, &b, 0, K);
    if std::env::var_os("LOMO_TEST_VERBOSE").is_some() {
        eprintln!("scale at K: {} info {:?}", opt_b.loss_scale(), opt_b.info());
    }
    let ckpt = state_bytes(&opt_b);
    let mut c = b.copy();
    drop(opt_b);
    let mut fresh = c.copy();
    let (opt_c, ids_c) = optimizer(case, &case.cfg, &mut c, &natural(case));
    if via_file {
        let dir = tmpdir("resume");
        let path = dir.join("opt.safetensors");
        // Save from a second optimizer loaded from the bytes: the file must be the same bytes.
        load_bytes(&opt_c, &ckpt).unwrap();
        save(&opt_c, &path).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            ckpt,
            "save writes what serialize writes"
        );
        let (opt_c2, _) = optimizer(case, &case.cfg, &mut c.copy(), &natural(case));
        load(&opt_c2, &path).unwrap();
        assert_eq!(state_bytes(&opt_c2), ckpt);
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        load_bytes(&opt_c, &ckpt).unwrap();
    }
    assert_eq!(
        state_bytes(&opt_c),
        ckpt,
        "a loaded optimizer re-serializes to the same bytes"
    );
    assert_eq!(opt_c.info().step, K as u64 - opt_c.info().skipped_total);
    train(case, &opt_c, &ids_c, &c, K, N);

    assert!(
        a.bits() == c.bits(),
        "resumed parameters differ from the straight run"
    );
    assert_eq!(
        state_bytes(&opt_a),
        state_bytes(&opt_c),
        "resumed optimizer state differs"
    );
    let (ia, ic) = (opt_a.info(), opt_c.info());
    assert_eq!((ia.step, ia.skipped_total), (ic.step, ic.skipped_total));
    assert_eq!(opt_a.loss_scale().to_bits(), opt_c.loss_scale().to_bits());

    // Control: without the load the continuation differs, so the comparison above has teeth.
    let (opt_d, ids_d) = optimizer(case, &case.cfg, &mut fresh, &natural(case));
    train(case, &opt_d, &ids_d, &fresh, K, N);
    if state_matters {
        assert!(
            a.bits() != fresh.bits(),
            "control: a fresh optimizer should diverge"
        );
    }
}

pub fn dynamic(cfg: &mut lomo_config, window: u32, hysteresis: u32) {
    cfg.loss_scale_mode = 2;
    cfg.loss_scale = 65536.0;
    cfg.scale_window = window;
    cfg.hysteresis = hysteresis;
}

/// LOMO, f32 parameters, f16 gradients: at scale 65536 they overflow for real; the scaler backs
/// off (hysteresis 2), grows back after 3 clean steps, and overflows again.
pub fn lomo_dynamic_case() -> Case {
    let mut cfg = config(LOMO);
    dynamic(&mut cfg, 3, 2);
    cfg.weight_decay = 0.01;
    Case {
        algorithm: LOMO,
        cfg,
        specs: vec![
            spec("w", &[9, 7], F32, F16),
            spec("b", &[9], F32, F16),
            spec("s", &[], F32, F32),
        ],
        grad_mag: 1.5,
        inf_steps: vec![9],
    }
}

// ---------------------------------------------------------------- what must match

pub fn adalomo_case() -> Case {
    Case {
        algorithm: ADALOMO,
        cfg: config(ADALOMO),
        specs: vec![spec("w", &[6, 4], F32, F32), spec("b", &[6], F32, F32)],
        grad_mag: 1.0,
        inf_steps: vec![],
    }
}

/// A trained optimizer's checkpoint for `case`.
pub fn trained_checkpoint(case: &Case, steps: usize) -> Vec<u8> {
    let mut m = Model::init(case);
    let (opt, ids) = optimizer(case, &case.cfg, &mut m, &natural(case));
    train(case, &opt, &ids, &m, 0, steps);
    state_bytes(&opt)
}

/// Loading `ckpt` into an optimizer built from `case` fails with StateMismatch mentioning `what`
/// and leaves the optimizer unchanged.
pub fn refuses(case: &Case, ckpt: &[u8], what: &str) {
    refuses_on(case, ckpt, what, LOMO_DEVICE_CPU)
}

/// [`refuses`] with the loading optimizer's parameters on `device`.
pub fn refuses_on(case: &Case, ckpt: &[u8], what: &str, device: i32) {
    let mut m = Model::init(case);
    let (opt, ids) = optimizer_on(case, &case.cfg, &mut m, &natural(case), device);
    train(case, &opt, &ids, &m, 0, 2);
    let before = state_bytes(&opt);
    let err = load_bytes(&opt, ckpt).unwrap_err();
    assert_eq!(err.status, Status::StateMismatch as u32, "{err:?}");
    assert!(
        err.message.contains(what),
        "message {:?} should mention {what:?}",
        err.message
    );
    assert_eq!(
        state_bytes(&opt),
        before,
        "a failed load must leave the optimizer unchanged"
    );
}

// ---------------------------------------------------------------- damaged and foreign files

/// A small checkpoint (a few hundred bytes of tensors) and an optimizer whose state differs.
pub fn small_fixture() -> (Vec<u8>, Case) {
    let mut case = adalomo_case();
    case.cfg.loss_scale_mode = 2;
    (trained_checkpoint(&case, 4), case)
}

/// Loading into a used optimizer (on `device`): it has trained on other data, so it holds its
/// own state, counters and a carried Σp² (LOMO_PARAM_CARRY_RMS) that the load must discard.
pub fn check_used_load_on(device: i32) {
    let mut case = adalomo_case();
    case.cfg.loss_scale_mode = 2;
    case.specs[0].flags = 1;
    let opt_on = |m: &mut Model| optimizer_on(&case, &case.cfg, m, &natural(&case), device);
    let mut a = Model::init(&case);
    let (opt_a, ids_a) = opt_on(&mut a);
    train(&case, &opt_a, &ids_a, &a, 0, 9);

    let mut b = Model::init(&case);
    let (opt_b, ids_b) = opt_on(&mut b);
    train(&case, &opt_b, &ids_b, &b, 0, 4);
    let ckpt = state_bytes(&opt_b);

    let mut x = Model::init(&case);
    let (opt_x, ids_x) = opt_on(&mut x);
    train(&case, &opt_x, &ids_x, &x, 20, 27);
    for (dst, src) in x.bufs.iter_mut().zip(&b.bufs) {
        dst.f32s.copy_from_slice(&src.f32s); // in place: the registered pointers stay valid
    }
    load_bytes(&opt_x, &ckpt).unwrap();
    train(&case, &opt_x, &ids_x, &x, 4, 9);
    assert!(a.bits() == x.bits());
    assert_eq!(state_bytes(&opt_a), state_bytes(&opt_x));
}
