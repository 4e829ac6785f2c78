#!/usr/bin/env bash
# The project's whole test suite, runnable on a fresh machine: installs what it needs
# (Python virtual environments with the test requirements, C/C++ toolchain pieces), then runs the
# Rust tests (core, C API, C/C++ programs, golden values) and the Python binding tests.
#
# The virtual environments live outside the clone, so a clone stays small: under $LOMO_ENV_DIR if
# set, else ~/.cache/lomo (venv: torch, CPU-only where no NVIDIA GPU is present, ~1 GB; venv-jax;
# venv-nvrtc), and are reused across clones and runs. A clone that already has .venv,
# .venv-jax or .venv-nvrtc (an earlier layout, or links to shared ones) keeps using them.
set -euo pipefail
cd "$(dirname "$0")/.."

# env_path NAME: where the environment NAME (venv, venv-jax, venv-nvrtc) lives.
env_path() {
    local in_clone=".venv${1#venv}"   # venv-jax -> .venv-jax
    if [ -n "${LOMO_ENV_DIR:-}" ]; then echo "$LOMO_ENV_DIR/$1"
    elif [ -e "$in_clone" ]; then echo "$PWD/$in_clone"
    else echo "${XDG_CACHE_HOME:-$HOME/.cache}/lomo/$1"
    fi
}
# make_venv DIR [PYTHON]: a virtual environment at DIR (installs Debian's python3-venv if needed).
make_venv() {
    local py="${2:-python3}"
    mkdir -p "$(dirname "$1")"
    if ! "$py" -m venv "$1" >/dev/null 2>&1; then
        rm -rf "$1"
        if command -v apt-get >/dev/null 2>&1; then
            local sudo=""
            if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then sudo=sudo; fi
            $sudo apt-get update -qq >/dev/null 2>&1 || true
            DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-venv >/dev/null 2>&1 || true
        fi
        "$py" -m venv "$1" >/dev/null 2>&1 || { rm -rf "$1"; return 1; }
    fi
}
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT

# ---- CUDA backend (issue 6) -------------------------------------------------------------------
# NVRTC from the pip wheel (no GPU, no driver needed) for tests/nvrtc_compile.rs; the emulated
# CUDA tests need nothing beyond the C++ compiler that build.rs uses.
# Both NVRTC 12 and 13 (CUDA 13 images ship only libnvrtc.so.13): the kernels must compile with each.
NVRTC_VENV=$(env_path venv-nvrtc)
nvrtc12() { ls "$NVRTC_VENV"/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.12 2>/dev/null | head -n1; }
nvrtc13() { ls "$NVRTC_VENV"/lib/python3*/site-packages/nvidia/cu13/lib/libnvrtc.so.13 2>/dev/null | head -n1; }
if [ -z "$(nvrtc12)" ] || [ -z "$(nvrtc13)" ]; then
  echo "== installing NVRTC 12 and 13 (pip wheels) into $NVRTC_VENV"
  [ -x "$NVRTC_VENV/bin/pip" ] || make_venv "$NVRTC_VENV"
  "$NVRTC_VENV"/bin/pip install -q "nvidia-cuda-nvrtc-cu12>=12.4,<13" "nvidia-cuda-nvrtc>=13,<14"
fi
LOMO_NVRTC_PATH=$(nvrtc12)
export LOMO_NVRTC_PATH
export LOMO_REQUIRE_NVRTC=1
# ---- end CUDA backend --------------------------------------------------------------------------

# ---- MPI for examples/c/dist_mpi.c (tests/c_smoke.rs runs it under mpiexec when present) ----
if ! command -v mpicc >/dev/null || ! command -v mpiexec >/dev/null; then
    if command -v apt-get >/dev/null; then
        sudo=""
        if [[ "$(id -u)" != 0 ]] && command -v sudo >/dev/null; then sudo=sudo; fi
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
            mpich libmpich-dev >/dev/null 2>&1 || echo "SKIP: MPI example (mpich not installable)"
    fi
fi
if command -v mpicc >/dev/null && command -v mpiexec >/dev/null; then export LOMO_REQUIRE_MPI=1; fi

echo "== Rust tests"
# cuda-emulation: the host emulation of the CUDA kernels, for the tests only (not in the release
# library that `cargo build --release` makes).
cargo test --release --features cuda-emulation
echo "== kernels with NVRTC 13"
LOMO_NVRTC_PATH=$(nvrtc13) cargo test --release --features cuda-emulation --test nvrtc_compile
# The SIMD paths must agree: rerun the numerical tests on the portable baseline path.
LOMO_CPU_LEVEL=baseline cargo test --release --features cuda-emulation --test golden --test reference --test protocol
# A library with the emulation, for scripts/gpu_check.py --emulate below.
cargo build --release --lib --features cuda-emulation
mkdir -p "$stage/emu" && cp target/release/liblomo.so "$stage/emu/liblomo.so"
cargo run --release --example quickstart   # (rebuilds the release library, without the emulation)
cargo build --release --lib

