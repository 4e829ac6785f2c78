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
