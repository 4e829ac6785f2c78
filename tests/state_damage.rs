//! Optimizer-state checkpoints through the C API: truncated, corrupted and foreign files (never
//! a crash, optimizer unchanged), atomic saves and I/O errors, phase and argument checks, and
//! the file read back by an independent safetensors parser.

mod common;
mod state_common;

use common::*;
use lomo::ffi::state::*;
use lomo::Status;
use state_common::*;

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
        assert_eq!(
            err.status,
            Status::StateMismatch as u32,
            "prefix {len}: {err:?}"
        );
    }
    assert_eq!(state_bytes(&opt), before);
    assert_eq!(opt.loss_scale(), scale);
    assert_eq!(opt.info().step, 2);
    // And through a truncated file on disk.
    let dir = tmpdir("trunc");
    let path = dir.join("t.safetensors");
    std::fs::write(&path, &ckpt[..ckpt.len() - 3]).unwrap();
    assert_eq!(
        load(&opt, &path).unwrap_err().status,
        Status::StateMismatch as u32
    );
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
                assert_eq!(
                    state_bytes(&opt),
                    before,
                    "{t:?}: failed load changed the optimizer"
                );
            }
            Ok(()) => {
                // Only changes that do not alter the content (e.g. JSON padding) may load.
                accepted += 1;
                assert_eq!(
                    state_bytes(&opt),
                    ckpt,
                    "{t:?}: a corrupted file loaded other state"
                );
                load_bytes(&opt, &before).unwrap();
            }
        }
    }
    assert!(
        accepted < trials.len() / 50,
        "{accepted} of {} damaged files loaded",
        trials.len()
    );
}

#[test]
fn foreign_and_future_files_are_refused_clearly() {
    let case = adalomo_case();
    // A model checkpoint, not optimizer state (written by the safetensors crate itself).
    let data = [0u8; 16];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4], &data).unwrap();
    let model = safetensors::serialize([("w", view)], &None).unwrap();
    refuses(&case, &model, "not a lomo optimizer-state checkpoint");
    refuses(
        &case,
        b"garbage that is not a safetensors file at all",
        "corrupted",
    );
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
            assert!(
                v > 0.0 && v.is_finite(),
                "second moments are positive after 3 steps"
            );
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
    assert!(safetensors::SafeTensors::deserialize(&st_bytes)
        .unwrap()
        .is_empty());
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
    assert_eq!(
        std::fs::read(&path).unwrap(),
        state_bytes(&opt),
        "replaced in place"
    );
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
    let g = [0.5f32; 24];
    opt.submit(ids[0], g.as_ptr().cast(), F32).unwrap();
    assert_eq!(
        load_bytes(&opt, &ckpt).unwrap_err().status,
        Status::PhaseError as u32
    );
    // SAFETY: live handle, valid out pointer.
    let st = unsafe { lomo_state_size(opt.0, &mut size) };
    assert_eq!(st, Status::PhaseError);
    opt.end().unwrap();

    // SAFETY: NULL handles and buffers are rejected before anything is read.
    unsafe {
        assert_eq!(
            lomo_state_size(std::ptr::null(), &mut size),
            Status::NullArgument
        );
        assert_eq!(
            lomo_state_size(opt.0, std::ptr::null_mut()),
            Status::NullArgument
        );
        assert_eq!(
            lomo_state_deserialize(opt.0, std::ptr::null(), 4),
            Status::NullArgument
        );
        assert_eq!(
            lomo_state_save(opt.0, std::ptr::null()),
            Status::NullArgument
        );
        assert_eq!(
            lomo_state_load(std::ptr::null_mut(), c"x".as_ptr()),
            Status::NullArgument
        );
    }
    let need = state_bytes(&opt).len();
    let mut small = vec![0xAAu8; need - 1];
    let mut written = 7usize;
    // SAFETY: `small` holds need - 1 writable bytes.
    let st = unsafe { lomo_state_serialize(opt.0, small.as_mut_ptr(), small.len(), &mut written) };
    assert_eq!(st, Status::InvalidArgument);
    assert!(last_error().contains("too small"));
    assert!(
        small.iter().all(|&b| b == 0xAA) && written == 7,
        "nothing written on failure"
    );
}
