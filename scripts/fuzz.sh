#!/usr/bin/env bash
# Runs every fuzz target (fuzz/, cargo-fuzz + libFuzzer, nightly toolchain) for SECONDS each:
#   scripts/fuzz.sh SECONDS [TARGET...]
# Targets: capi (C API call sequences, CPU and emulated CUDA), state (checkpoint bytes into
# lomo_state_deserialize), xla (XLA FFI call frames into the handlers). The corpus grows in
# fuzz/corpus/<target>/ (seed-* files are committed; the rest is local). A failing input lands in
# fuzz/artifacts/<target>/: minimize it (cargo +nightly fuzz tmin <target> <file>), fix the
# library, and commit it to fuzz/regressions/<target>/, which tests/fuzz_regressions.rs replays
# on stable. Environment: FUZZ_SANITIZER=address (default: none, the fastest; ASan/UBSan runs
# are scripts/sanitize.sh), FUZZ_JOBS (default 1), FUZZ_ARGS (more libFuzzer flags, e.g.
# -len_control=0 for long call sequences at once). Prints each target's executions and coverage.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:?usage: scripts/fuzz.sh SECONDS [TARGET...]}
shift
targets=("$@")
((${#targets[@]})) || targets=(capi state xla)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
rustup toolchain list | grep -q nightly || rustup toolchain install nightly --profile minimal
san=${FUZZ_SANITIZER:-none}
# Huge allocations must fail (OUT_OF_MEMORY), not abort: ASan returns NULL, libFuzzer's
# malloc limit is lifted (its RSS limit still applies).
export ASAN_OPTIONS=${ASAN_OPTIONS:-allocator_may_return_null=1:detect_leaks=0}
mkdir -p fuzz/stats
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    echo "== fuzz $t for ${secs}s (sanitizer: $san)"
    log="fuzz/stats/$t.log"
    jobs=()
    if [ "${FUZZ_JOBS:-1}" -gt 1 ]; then jobs=(-jobs="$FUZZ_JOBS" -workers="$FUZZ_JOBS"); fi
    (cd fuzz && cargo +nightly fuzz run -O -s "$san" "$t" "corpus/$t" -- \
        -max_total_time="$secs" "${jobs[@]}" -rss_limit_mb=4096 -malloc_limit_mb=1000000000 -timeout=30 \
        -print_final_stats=1 -artifact_prefix="artifacts/$t/" ${FUZZ_ARGS:-}) 2>&1 | tee "$log" | \
        grep -E "^#[0-9]+ +(DONE|pulse|NEW)|stat::|ERROR|panicked|SUMMARY" | tail -n 8
    execs=$(grep -oE "stat::number_of_executed_units: [0-9]+" "$log" | awk '{s+=$2} END {print s+0}')
    cov=$(grep -oE "cov: [0-9]+ ft: [0-9]+" "$log" | tail -n1)
    echo "$t: $execs executions, $cov, corpus $(ls "fuzz/corpus/$t" | wc -l) inputs, findings $(ls "fuzz/artifacts/$t" | wc -l)"
done
