//! Optimizer-state checkpoints through the C API: bit-identical resume (LOMO and AdaLomo, f32
//! and bf16, factored and vector state, dynamic loss scaling with real overflows, stochastic
//! rounding, norm clipping), what must match and what may change, truncated and corrupted files
//! (never a crash, optimizer unchanged), atomic saves, and the file read by an independent
//! safetensors parser.

mod common;

use std::ffi::CString;

use common::*;
use lomo::ffi::state::*;
use lomo::ffi::types::lomo_config;
use lomo::Status;

const NORM: u32 = 0;
const UPDATE: u32 = 1;
const LOMO: u32 = 0;
const ADALOMO: u32 = 1;

// ---------------------------------------------------------------- helpers over the C API

fn state_bytes(opt: &Opt) -> Vec<u8> {
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

fn load_bytes(opt: &Opt, bytes: &[u8]) -> Result<(), Failure> {
    // SAFETY: live handle; `bytes` is readable for its length (a dangling-but-non-NULL pointer
    // for an empty slice is fine: nothing is read).
    check(unsafe { lomo_state_deserialize(opt.0, bytes.as_ptr(), bytes.len()) })
}

fn save(opt: &Opt, path: &std::path::Path) -> Result<(), Failure> {
    let p = CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: live handle, NUL-terminated path.
    check(unsafe { lomo_state_save(opt.0, p.as_ptr()) })
}

fn load(opt: &Opt, path: &std::path::Path) -> Result<(), Failure> {
    let p = CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: live handle, NUL-terminated path.
    check(unsafe { lomo_state_load(opt.0, p.as_ptr()) })
}

fn tmpdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("lomo_state_{tag}_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

// ---------------------------------------------------------------- a deterministic trainer

/// One parameter: name, shape, parameter dtype, gradient dtype, group, flags.
#[derive(Clone)]
struct Spec {
    name: &'static str,
    shape: Vec<i64>,
    dtype: u32,
    grad_dtype: u32,
    group: u32,
    flags: u32,
}

fn spec(name: &'static str, shape: &[i64], dtype: u32, grad_dtype: u32) -> Spec {
    Spec { name, shape: shape.to_vec(), dtype, grad_dtype, group: 0, flags: 0 }
}

struct Case {
    algorithm: u32,
    cfg: lomo_config,
    specs: Vec<Spec>,
    /// Gradient magnitude: with f16 gradients and a large scale this overflows naturally.
    grad_mag: f32,
    /// Steps at which one element of one gradient is set to infinity.
    inf_steps: Vec<usize>,
}

/// The trainer's parameter buffers.
struct Model {
    bufs: Vec<Buf>,
}

impl Model {
    fn init(case: &Case) -> Model {
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
    fn copy(&self) -> Model {
        Model {
            bufs: self
                .bufs
                .iter()
                .map(|b| Buf { dtype: b.dtype, f32s: b.f32s.clone(), halves: b.halves.clone() })
                .collect(),
        }
    }
    fn bits(&self) -> Vec<Vec<u32>> {
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

/// An optimizer over `model`, registering the parameters in `order`.
fn optimizer(case: &Case, cfg: &lomo_config, model: &mut Model, order: &[usize]) -> (Opt, Vec<u32>) {
    let opt = Opt::new(cfg).unwrap();
    opt.group_set(1, 0.5, 0.0).unwrap();
    let mut ids = vec![0u32; case.specs.len()];
    for &i in order {
        let s = &case.specs[i];
        let ptr = model.bufs[i].ptr();
        ids[i] = opt.register_flags(s.name, ptr, s.dtype, &s.shape, s.group, s.flags).unwrap();
    }
    (opt, ids)
}

fn natural(case: &Case) -> Vec<usize> {
    (0..case.specs.len()).collect()
}

/// Gradients of ½‖p − target‖² plus step-dependent noise, times the loss scale.
fn grads(case: &Case, model: &Model, step: usize, scale: f32) -> Vec<Buf> {
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
fn train(case: &Case, opt: &Opt, ids: &[u32], model: &Model, from: usize, to: usize) {
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

const N: usize = 14;
const K: usize = 6;

/// N steps straight = K steps, checkpoint, new optimizer and loaded state, N − K steps.
fn check_resume(case: &Case, via_file: bool, state_matters: bool) {
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
        std::fs::write(dir.join("unused"), b"").unwrap();
        // Save from a second optimizer loaded from the bytes: the file must be the same bytes.
        load_bytes(&opt_c, &ckpt).unwrap();
        save(&opt_c, &path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), ckpt, "save writes what serialize writes");
        let (opt_c2, _) = optimizer(case, &case.cfg, &mut c.copy(), &natural(case));
        load(&opt_c2, &path).unwrap();
        assert_eq!(state_bytes(&opt_c2), ckpt);
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        load_bytes(&opt_c, &ckpt).unwrap();
    }
    assert_eq!(state_bytes(&opt_c), ckpt, "a loaded optimizer re-serializes to the same bytes");
    assert_eq!(opt_c.info().step, K as u64 - opt_c.info().skipped_total);
    train(case, &opt_c, &ids_c, &c, K, N);

    assert!(a.bits() == c.bits(), "resumed parameters differ from the straight run");
    assert_eq!(state_bytes(&opt_a), state_bytes(&opt_c), "resumed optimizer state differs");
    let (ia, ic) = (opt_a.info(), opt_c.info());
    assert_eq!((ia.step, ia.skipped_total), (ic.step, ic.skipped_total));
    assert_eq!(opt_a.loss_scale().to_bits(), opt_c.loss_scale().to_bits());

    // Control: without the load the continuation differs, so the comparison above has teeth.
    let (opt_d, ids_d) = optimizer(case, &case.cfg, &mut fresh, &natural(case));
    train(case, &opt_d, &ids_d, &fresh, K, N);
    if state_matters {
        assert!(a.bits() != fresh.bits(), "control: a fresh optimizer should diverge");
    }
}

fn dynamic(cfg: &mut lomo_config, window: u32, hysteresis: u32) {
    cfg.loss_scale_mode = 2;
    cfg.loss_scale = 65536.0;
    cfg.scale_window = window;
    cfg.hysteresis = hysteresis;
}

/// LOMO, f32 parameters, f16 gradients: at scale 65536 they overflow for real; the scaler backs
/// off (hysteresis 2), grows back after 3 clean steps, and overflows again.
fn lomo_dynamic_case() -> Case {
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

#[test]
fn lomo_dynamic_scaling_resumes_bit_identically() {
    let case = lomo_dynamic_case();
    check_resume(&case, false, true);
    check_resume(&case, true, true);
}

#[test]
fn lomo_bf16_stochastic_rounding_with_clipping_resumes_bit_identically() {
    let mut cfg = config(LOMO);
    cfg.rounding = 1;
    cfg.seed = 42;
    cfg.clip_grad_norm = 0.5;
    cfg.clip_grad_value = 0.2;
    let mut b = spec("b", &[33], BF16, F32);
    b.group = 1;
    let case = Case {
        algorithm: LOMO,
        cfg,
        specs: vec![spec("w", &[300, 257], BF16, BF16), b],
        grad_mag: 1.0,
        inf_steps: vec![3],
    };
    check_resume(&case, true, true);
}

#[test]
fn adalomo_f32_factored_and_vector_resumes_bit_identically() {
    let cfg = config(ADALOMO);
    let case = Case {
        algorithm: ADALOMO,
        cfg,
        specs: vec![
            spec("w2", &[7, 5], F32, F32),
            spec("w3", &[3, 4, 6], F32, F32),
            spec("big", &[300, 257], F32, F32),
            spec("v", &[11], F32, F32),
            spec("s", &[], F32, F32),
            spec("empty", &[0, 4], F32, F32),
        ],
        grad_mag: 1.0,
        inf_steps: vec![4],
    };
    check_resume(&case, false, true);
    check_resume(&case, true, true);
}

#[test]
fn adalomo_bf16_dynamic_scaling_clipping_and_carried_rms_resumes_bit_identically() {
    let mut cfg = config(ADALOMO);
    dynamic(&mut cfg, 3, 2);
    cfg.clip_grad_norm = 1.0;
    cfg.weight_decay = 0.02;
    let mut w = spec("layer.0.weight", &[16, 12], BF16, F16);
    w.flags = 1; // LOMO_PARAM_CARRY_RMS: the carried Σp² must be recomputed after a load
    let mut bias = spec("layer.0.bias", &[16], BF16, F16);
    bias.group = 1;
    let case = Case {
        algorithm: ADALOMO,
        cfg,
        specs: vec![w, bias, spec("head", &[5, 2, 8], BF16, BF16)],
        grad_mag: 0.7,
        inf_steps: vec![],
    };
    check_resume(&case, false, true);
    check_resume(&case, true, true);
}

// ---------------------------------------------------------------- scaler state really restored

#[test]
fn dynamic_scaler_state_is_restored_and_options_come_from_the_new_config() {
    let case = lomo_dynamic_case();
    let mut m = Model::init(&case);
    let (opt, ids) = optimizer(&case, &case.cfg, &mut m, &natural(&case));
    train(&case, &opt, &ids, &m, 0, K);
    let scale = opt.loss_scale();
    assert_ne!(scale, 65536.0, "the case should have backed off by now");
    let ckpt = state_bytes(&opt);

    let mut m2 = m.copy();
    let (opt2, _) = optimizer(&case, &case.cfg, &mut m2, &natural(&case));
    load_bytes(&opt2, &ckpt).unwrap();
    assert_eq!(opt2.loss_scale(), scale);
    assert_eq!(opt2.info().skipped_total, opt.info().skipped_total);

    // A static-scale optimizer takes its scale from its own config.
    let mut cfg = case.cfg;
    cfg.loss_scale_mode = 1;
    cfg.loss_scale = 8.0;
    let (opt3, _) = optimizer(&case, &cfg, &mut m.copy(), &natural(&case));
    load_bytes(&opt3, &ckpt).unwrap();
    assert_eq!(opt3.loss_scale(), 8.0);
    assert_eq!(opt3.info().step, opt.info().step);

    // A higher min_loss_scale clamps the restored scale.
    let mut cfg = case.cfg;
    cfg.min_loss_scale = 60000.0;
    let (opt4, _) = optimizer(&case, &cfg, &mut m.copy(), &natural(&case));
    load_bytes(&opt4, &ckpt).unwrap();
    assert_eq!(opt4.loss_scale(), 60000.0);
}

// ---------------------------------------------------------------- what must match

fn adalomo_case() -> Case {
    Case {
        algorithm: ADALOMO,
        cfg: config(ADALOMO),
        specs: vec![spec("w", &[6, 4], F32, F32), spec("b", &[6], F32, F32)],
        grad_mag: 1.0,
        inf_steps: vec![],
    }
}

/// A trained optimizer's checkpoint for `case`.
fn trained_checkpoint(case: &Case, steps: usize) -> Vec<u8> {
    let mut m = Model::init(case);
    let (opt, ids) = optimizer(case, &case.cfg, &mut m, &natural(case));
    train(case, &opt, &ids, &m, 0, steps);
    state_bytes(&opt)
}

/// Loading `ckpt` into an optimizer built from `case` fails with StateMismatch mentioning `what`
/// and leaves the optimizer unchanged.
fn refuses(case: &Case, ckpt: &[u8], what: &str) {
    let mut m = Model::init(case);
    let (opt, ids) = optimizer(case, &case.cfg, &mut m, &natural(case));
    train(case, &opt, &ids, &m, 0, 2);
    let before = state_bytes(&opt);
    let err = load_bytes(&opt, ckpt).unwrap_err();
    assert_eq!(err.status, Status::StateMismatch as u32, "{err:?}");
    assert!(err.message.contains(what), "message {:?} should mention {what:?}", err.message);
    assert_eq!(state_bytes(&opt), before, "a failed load must leave the optimizer unchanged");
}

#[test]
fn mismatched_algorithm_names_shapes_and_state_defining_config_are_refused() {
    let base = adalomo_case();
    let ckpt = trained_checkpoint(&base, 3);

    let mut lomo = adalomo_case();
    lomo.algorithm = LOMO;
    lomo.cfg = config(LOMO);
    refuses(&lomo, &ckpt, "algorithm");
    refuses(&base, &trained_checkpoint(&lomo, 3), "algorithm");

    let mut renamed = adalomo_case();
    renamed.specs[1].name = "bias";
    refuses(&renamed, &ckpt, "'bias' is registered but not in the checkpoint");

    let mut missing = adalomo_case();
    missing.specs.pop();
    refuses(&missing, &ckpt, "'b' is in the checkpoint but not registered");

    let mut extra = adalomo_case();
    extra.specs.push(spec("c", &[2], F32, F32));
    refuses(&extra, &ckpt, "'c' is registered");

    let mut transposed = adalomo_case();
    transposed.specs[0].shape = vec![4, 6];
    refuses(&transposed, &ckpt, "shape");

    let mut eps1 = adalomo_case();
    eps1.cfg.eps1 = 1e-20;
    refuses(&eps1, &ckpt, "eps1");

    let mut decay = adalomo_case();
    decay.cfg.decay_rate = -0.5;
    refuses(&decay, &ckpt, "decay_rate");
}

#[test]
fn hyperparameters_dtypes_and_registration_order_may_change() {
    let case = adalomo_case();
    let ckpt = trained_checkpoint(&case, 3);
    let mut other = adalomo_case();
    other.cfg.weight_decay = 0.1;
    other.cfg.eps2 = 1e-4;
    other.cfg.clip_threshold = 2.0;
    other.cfg.clip_grad_norm = 1.0;
    other.cfg.loss_scale_mode = 2;
    other.cfg.rounding = 1;
    other.specs[0].dtype = BF16;
    other.specs[1].group = 1;
    let mut m = Model::init(&other);
    let (opt, _) = optimizer(&other, &other.cfg, &mut m, &[1, 0]);
    load_bytes(&opt, &ckpt).unwrap();
    assert_eq!(opt.info().step, 3);
}

#[test]
fn registration_order_does_not_matter_for_nearest_rounding() {
    let case = adalomo_case();
    let mut a = Model::init(&case);
    let (opt_a, ids_a) = optimizer(&case, &case.cfg, &mut a, &natural(&case));
    train(&case, &opt_a, &ids_a, &a, 0, 8);

    let mut b = Model::init(&case);
    let (opt_b, ids_b) = optimizer(&case, &case.cfg, &mut b, &natural(&case));
    train(&case, &opt_b, &ids_b, &b, 0, 3);
    let ckpt = state_bytes(&opt_b);
    let mut c = b.copy();
    let (opt_c, ids_c) = optimizer(&case, &case.cfg, &mut c, &[1, 0]);
    load_bytes(&opt_c, &ckpt).unwrap();
    train(&case, &opt_c, &ids_c, &c, 3, 8);
    assert!(a.bits() == c.bits());
}

// ---------------------------------------------------------------- damaged and foreign files

/// A small checkpoint (a few hundred bytes of tensors) and an optimizer whose state differs.
fn small_fixture() -> (Vec<u8>, Case) {
    let mut case = adalomo_case();
    case.cfg.loss_scale_mode = 2;
    (trained_checkpoint(&case, 4), case)
}

#[test]
fn every_truncation_is_an_error_and_leaves_the_optimizer_unchanged() {
    let (ckpt, case) = small_fixture();
    let mut m = Model::init(&case);
    let (opt, ids) = optimizer(&case, &case.cfg, &mut m, &natural(&case));
    train(&case, &opt, &ids, &m, 0, 2);
    let before = state_bytes(&opt);
    let scale = opt.loss_scale();
    for len in 0..ckpt.len() {
        let err = load_bytes(&opt, &ckpt[..len]).unwrap_err();
        assert_eq!(err.status, Status::StateMismatch as u32, "prefix {len}: {err:?}");
    }
    assert_eq!(state_bytes(&opt), before);
    assert_eq!(opt.loss_scale(), scale);
    assert_eq!(opt.info().step, 2);
    // And through a truncated file on disk.
    let dir = tmpdir("trunc");
    let path = dir.join("t.safetensors");
    std::fs::write(&path, &ckpt[..ckpt.len() - 3]).unwrap();
    assert_eq!(load(&opt, &path).unwrap_err().status, Status::StateMismatch as u32);
    let _ = std::fs::remove_dir_all(&dir);
    load_bytes(&opt, &ckpt).unwrap();
    assert_eq!(state_bytes(&opt), ckpt);
}

#[test]
fn corrupted_bytes_are_detected_or_harmless() {
    let (ckpt, case) = small_fixture();
    let mut m = Model::init(&case);
    let (opt, _) = optimizer(&case, &case.cfg, &mut m, &natural(&case));
    let before = state_bytes(&opt);
    let mut rng = Rng::new(99);
    let mut accepted = 0;
    // Every byte flipped once (random non-zero XOR), then random multi-byte damage.
    let mut trials: Vec<Vec<(usize, u8)>> = (0..ckpt.len())
        .map(|i| vec![(i, (rng.next_u64() % 255 + 1) as u8)])
        .collect();
    for _ in 0..2000 {
        let n = 1 + (rng.next_u64() % 4) as usize;
        trials.push(
            (0..n)
                .map(|_| {
                    let i = (rng.next_u64() % ckpt.len() as u64) as usize;
                    (i, (rng.next_u64() % 255 + 1) as u8)
                })
                .collect(),
        );
    }
    for t in &trials {
        let mut bad = ckpt.clone();
        for &(i, x) in t {
            bad[i] ^= x;
        }
        match load_bytes(&opt, &bad) {
            Err(e) => {
                assert_eq!(e.status, Status::StateMismatch as u32, "{t:?}: {e:?}");
                assert_eq!(state_bytes(&opt), before, "{t:?}: failed load changed the optimizer");
            }
            Ok(()) => {
                // Only changes that do not alter the content (e.g. JSON padding) may load.
                accepted += 1;
                assert_eq!(state_bytes(&opt), ckpt, "{t:?}: a corrupted file loaded other state");
                load_bytes(&opt, &before).unwrap();
            }
        }
    }
    assert!(accepted < trials.len() / 50, "{accepted} of {} damaged files loaded", trials.len());
}

#[test]
fn foreign_and_future_files_are_refused_clearly() {
    let case = adalomo_case();
    // A model checkpoint, not optimizer state (written by the safetensors crate itself).
    let data = [0u8; 16];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4], &data).unwrap();
    let model = safetensors::serialize([("w", view)], &None).unwrap();
    refuses(&case, &model, "not a lomo optimizer-state checkpoint");
    refuses(&case, b"garbage that is not a safetensors file at all", "corrupted");
    refuses(&case, &[], "corrupted");

    let ckpt = trained_checkpoint(&case, 1);
    let key = b"\"format_version\":\"1\"";
    let i = ckpt.windows(key.len()).position(|w| w == key).unwrap() + key.len() - 2;
    let mut future = ckpt.clone();
    future[i] = b'7';
    refuses(&case, &future, "format version 7");
}

// ---------------------------------------------------------------- the file itself

#[test]
fn an_independent_safetensors_parser_reads_the_state() {
    let case = adalomo_case();
    let ckpt = trained_checkpoint(&case, 3);
    let st = safetensors::SafeTensors::deserialize(&ckpt).unwrap();
    let mut names = st.names();
    names.sort();
    assert_eq!(names, ["b.v", "w.col", "w.row"]);
    assert_eq!(st.tensor("w.row").unwrap().shape(), [6]);
    assert_eq!(st.tensor("w.col").unwrap().shape(), [4]);
    assert_eq!(st.tensor("b.v").unwrap().shape(), [6]);
    for (_, t) in st.tensors() {
        assert_eq!(t.dtype(), safetensors::Dtype::F32);
        for b in t.data().chunks_exact(4) {
            let v = f32::from_le_bytes(b.try_into().unwrap());
            assert!(v > 0.0 && v.is_finite(), "second moments are positive after 3 steps");
        }
    }
    let (_, meta) = safetensors::SafeTensors::read_metadata(&ckpt).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["format"], "lomo.optimizer_state");
    assert_eq!(meta["algorithm"], "adalomo");
    assert_eq!(meta["steps"], "3");
    assert_eq!(meta["params"], r#"[["w",[6,4]],["b",[6]]]"#);
    assert_eq!(meta["config.decay_rate"], "-0.8");

    // LOMO: no tensors at all, only metadata.
    let mut lomo = adalomo_case();
    lomo.cfg = config(LOMO);
    let st_bytes = trained_checkpoint(&lomo, 2);
    assert!(safetensors::SafeTensors::deserialize(&st_bytes).unwrap().is_empty());
}

#[test]
fn save_is_atomic_and_io_errors_are_reported() {
    let case = adalomo_case();
    let mut m = Model::init(&case);
    let (opt, ids) = optimizer(&case, &case.cfg, &mut m, &natural(&case));
    let dir = tmpdir("atomic");
    let path = dir.join("opt.safetensors");
    save(&opt, &path).unwrap();
    train(&case, &opt, &ids, &m, 0, 2);
    save(&opt, &path).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), state_bytes(&opt), "replaced in place");
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "no temporary file is left behind");

    let err = save(&opt, &dir.join("no/such/dir/x.safetensors")).unwrap_err();
    assert_eq!(err.status, Status::IoError as u32);
    let err = load(&opt, &dir.join("missing.safetensors")).unwrap_err();
    assert_eq!(err.status, Status::IoError as u32);
    assert!(err.message.contains("missing.safetensors"), "{err:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn state_calls_check_phase_and_arguments() {
    let case = adalomo_case();
    let mut m = Model::init(&case);
    let (opt, ids) = optimizer(&case, &case.cfg, &mut m, &natural(&case));
    let ckpt = state_bytes(&opt);
    let mut size = 0usize;
    opt.begin(UPDATE, 0.1).unwrap();
    let g = vec![0.5f32; 24];
    opt.submit(ids[0], g.as_ptr().cast(), F32).unwrap();
    assert_eq!(load_bytes(&opt, &ckpt).unwrap_err().status, Status::PhaseError as u32);
    // SAFETY: live handle, valid out pointer.
    let st = unsafe { lomo_state_size(opt.0, &mut size) };
    assert_eq!(st, Status::PhaseError);
    opt.end().unwrap();

    // SAFETY: NULL handles and buffers are rejected before anything is read.
    unsafe {
        assert_eq!(lomo_state_size(std::ptr::null(), &mut size), Status::NullArgument);
        assert_eq!(lomo_state_size(opt.0, std::ptr::null_mut()), Status::NullArgument);
        assert_eq!(lomo_state_deserialize(opt.0, std::ptr::null(), 4), Status::NullArgument);
        assert_eq!(lomo_state_save(opt.0, std::ptr::null()), Status::NullArgument);
        assert_eq!(lomo_state_load(std::ptr::null_mut(), c"x".as_ptr()), Status::NullArgument);
    }
    let need = state_bytes(&opt).len();
    let mut small = vec![0xAAu8; need - 1];
    let mut written = 7usize;
    // SAFETY: `small` holds need - 1 writable bytes.
    let st = unsafe { lomo_state_serialize(opt.0, small.as_mut_ptr(), small.len(), &mut written) };
    assert_eq!(st, Status::InvalidArgument);
    assert!(last_error().contains("too small"));
    assert!(small.iter().all(|&b| b == 0xAA) && written == 7, "nothing written on failure");
}

#[test]
fn loading_into_a_used_optimizer_resumes_identically() {
    // The loading optimizer has trained on other data, so it holds its own state, counters and
    // a carried Σp² (LOMO_PARAM_CARRY_RMS) that the load must discard.
    let mut case = adalomo_case();
    case.cfg.loss_scale_mode = 2;
    case.specs[0].flags = 1;
    let mut a = Model::init(&case);
    let (opt_a, ids_a) = optimizer(&case, &case.cfg, &mut a, &natural(&case));
    train(&case, &opt_a, &ids_a, &a, 0, 9);

    let mut b = Model::init(&case);
    let (opt_b, ids_b) = optimizer(&case, &case.cfg, &mut b, &natural(&case));
    train(&case, &opt_b, &ids_b, &b, 0, 4);
    let ckpt = state_bytes(&opt_b);

    let mut x = Model::init(&case);
    let (opt_x, ids_x) = optimizer(&case, &case.cfg, &mut x, &natural(&case));
    train(&case, &opt_x, &ids_x, &x, 20, 27);
    for (dst, src) in x.bufs.iter_mut().zip(&b.bufs) {
        dst.f32s.copy_from_slice(&src.f32s); // in place: the registered pointers stay valid
    }
    load_bytes(&opt_x, &ckpt).unwrap();
    train(&case, &opt_x, &ids_x, &x, 4, 9);
    assert!(a.bits() == x.bits());
    assert_eq!(state_bytes(&opt_a), state_bytes(&opt_x));
}