# ---- BEGIN: installation for C and C++ users (scripts/install.sh, examples/cpp) ----
echo "== Install, pkg-config and CMake package (shared and static), C++ example"
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
tests/install/check.sh "$stage/install"
# ---- END: installation for C and C++ users ----

# ---- Valgrind memcheck over the C/C++ smoke programs (issue 14; installs valgrind if missing) ----
echo "== Valgrind memcheck"
scripts/valgrind.sh

# ---- Python binding (bindings/python): venv, test requirements, lomo-native, pytest ----------
echo "== Python binding tests"
VENV=$(env_path venv)
[ -x "$VENV/bin/python" ] || make_venv "$VENV"
PYREQ=bindings/python/requirements-test.txt
if ! cmp -s "$PYREQ" "$VENV/.lomo-requirements-test.txt"; then   # install once per change
    "$VENV"/bin/python -m pip install -q --upgrade pip
    if ! "$VENV"/bin/python -c 'import torch' 2>/dev/null && ! nvidia-smi -L >/dev/null 2>&1; then
        # No NVIDIA GPU: PyTorch's CPU-only wheel (~200 MB) instead of PyPI's CUDA one (~5 GB).
        "$VENV"/bin/python -m pip install -q "torch>=2.1" --index-url https://download.pytorch.org/whl/cpu \
            || echo "   (the CPU-only torch index is unreachable: torch comes from PyPI)"
    fi
    "$VENV"/bin/python -m pip install -q -r "$PYREQ"
    cp "$PYREQ" "$VENV/.lomo-requirements-test.txt"
fi
# The tests run the checkout's package on the release library; test_packaging.py builds the
# wheel and installs it into a folder of its own (nothing is installed into the environment).
# LOMO_EMULATION_LIBRARY: the emulated CUDA device, for the test that moves device state.
LOMO_LIBRARY="$PWD/target/release/liblomo.so" PYTHONPATH="$PWD/bindings/python" \
    LOMO_EMULATION_LIBRARY="$stage/emu/liblomo.so" \
    "$VENV"/bin/python -m pytest -q -p no:cacheprovider bindings/python/tests
# The example as a user runs it: the wheel as pip builds it (cargo build inside), installed.
"$VENV"/bin/python -m pip wheel -q --no-deps --no-build-isolation -w "$stage/wheel" ./bindings/python
"$VENV"/bin/python -m pip install -q --no-deps --target "$stage/site" "$stage"/wheel/lomo_native-*.whl
PYTHONPATH="$stage/site" "$VENV"/bin/python examples/python/finetune.py --steps 2 --no-progress
# smoke runs of the Hugging Face example: plain loop and LomoTrainer/Trainer, plot included
hf_plot="$(mktemp -d)"
PYTHONPATH="$stage/site" "$VENV"/bin/python examples/python/finetune_hf.py --steps 2 --no-progress \
    --plot "$hf_plot/loop.png"
PYTHONPATH="$stage/site" "$VENV"/bin/python examples/python/finetune_hf.py --steps 2 --no-progress \
    --trainer hf --plot "$hf_plot/hf.png"
test -s "$hf_plot/loop.png" && test -s "$hf_plot/hf.png"
rm -rf "$hf_plot"
# The GPU check's own script, on the emulated device: keeps it working between GPU sessions.
LOMO_LIBRARY="$stage/emu/liblomo.so" "$VENV"/bin/python scripts/gpu_check.py parity --emulate
LOMO_LIBRARY="$stage/emu/liblomo.so" "$VENV"/bin/python scripts/gpu_check.py bench --emulate > /dev/null
# Smoke runs of the CPU benchmarks (tiny sizes, a few seconds; no time is asserted): the end to
# end steps fail only when a fused step's peak memory exceeds LOMO's bound or a gradient outlives
# its hook; the plot script must still produce its PNG.
LOMO_LIBRARY="$PWD/target/release/liblomo.so" "$VENV"/bin/python benches/end_to_end.py \
    --size tiny --reps 1 --rounds 1 --one-process --check > /dev/null
bench_plot="$(mktemp -d)"
LOMO_LIBRARY="$PWD/target/release/liblomo.so" "$VENV"/bin/python benches/cpu_floor_plot.py \
    --max-log2 8 --reps 1 --out "$bench_plot/floor.png" > /dev/null
