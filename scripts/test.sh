#!/usr/bin/env bash
# The project's whole test suite, runnable on a fresh machine: installs what it needs
# (Python virtual environment with the test requirements, C/C++ toolchain pieces), then runs the
# Rust tests (core, C API, C/C++ programs, golden values) and the Python binding tests.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== Rust tests"
cargo test --release
# The SIMD paths must agree: rerun the numerical tests on the portable baseline path.
LOMO_CPU_LEVEL=baseline cargo test --release --test golden --test reference --test protocol
cargo run --release --example quickstart

# ---- BEGIN: installation for C and C++ users (scripts/install.sh, examples/cpp) ----
echo "== Install, pkg-config and CMake package, C++ example"
missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v pkg-config >/dev/null || missing+=(pkg-config)
if ((${#missing[@]})); then
    sudo=""
    if [[ "$(id -u)" != 0 ]] && command -v sudo >/dev/null; then sudo=sudo; fi
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y --no-install-recommends "${missing[@]}" \
        || { $sudo apt-get update && $sudo apt-get install -y --no-install-recommends "${missing[@]}"; }
fi
stage="$(mktemp -d)"
scripts/install.sh "$stage/prefix"
cmake -S examples/cpp -B "$stage/build" -DCMAKE_PREFIX_PATH="$stage/prefix" -DCMAKE_BUILD_TYPE=Release
cmake --build "$stage/build"
(cd "$stage/build" && ./trainer)
cc -std=c99 -Wall -Wextra -Werror -o "$stage/pkgconfig" tests/install/pkgconfig.c \
    $(PKG_CONFIG_PATH="$stage/prefix/lib/pkgconfig" pkg-config --cflags --libs lomo) \
    -Wl,-rpath,"$stage/prefix/lib"
"$stage/pkgconfig"
rm -rf "$stage"
# ---- END: installation for C and C++ users ----
