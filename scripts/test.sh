#!/usr/bin/env bash
# The project's whole test suite, runnable on a fresh machine: installs what it needs
# (Python virtual environment with the test requirements, C/C++ toolchain pieces), then runs the
# Rust tests (core, C API, C/C++ programs, golden values) and the Python binding tests.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== Rust tests"
cargo test --release --all-targets

# ---- Python binding (bindings/python): venv, test requirements, lomo-native, pytest ----------
echo "== Python binding tests"
if [ ! -x .venv/bin/python ]; then
    if ! python3 -m venv .venv; then
        # Debian/Ubuntu ship venv separately
        rm -rf .venv
        SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
        $SUDO apt-get update -q && $SUDO apt-get install -y -q python3-venv
        python3 -m venv .venv
    fi
fi
PYREQ=bindings/python/requirements-test.txt
if ! cmp -s "$PYREQ" .venv/.lomo-requirements-test.txt; then   # install once per change
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -r "$PYREQ"
    cp "$PYREQ" .venv/.lomo-requirements-test.txt
fi
# builds liblomo.so with cargo (already built above: quick) and bundles it into the package
.venv/bin/python -m pip install -q --no-build-isolation --no-deps --force-reinstall ./bindings/python
.venv/bin/python -m pytest -q -p no:cacheprovider bindings/python/tests
.venv/bin/python examples/python/finetune.py --steps 2 --no-progress   # smoke run of the example
# ---- end of the Python binding block ---------------------------------------------------------
