#!/usr/bin/env bash
# The project's whole test suite, runnable on a fresh machine: installs what it needs
# (Python virtual environment with the test requirements, C/C++ toolchain pieces), then runs the
# Rust tests (core, C API, C/C++ programs, golden values) and the Python binding tests.
set -euo pipefail
cd "$(dirname "$0")/.."

# ---- CUDA backend (issue 6) -------------------------------------------------------------------
# NVRTC from the pip wheel (no GPU, no driver needed) for tests/nvrtc_compile.rs; the emulated
# CUDA tests need nothing beyond the C++ compiler that build.rs uses.
NVRTC_VENV=.venv-nvrtc
if ! ls "$NVRTC_VENV"/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.12 >/dev/null 2>&1; then
  echo "== installing nvidia-cuda-nvrtc-cu12 into $NVRTC_VENV"
  python3 -m venv "$NVRTC_VENV"
  "$NVRTC_VENV"/bin/pip install -q "nvidia-cuda-nvrtc-cu12>=12.4,<13"
fi
LOMO_NVRTC_PATH=$(ls "$PWD/$NVRTC_VENV"/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.12 | head -n1)
export LOMO_NVRTC_PATH
export LOMO_REQUIRE_NVRTC=1
# ---- end CUDA backend --------------------------------------------------------------------------

echo "== Rust tests"
cargo test --release --all-targets
