//! Build script.
//!
//! - The shared library's SONAME (Linux): `liblomo.so.<major>` (`liblomo.so.0.<minor>` while
//!   the version is 0.x, where a minor version may change the ABI), the name `scripts/install.sh`
//!   gives the installed file's link.
//! - With the `cuda-emulation` feature (tests only): the host emulation of the CUDA kernels.
//!   kernels/emu/launcher.cpp includes every kernels/*.cu with LOMO_EMU defined, so the exact
//!   kernel sources run on CPU threads behind `src/backend/cuda/emu.rs`. Needs only a C++20
//!   compiler (no CUDA). The release library does not contain it (no C++ runtime in liblomo).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if target_os == "linux" {
        let major = std::env::var("CARGO_PKG_VERSION_MAJOR").unwrap_or_default();
        let minor = std::env::var("CARGO_PKG_VERSION_MINOR").unwrap_or_default();
        let soname = if major == "0" {
            format!("liblomo.so.0.{minor}")
        } else {
            format!("liblomo.so.{major}")
        };
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,{soname}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA_EMULATION").is_some() {
        build_emulation();
    }
}

fn build_emulation() {
    let files = [
        "kernels/common.cuh",
        "kernels/norm.cu",
        "kernels/lomo.cu",
        "kernels/adalomo.cu",
        "kernels/adalomo_finalize.cu",
        "kernels/step.cu",
        "kernels/xla.cu",
        "kernels/accum.cu",
        "kernels/emu/cuda_emu.hpp",
        "kernels/emu/registry.hpp",
        "kernels/emu/launcher.cpp",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    cc::Build::new()
        .cpp(true)
        .file("kernels/emu/launcher.cpp")
        .define("LOMO_EMU", None)
        .std("c++20")
        // The kernels rely on IEEE single rounding of every operation, as under --fmad=false.
        .flag("-ffp-contract=off")
        .flag("-pthread")
        // `#pragma unroll` is NVRTC's; the host compiler unrolls on its own.
        .flag_if_supported("-Wno-unknown-pragmas")
        .opt_level(2)
        .warnings(true)
        .compile("lomo_cuda_emu");
    println!("cargo:rustc-link-lib=pthread");
}
