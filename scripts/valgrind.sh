#!/usr/bin/env bash
# Valgrind memcheck over the C and C++ test programs (tests/c/smoke.c, tests/c/smoke.cc,
# tests/c/accum_strides_batch.c, tests/cpp/wrapper.cc) linked against target/release/liblomo.so: any invalid read or write, use
# of uninitialized memory, invalid free or definite leak fails the run. Stable toolchain; installs
# valgrind from Debian if missing. Run by scripts/test.sh; alone: scripts/valgrind.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v valgrind >/dev/null; then
    sudo=""
    if [[ "$(id -u)" != 0 ]] && command -v sudo >/dev/null; then sudo=sudo; fi
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y --no-install-recommends valgrind \
        || { $sudo apt-get update && $sudo apt-get install -y --no-install-recommends valgrind; }
fi
cargo build --release --lib
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
# The programs ask the loader for the library's SONAME (liblomo.so.0.<minor>), which cargo does
# not create: a private copy with that link, as an installation has.
lib="$out/lib"
mkdir -p "$lib"
cp target/release/liblomo.so "$lib/liblomo.so"
soname=$(readelf -d "$lib/liblomo.so" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
[ -n "$soname" ] && ln -sf liblomo.so "$lib/$soname"
cc -std=c99 -g -O1 -Wall -Wextra -Werror -Wpedantic -Iinclude tests/c/smoke.c -o "$out/smoke_c" \
    -L"$lib" -llomo -lm -Wl,-rpath,"$lib"
cc -std=c99 -g -O1 -Wall -Wextra -Werror -Wpedantic -Iinclude tests/c/accum_strides_batch.c \
    -o "$out/accum_strides_batch" -L"$lib" -llomo -lm -Wl,-rpath,"$lib"
c++ -std=c++17 -g -O1 -Wall -Wextra -Werror -Iinclude tests/c/smoke.cc -o "$out/smoke_cc" \
    -L"$lib" -llomo -Wl,-rpath,"$lib"
c++ -std=c++17 -g -O1 -Wall -Wextra -Werror -Iinclude tests/cpp/wrapper.cc -o "$out/wrapper" \
    -L"$lib" -llomo -Wl,-rpath,"$lib"
for prog in smoke_c accum_strides_batch smoke_cc wrapper; do
    echo "== valgrind memcheck: $prog"
    # One pool thread keeps the run short; the leak check counts definite leaks only (the
    # process-wide thread pool and launchers are reachable until exit by design).
    LOMO_NUM_THREADS=1 valgrind --tool=memcheck --error-exitcode=99 --leak-check=full \
        --errors-for-leak-kinds=definite --show-leak-kinds=definite --track-origins=yes \
        --quiet "$out/$prog" > "$out/$prog.log" 2>&1 \
        || { cat "$out/$prog.log"; echo "valgrind: $prog failed"; exit 1; }
    echo "   clean ($(grep -c . "$out/$prog.log" || true) lines of program output)"
done