test -s "$bench_plot/floor.png"
rm -rf "$bench_plot"
# ---- end of the Python binding block ---------------------------------------------------------

# ---- libtorch C++ trainer (examples/cpp/libtorch) -- begin -------------------------------------
# Built against the libtorch inside the test environment's torch wheel and the lomo installed into a temporary
# prefix; the program checks one step against autograd and that the loss falls.
echo "== libtorch C++ trainer"
TORCH_CMAKE=$("$VENV"/bin/python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)' 2>/dev/null || true)
if [ -n "$TORCH_CMAKE" ] && [ -f "$TORCH_CMAKE/Torch/TorchConfig.cmake" ]; then
    lt_stage="$(mktemp -d)"
    scripts/install.sh "$lt_stage/prefix" > /dev/null
    cmake -S examples/cpp/libtorch -B "$lt_stage/build" -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_PREFIX_PATH="$lt_stage/prefix;$TORCH_CMAKE"
    cmake --build "$lt_stage/build"
    "$lt_stage/build/libtorch_trainer"
    rm -rf "$lt_stage"
else
    echo "SKIP: libtorch C++ trainer: torch's CMake files not found (torch.utils.cmake_prefix_path)"
fi
# ---- libtorch C++ trainer -- end ----------------------------------------------------------------

# ---- JAX (bindings/python/lomo_native/jax.py, src/xla) -- begin ---------------------------------
# A private venv (venv-jax, see env_path) with jax (CPU), numpy, pytest and optax (lomo_native.jax.optax), preferring Python >= 3.12 (jax
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
JAX_VENV=$(env_path venv-jax)
jax_venv_ok() {
    [ -x "$JAX_VENV/bin/python" ] && "$JAX_VENV/bin/python" -c 'import jax, numpy, pytest, optax' >/dev/null 2>&1
}
jax_setup() {
    jax_venv_ok && return 0
    # an existing environment from before optax was needed: add optax to it
    if [ -x "$JAX_VENV/bin/python" ] && "$JAX_VENV/bin/python" -c 'import jax, numpy, pytest' >/dev/null 2>&1 \
        && "$JAX_VENV/bin/python" -m pip install -q optax && jax_venv_ok; then
        return 0
    fi
    local py
    for py in $(jax_python_candidates); do
        "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null || continue
        rm -rf "$JAX_VENV"
        make_venv "$JAX_VENV" "$py" || continue
        "$JAX_VENV"/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
        if "$JAX_VENV"/bin/python -m pip install -q jax numpy pytest optax && jax_venv_ok; then
            return 0
        fi
    done
    rm -rf "$JAX_VENV"
    return 1
}
echo "== JAX tests"
if jax_setup; then
    cargo build --release --lib
    echo "   $("$JAX_VENV"/bin/python -c 'import sys, jax; print("python", sys.version.split()[0], "jax", jax.__version__)')"
    LOMO_LIBRARY="$PWD/target/release/liblomo.so" \
        PYTHONPATH="$PWD/bindings/python" JAX_PLATFORMS=cpu \
        "$JAX_VENV"/bin/python -m pytest -q -p no:cacheprovider bindings/python/tests_jax
    # The JAX example, unsharded and tensor-parallel over 2 host devices (shard_map; it exits
    # non-zero if the loss does not fall).
    for jax_args in "" "--devices 2"; do
        LOMO_LIBRARY="$PWD/target/release/liblomo.so" PYTHONPATH="$PWD/bindings/python" \
            JAX_PLATFORMS=cpu "$JAX_VENV"/bin/python examples/python/jax_train.py --steps 40 $jax_args
    done
else
    echo "SKIP: JAX tests: no Python >= 3.10 with a pip-installable jax found (tried: $(jax_python_candidates | tr '\n' ' '))"
fi
# ---- JAX -- end ---------------------------------------------------------------------------------

# ---- README: every code block runs as written (tests/readme/run_blocks.py) ----------------------
# In a scratch clone and HOME; the virtual environment the README creates sees the test
# environments' packages, so its pip commands need no multi-GB downloads (see the script).
echo "== README code blocks"
sites=("$VENV"/lib/python3*/site-packages)
if [ -d "$JAX_VENV" ]; then sites+=("$JAX_VENV"/lib/python3*/site-packages); fi
site_args=()
for s in "${sites[@]}"; do site_args+=(--site "$s"); done
LOMO_IN_TEST_SH=1 python3 tests/readme/run_blocks.py "${site_args[@]}"
