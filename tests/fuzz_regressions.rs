//! The fuzz harnesses on stable (issue 14, item 2): replays every committed seed and every input
//! the fuzzers ever found failing (`fuzz/regressions/<target>/`, one file per finding, kept
//! after the fix) through the same harness code the libFuzzer targets run (`fuzz/harness/`),
//! with the same invariants. `scripts/fuzz.sh SECONDS` runs the fuzzers themselves (nightly).

mod common;
#[path = "../fuzz/harness/mod.rs"]
mod harness;

use std::path::Path;

/// Every file in `fuzz/<dir>/<target>/` whose name starts with `prefix`.
fn inputs(dir: &str, target: &str, prefix: &str) -> Vec<(String, Vec<u8>)> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(dir)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&d) else {
        return Vec::new();
    };
    let mut out: Vec<(String, Vec<u8>)> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && !n.starts_with('.'))
        })
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect();
    out.sort();
    out
}

fn replay(target: &str, run: fn(&[u8])) -> usize {
    let mut all = inputs("corpus", target, "seed-");
    all.extend(inputs("regressions", target, ""));
    for (name, data) in &all {
        let r = std::panic::catch_unwind(|| run(data));
        assert!(r.is_ok(), "{name} fails again");
    }
    all.len()
}

#[test]
fn capi_regressions_and_seeds() {
    replay("capi", harness::capi::run);
    // Short runs of every op on both backends, whatever the committed files.
    for seed in 0..64u64 {
        let mut rng = harness::Rng(seed * 7919 + 1);
        let data: Vec<u8> = (0..600).map(|_| rng.next() as u8).collect();
        harness::capi::run(&data);
    }
    // The invariants were exercised, not vacuously true.
    use std::sync::atomic::Ordering::Relaxed;
    let updates = harness::capi::CHECKED_UPDATES.load(Relaxed);
    let failures = harness::capi::CHECKED_FAILURES.load(Relaxed);
    eprintln!("capi harness: {updates} checked updates, {failures} checked failures");
    assert!(
        updates >= 10 && failures >= 1000,
        "{updates} updates, {failures} failures"
    );
}

#[test]
fn state_regressions_and_seeds() {
    let n = replay("state", harness::state::run);
    assert!(
        n >= 8,
        "the valid checkpoints are committed as seeds ({n} found)"
    );
    for s in harness::state::seeds() {
        harness::state::run(&s);
    }
}

#[test]
fn xla_regressions_and_seeds() {
    replay("xla", harness::xla::run);
    for seed in 0..256u64 {
        let mut rng = harness::Rng(seed * 104_729 + 3);
        let data: Vec<u8> = (0..300).map(|_| rng.next() as u8).collect();
        harness::xla::run(&data);
    }
}

/// Writes the `state` target's seeds (valid checkpoints) into fuzz/corpus/state/:
/// `cargo test --release --test fuzz_regressions -- --ignored write_seeds`.
#[test]
#[ignore]
fn write_seeds() {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/state");
    std::fs::create_dir_all(&d).unwrap();
    for (i, s) in harness::state::seeds().iter().enumerate() {
        std::fs::write(d.join(format!("seed-{i:02}")), s).unwrap();
    }
}

