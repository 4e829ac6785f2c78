#!/usr/bin/env bash
# Sanitizer runs (issue 14): each step prints PASS or stops at the first report.
#   scripts/sanitize.sh [asan|ubsan|c|tsan|valgrind]...   (default: all five)
#
# asan      the Rust tests under AddressSanitizer (nightly -Zsanitizer=address; every test that
#           does not load liblomo.so into a separately built program), leak checking on.
# ubsan     the C++ kernels compiled for the host emulation with -fsanitize=undefined (every
#           emulated CUDA test), and the Rust code with the standard library's UB checks
#           (-Zub-checks: alignment, non-NULL and size preconditions of the unsafe std functions
#           the library calls) plus overflow checks.
# c         the C and C++ test programs (tests/c/smoke.c, accum_strides_batch.c, smoke.cc, tests/cpp/wrapper.cc) built
#           with -fsanitize=address,undefined and run against liblomo.so.
# tsan      ThreadSanitizer over the concurrent-submission tests (nightly, -Zbuild-std so the
#           standard library is instrumented too; needs the rust-src component).
# valgrind  scripts/valgrind.sh (memcheck over the C/C++ programs).
#
# Builds go to target/san-* so the normal build is untouched.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=("$@")
((${#steps[@]})) || steps=(asan ubsan c tsan valgrind)
host=$(rustc -vV | sed -n 's/^host: //p')
rustup toolchain list | grep -q nightly || rustup toolchain install nightly --profile minimal
# A huge allocation must come back NULL (the library reports OUT_OF_MEMORY), not abort.
export ASAN_OPTIONS=allocator_may_return_null=1:detect_leaks=1:abort_on_error=1:strict_string_checks=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export LOMO_CUDA_EMULATE_TESTS=1

# Tests that build and run separate programs or need NVRTC stay out of the instrumented runs
# (step c and valgrind cover the programs).
rust_tests=(--lib --test protocol --test reference --test golden --test state_resume
    --test state_damage --test memory --test out_of_memory --test fault_injection
    --test fuzz_regressions --test cuda_emulated_capi --test cuda_emulated_parity
    --test cuda_state --test cuda_protocol --test cuda_no_driver --test ffi_boundary
    --test fp_environment --test no_alloc --test concurrent_submission)
emu_tests=(--lib --test cuda_emulated_capi --test cuda_emulated_parity --test cuda_state
    --test cuda_protocol --test fuzz_regressions)

for step in "${steps[@]}"; do
case $step in
asan)
    echo "== ASan: Rust tests (nightly, -Zsanitizer=address)"
    RUSTFLAGS="-Zsanitizer=address -Cdebug-assertions=on" \
    CARGO_TARGET_DIR=target/san-asan \
        cargo +nightly test --release --features cuda-emulation --target "$host" "${rust_tests[@]}" -- --test-threads=2
    echo "PASS asan" ;;
ubsan)
    echo "== UBSan: emulated CUDA kernels (C++, -fsanitize=undefined) and Rust UB checks"
    # Rust links with -nodefaultlibs: name gcc's UBSan runtime explicitly.
    ubsan_rt=$(${CXX:-c++} -print-file-name=libubsan.so)
    CXXFLAGS="-fsanitize=undefined -fno-sanitize-recover=all -g" \
    RUSTFLAGS="-Clink-arg=$ubsan_rt -Zub-checks=yes -Coverflow-checks=on" \
    CARGO_TARGET_DIR=target/san-ubsan \
        cargo +nightly test --release --features cuda-emulation --target "$host" "${emu_tests[@]}" --test protocol \
        --test out_of_memory --test fault_injection -- --test-threads=2
    echo "PASS ubsan" ;;
c)
    echo "== ASan+UBSan: C and C++ programs against liblomo.so"
    cargo build --release --lib
    out="$(mktemp -d)"
    # a private copy with its SONAME link (liblomo.so.0.<minor>), which cargo does not create
    lib="$out/lib"
    mkdir -p "$lib"
    cp target/release/liblomo.so "$lib/liblomo.so"
    soname=$(readelf -d "$lib/liblomo.so" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
    [ -n "$soname" ] && ln -sf liblomo.so "$lib/$soname"
    san=(-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g -O1)
    cc -std=c99 -Wall -Wextra -Werror -Wpedantic "${san[@]}" -Iinclude tests/c/smoke.c \
        -o "$out/smoke_c" -L"$lib" -llomo -lm -Wl,-rpath,"$lib"
    cc -std=c99 -Wall -Wextra -Werror -Wpedantic "${san[@]}" -Iinclude tests/c/accum_strides_batch.c \
        -o "$out/accum_strides_batch" -L"$lib" -llomo -lm -Wl,-rpath,"$lib"
    c++ -std=c++17 -Wall -Wextra -Werror "${san[@]}" -Iinclude tests/c/smoke.cc \
        -o "$out/smoke_cc" -L"$lib" -llomo -Wl,-rpath,"$lib"
    c++ -std=c++17 -Wall -Wextra -Werror "${san[@]}" -Iinclude tests/cpp/wrapper.cc \
        -o "$out/wrapper" -L"$lib" -llomo -Wl,-rpath,"$lib"
    for p in smoke_c accum_strides_batch smoke_cc wrapper; do
        echo "   $p"; "$out/$p" > "$out/$p.log" 2>&1 || { cat "$out/$p.log"; exit 1; }
    done
    rm -rf "$out"
    echo "PASS c" ;;
tsan)
    echo "== TSan: concurrent submission (nightly, -Zsanitizer=thread, -Zbuild-std)"
    rustup component list --toolchain nightly --installed | grep -q rust-src \
        || rustup component add rust-src --toolchain nightly
    TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" \
    RUSTFLAGS="-Zsanitizer=thread" CARGO_TARGET_DIR=target/san-tsan \
        cargo +nightly test -Zbuild-std --release --features cuda-emulation --target "$host" --test protocol \
        --test concurrent_submission concurrent -- --test-threads=1
    echo "PASS tsan" ;;
valgrind)
    scripts/valgrind.sh
    echo "PASS valgrind" ;;
*) echo "unknown step $step"; exit 2 ;;
esac
done
