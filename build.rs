//! Builds the host emulation of the CUDA kernels: kernels/emu/launcher.cpp includes every
//! kernels/*.cu with LOMO_EMU defined, so the exact kernel sources run on CPU threads behind
//! `src/backend/cuda/emu.rs`. Needs only a C++20 compiler (no CUDA).

fn main() {
    let files = [
        "kernels/common.cuh",
        "kernels/norm.cu",
        "kernels/lomo.cu",
        "kernels/adalomo.cu",
        "kernels/step.cu",
        "kernels/xla.cu",
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