/// Finding (review, reachable by the `capi` target's one-rank communicator): a
/// `lomo_grad_submit_batch` whose second entry's gradient all-reduce (`LOMO_GRAD_ALL_REDUCE`)
/// failed returned `LOMO_STATUS_COMM_ERROR` saying "nothing was changed by this call" after its
/// first entry (a plain parameter) had been updated. Entries with collectives now run first: the
/// first collective failing leaves the whole batch unapplied, and the step after a cancel equals
/// one that never failed; when a later collective fails, the message names the entries that
/// were applied and they count as submitted (a retry of the batch is refused, not applied twice).
#[test]
fn a_batch_whose_collective_fails_changes_nothing() {
    use common::comm::{add_comm, dist_set, shard_grad, Group};
    use common::*;
    use lomo::ffi::batch::lomo_grad_submit_batch;
    use lomo::ffi::dist::*;
    use lomo::Status;
    // p0 plain, p1 and p2 gradients all-reduced by the library (one rank).
    let run = |fail_from: Option<u64>| -> (Vec<Vec<f32>>, Vec<Result<(), Failure>>) {
        let opt = Opt::new(&config(0)).unwrap();
        let group = Group::new(1);
        let comm = add_comm(&opt, &group, 0);
        let mut p: Vec<Buf> = (0..3).map(|k| Buf::new(F32, &vec![1.0; 4 + k])).collect();
        let ids: Vec<u32> = (0..3)
            .map(|k| {
                opt.register(&format!("p{k}"), p[k].ptr(), F32, &[4 + k as i64], 0)
                    .unwrap()
            })
            .collect();
        for &id in &ids[1..] {
            let n = 4 + id as i64;
            let mode = (LOMO_GRAD_ALL_REDUCE, comm);
            shard_grad(&opt, id, LOMO_LAYOUT_FULL, &[n], 0, LOMO_COMM_NONE, mode, 0).unwrap();
        }
        dist_set(&opt, comm, 0).unwrap();
        let mut g: Vec<Buf> = (0..3).map(|k| Buf::new(F32, &vec![0.5; 4 + k])).collect();
        let ptrs: Vec<*const std::ffi::c_void> =
            g.iter_mut().map(|b| b.ptr().cast_const()).collect();
        let counts: Vec<u64> = (0..3).map(|k| 4 + k as u64).collect();
        let batch = |opt: &Opt| {
            // SAFETY: live handle, arrays of 3 entries, gradients of the registered sizes.
            check(unsafe {
                lomo_grad_submit_batch(
                    opt.0,
                    3,
                    ids.as_ptr(),
                    ptrs.as_ptr(),
                    [F32; 3].as_ptr(),
                    counts.as_ptr(),
                    std::ptr::null_mut(),
                )
            })
        };
        *group.fail_from.lock() = fail_from.map(|k| (k, -5));
        opt.begin(1, 0.5).unwrap();
        let first = batch(&opt);
        *group.fail_from.lock() = None;
        let retry = batch(&opt);
        opt.end().unwrap();
        (p.iter().map(|b| b.values()).collect(), vec![first, retry])
    };
    let (clean, r) = run(None);
    assert!(r[0].is_ok());
    assert_eq!(
        r[1].as_ref().unwrap_err().status,
        Status::DuplicateGradient as u32
    );
    // The first collective (p1's all-reduce) fails: nothing applied, the retry applies all.
    let (after, r) = run(Some(1));
    let e = r[0].as_ref().unwrap_err();
    assert_eq!(e.status, Status::CommError as u32, "{e:?}");
    assert!(!e.message.contains("were applied"), "{}", e.message);
    assert!(r[1].is_ok(), "{:?}", r[1]);
    assert_eq!(
        after, clean,
        "the retried batch equals one that never failed"
    );
    // The second collective (p2's) fails: p1 was applied, the message says so, p0 and p2 were
    // not; the retry is refused for p1 (submitted), so nothing is applied twice.
    let (after, r) = run(Some(2));
    let e = r[0].as_ref().unwrap_err();
    assert_eq!(e.status, Status::CommError as u32, "{e:?}");
    assert!(
        e.message
            .contains("1 other entries of the batch ran before it and were applied"),
        "{}",
        e.message
    );
    assert_eq!(
        r[1].as_ref().unwrap_err().status,
        Status::DuplicateGradient as u32
    );
    assert_eq!(after[0], vec![1.0; 4], "p0 (no collective) did not run");
    assert_eq!(after[1], clean[1], "p1 was applied once");
    assert_eq!(after[2], vec![1.0; 6], "p2 is unchanged");
}
