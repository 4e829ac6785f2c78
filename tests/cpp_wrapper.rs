//! Builds tests/cpp/wrapper.cc against include/lomo.hpp and the freshly built liblomo.so with
//! `c++ -std=c++17 -Wall -Wextra -Werror -Wpedantic -Wshadow -Wconversion`, and runs it.

mod native_lib;

use std::path::Path;
use std::process::Command;

#[test]
fn cpp_wrapper_program() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = native_lib::lib_dir();
    let dir = std::env::temp_dir().join(format!("lomo_cpp_wrapper_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("wrapper");
    let status = Command::new("c++")
        .args([
            "-std=c++17",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-Wpedantic",
            "-Wshadow",
        ])
        .arg("-Wconversion")
        .arg("-I")
        .arg(root.join("include"))
        .arg(root.join("tests/cpp/wrapper.cc"))
        .arg("-o")
        .arg(&exe)
        .arg("-L")
        .arg(&lib)
        .arg("-llomo")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .status()
        .expect("running c++");
    assert!(status.success(), "c++ failed on tests/cpp/wrapper.cc");
    // Cargo's LD_LIBRARY_PATH may name target/<profile>, whose liblomo.so can be stale: use ours.
    let run = Command::new(&exe)
        .current_dir(&dir)
        .env("LD_LIBRARY_PATH", &lib)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        run.status.success(),
        "wrapper.cc failed:\n{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
}
