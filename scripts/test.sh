#!/usr/bin/env bash
# The project's whole test suite, runnable on a fresh machine: installs what it needs
# (Python virtual environment with the test requirements, C/C++ toolchain pieces), then runs the
# Rust tests (core, C API, C/C++ programs, golden values) and the Python binding tests.
set -euo pipefail
cd "$(dirname "$0")/.."

# ---- CUDA backend (issue 6) -------------------------------------------------------------------
# NVRTC from the pip wheel (no GPU, no driver needed) for tests/nvrtc_compile.rs; the emulated
# CUDA tests need nothing beyond the C++ compiler that build.rs uses.
# Both NVRTC 12 and 13 (CUDA 13 images ship only libnvrtc.so.13): the kernels must compile with each.
NVRTC_VENV=.venv-nvrtc
nvrtc12() { ls "$PWD/$NVRTC_VENV"/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.12 2>/dev/null | head -n1; }
nvrtc13() { ls "$PWD/$NVRTC_VENV"/lib/python3*/site-packages/nvidia/cu13/lib/libnvrtc.so.13 2>/dev/null | head -n1; }
if [ -z "$(nvrtc12)" ] || [ -z "$(nvrtc13)" ]; then
  echo "== installing NVRTC 12 and 13 (pip wheels) into $NVRTC_VENV"
  [ -x "$NVRTC_VENV/bin/pip" ] || python3 -m venv "$NVRTC_VENV"
  "$NVRTC_VENV"/bin/pip install -q "nvidia-cuda-nvrtc-cu12>=12.4,<13" "nvidia-cuda-nvrtc>=13,<14"
fi
LOMO_NVRTC_PATH=$(nvrtc12)
export LOMO_NVRTC_PATH
export LOMO_REQUIRE_NVRTC=1
# ---- end CUDA backend --------------------------------------------------------------------------

echo "== Rust tests"
cargo test --release
echo "== kernels with NVRTC 13"
LOMO_NVRTC_PATH=$(nvrtc13) cargo test --release --test nvrtc_compile
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
# smoke runs of the Hugging Face example: plain loop and LomoTrainer/Trainer, plot included
hf_plot="$(mktemp -d)"
.venv/bin/python examples/python/finetune_hf.py --steps 2 --no-progress --plot "$hf_plot/loop.png"
.venv/bin/python examples/python/finetune_hf.py --steps 2 --no-progress --trainer hf \
    --plot "$hf_plot/hf.png"
test -s "$hf_plot/loop.png" && test -s "$hf_plot/hf.png"
rm -rf "$hf_plot"
# The GPU check's own script, on the emulated device: keeps it working between GPU sessions.
.venv/bin/python scripts/gpu_check.py parity --emulate
.venv/bin/python scripts/gpu_check.py bench --emulate > /dev/null
# ---- end of the Python binding block ---------------------------------------------------------

# ---- libtorch C++ trainer (examples/cpp/libtorch) -- begin -------------------------------------
# Built against the libtorch inside .venv's torch wheel and the lomo installed into a temporary
# prefix; the program checks one step against autograd and that the loss falls.
echo "== libtorch C++ trainer"
TORCH_CMAKE=$(.venv/bin/python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)' 2>/dev/null || true)
if [ -n "$TORCH_CMAKE" ] && [ -f "$TORCH_CMAKE/Torch/TorchConfig.cmake" ]; then
    stage="$(mktemp -d)"
    scripts/install.sh "$stage/prefix" > /dev/null
    cmake -S examples/cpp/libtorch -B "$stage/build" -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_PREFIX_PATH="$stage/prefix;$TORCH_CMAKE"
    cmake --build "$stage/build"
    "$stage/build/libtorch_trainer"
    rm -rf "$stage"
else
    echo "SKIP: libtorch C++ trainer: torch's CMake files not found (torch.utils.cmake_prefix_path)"
fi
# ---- libtorch C++ trainer -- end ----------------------------------------------------------------

# ---- JAX (bindings/python/lomo_native/jax.py, src/xla) -- begin ---------------------------------
# A private venv (.venv-jax) with jax (CPU), numpy and pytest, preferring Python >= 3.12 (jax
# 0.12; Python 3.10/3.11 get an older jax, which the handlers also support). Reused as is when it
# already imports them. Prints SKIP only if no Python can get a working jax.
jax_python_candidates() {
    local c
    for c in python3.13 python3.12; do command -v "$c" || true; done
    for c in "$HOME"/.pyenv/versions/3.13*/bin/python3 "$HOME"/.pyenv/versions/3.12*/bin/python3; do
        [ -x "$c" ] && echo "$c"
    done
    command -v python3 || true
}
jax_venv_ok() {
    [ -x .venv-jax/bin/python ] && .venv-jax/bin/python -c 'import jax, numpy, pytest' >/dev/null 2>&1
}
jax_setup() {
    jax_venv_ok && return 0
    local py
    for py in $(jax_python_candidates); do
        "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null || continue
        rm -rf .venv-jax
        if ! "$py" -m venv .venv-jax >/dev/null 2>&1; then
            # Debian's python3 needs python3-venv for `-m venv`.
            if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
                apt-get update -qq >/dev/null 2>&1 || true
                DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null 2>&1 || true
            fi
            rm -rf .venv-jax
            "$py" -m venv .venv-jax >/dev/null 2>&1 || continue
        fi
        .venv-jax/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
        if .venv-jax/bin/python -m pip install -q jax numpy pytest && jax_venv_ok; then
            return 0
        fi
    done
    rm -rf .venv-jax
    return 1
}
echo "== JAX tests"
if jax_setup; then
    cargo build --release --lib
    echo "   $(.venv-jax/bin/python -c 'import sys, jax; print("python", sys.version.split()[0], "jax", jax.__version__)')"
    LOMO_LIBRARY="$PWD/target/release/liblomo.so" \
        PYTHONPATH="$PWD/bindings/python" JAX_PLATFORMS=cpu \
        .venv-jax/bin/python -m pytest -q bindings/python/tests_jax
else
    echo "SKIP: JAX tests: no Python >= 3.10 with a pip-installable jax found (tried: $(jax_python_candidates | tr '\n' ' '))"
fi
# ---- JAX -- end ---------------------------------------------------------------------------------
