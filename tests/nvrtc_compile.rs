//! Every kernel module compiles with NVRTC for sm_80 and sm_90 (CUBIN), defines every kernel
//! the registry names (so every dtype pair), and no kernel spills registers. Prints registers
//! per kernel. Needs libnvrtc (scripts/test.sh installs the `nvidia-cuda-nvrtc-cu12` wheel and
//! sets LOMO_NVRTC_PATH); without it the test is skipped with a visible reason, unless
//! LOMO_REQUIRE_NVRTC=1 (set by scripts/test.sh) makes that a failure.
#![cfg(feature = "cuda")]

use lomo::backend::cuda::nvrtc;
use lomo::backend::cuda::registry::Module;

#[test]
fn every_kernel_compiles_without_spills() {
    if !nvrtc::available() {
        let msg =
            "SKIPPED nvrtc_compile: libnvrtc not found (set LOMO_NVRTC_PATH; scripts/test.sh does)";
        assert!(std::env::var_os("LOMO_REQUIRE_NVRTC").is_none(), "{msg}");
        eprintln!("{msg}");
        return;
    }
    let (major, minor) = nvrtc::version().unwrap();
    println!("NVRTC {major}.{minor}");
    let mut failures = Vec::new();
    for arch in ["sm_80", "sm_90"] {
        for module in Module::ALL {
            let compiled =
                nvrtc::compile(module, arch).unwrap_or_else(|e| panic!("{}", e.message()));
            assert!(
                compiled.cubin.starts_with(b"\x7fELF"),
                "{arch} {}: not an ELF cubin",
                module.file_name()
            );
            let usage = nvrtc::parse_usage(&compiled.log);
            let mut expected = module.kernels();
            expected.sort();
            let mut found: Vec<String> = usage.iter().map(|u| u.name.clone()).collect();
            found.sort();
            assert_eq!(
                found,
                expected,
                "{arch} {}: kernels in the ptxas report",
                module.file_name()
            );
            for u in &usage {
                println!(
                    "{arch} {:<28} {:>3} registers, spill {}/{} bytes",
                    u.name, u.registers, u.spill_stores, u.spill_loads
                );
                assert!(
                    u.registers > 0,
                    "{arch} {}: no register count parsed",
                    u.name
                );
                if u.spill_stores > 0 || u.spill_loads > 0 {
                    failures.push(format!(
                        "{arch} {}: spills {}/{} bytes",
                        u.name, u.spill_stores, u.spill_loads
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "register spills:\n{}",
        failures.join("\n")
    );
}

#[test]
fn on_disk_cache_returns_the_compiled_cubin() {
    if !nvrtc::available() {
        eprintln!("SKIPPED: libnvrtc not found");
        return;
    }
    let dir = std::env::temp_dir().join(format!("lomo-nvrtc-cache-{}", std::process::id()));
    std::env::set_var("LOMO_CACHE_DIR", &dir);
    let first = nvrtc::cubin_cached(Module::Step, "sm_80").unwrap();
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(files.len(), 1, "one cache file written");
    let second = nvrtc::cubin_cached(Module::Step, "sm_80").unwrap();
    assert_eq!(first, second);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn parses_the_ptxas_report() {
    let log = "ptxas info    : Compiling entry function 'k1' for 'sm_90'\n\
               ptxas info    : Function properties for k1\n\
               ptxas         .     8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
               ptxas info    : Used 32 registers, used 1 barriers, 144 bytes smem\n";
    let u = nvrtc::parse_usage(log);
    assert_eq!(u.len(), 1);
    assert_eq!(
        (
            u[0].name.as_str(),
            u[0].registers,
            u[0].spill_stores,
            u[0].spill_loads
        ),
        ("k1", 32, 4, 12)
    );
}
