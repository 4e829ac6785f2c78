//! The fuzz harnesses on stable (issue 14, item 2): replays every committed seed and every input
//! the fuzzers ever found failing (`fuzz/regressions/<target>/`, one file per finding, kept
//! after the fix) through the same harness code the libFuzzer targets run (`fuzz/harness/`),
//! with the same invariants. `scripts/fuzz.sh SECONDS` runs the fuzzers themselves (nightly).

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
