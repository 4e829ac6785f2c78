//! Builds the C99 and C++17 programs in tests/c (smoke.c, accum_strides_batch.c, smoke.cc) and the C examples examples/c/dist_threads.c
//! and dist_mpi.c (with MPI's mpicc, when installed) against include/lomo.h and the freshly
//! built liblomo.so with -Wall -Wextra -Werror, and runs them.

mod native_lib;

use std::path::Path;
use std::process::Command;

use native_lib::lib_dir;

fn build_and_run(compiler: &str, std: &str, src: &str, extra: &[&str]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = lib_dir();
    // One executable per program and process (the tests run in parallel).
    let stem = Path::new(src).file_stem().unwrap().to_string_lossy();
    let out = std::env::temp_dir().join(format!("lomo_{stem}_{std}_{}", std::process::id()));
    let status = Command::new(compiler)
        .arg(format!("-std={std}"))
        .args(["-Wall", "-Wextra", "-Werror"])
        .args(extra)
        .arg("-I")
        .arg(root.join("include"))
        .arg(root.join(src))
        .arg("-o")
        .arg(&out)
        .arg("-L")
        .arg(&lib)
        .arg("-llomo")
        .arg("-lm")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .status()
        .unwrap_or_else(|e| panic!("running {compiler}: {e}"));
    assert!(status.success(), "{compiler} failed on {src}");
    // Cargo's LD_LIBRARY_PATH may name target/<profile>, whose liblomo.so can be stale: use ours.
    let run = Command::new(&out)
        .env("LD_LIBRARY_PATH", &lib)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&out);
    assert!(
        run.status.success(),
        "{src} failed:\n{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
}

#[test]
fn c99_program() {
    build_and_run("cc", "c99", "tests/c/smoke.c", &["-Wpedantic"]);
}

/// Accumulation, strided layouts and batched submission against values computed by hand and an
/// independent double-precision AdaLomo; every misuse a status (the program checks and fails).
#[test]
fn c99_accumulation_strides_batch_program() {
    build_and_run(
        "cc",
        "c99",
        "tests/c/accum_strides_batch.c",
        &["-Wpedantic"],
    );
}

#[test]
fn cxx17_program() {
    build_and_run("c++", "c++17", "tests/c/smoke.cc", &[]);
}

/// Threads as ranks through the C API's communicator callbacks: AdaLomo with norm clipping on
/// row pieces (1-4 ranks, one empty piece) and a replicated bias must equal one rank (the
/// program checks it and fails otherwise).
#[test]
fn c_example_dist_threads() {
    build_and_run(
        "cc",
        "c99",
        "examples/c/dist_threads.c",
        &["-Wpedantic", "-pthread"],
    );
}

/// The same through MPI, 1 to 4 processes under mpiexec (rank 0 compares with one rank). Needs
/// mpicc and mpiexec (Debian: mpich, libmpich-dev; scripts/test.sh installs them): without them
/// the test says so and passes, unless LOMO_REQUIRE_MPI=1.
#[test]
fn c_example_dist_mpi() {
    let have = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !have("mpicc") || !have("mpiexec") {
        assert!(
            std::env::var("LOMO_REQUIRE_MPI").is_err(),
            "LOMO_REQUIRE_MPI is set but mpicc or mpiexec is missing"
        );
        eprintln!("mpicc or mpiexec not found: examples/c/dist_mpi.c not run");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = lib_dir();
    let out = std::env::temp_dir().join(format!("lomo_dist_mpi_{}", std::process::id()));
    let status = Command::new("mpicc")
        .args([
            "-std=c99",
            "-Wall",
            "-Wextra",
            "-Wpedantic",
            "-Werror",
            "-I",
        ])
        .arg(root.join("include"))
        .arg(root.join("examples/c/dist_mpi.c"))
        .arg("-o")
        .arg(&out)
        .arg("-L")
        .arg(&lib)
        .args(["-llomo", "-lm"])
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .status()
        .unwrap();
    assert!(status.success(), "mpicc failed on examples/c/dist_mpi.c");
    for n in 1..=4 {
        let run = Command::new("mpiexec")
            .args(["-n", &n.to_string()])
            .arg(&out)
            .env("LD_LIBRARY_PATH", &lib)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        );
        assert!(
            run.status.success() && text.contains("dist_mpi ok"),
            "mpiexec -n {n} dist_mpi failed:\n{text}"
        );
    }
    let _ = std::fs::remove_file(&out);
}
