#!/usr/bin/env bash
# lomo GPU check: runs on a machine with an NVIDIA GPU, its driver, Python with PyTorch (CUDA) and
# no network, using a liblomo.so built elsewhere. It runs
#   1. the CUDA-vs-CPU parity tests on the hardware (scripts/gpu_check.py parity): the C API with a
#      checkpoint round trip per case, the PyTorch drop-ins, and lomo_native.jax when jax has CUDA,
#   2. compute-sanitizer memcheck and racecheck on a quick parity run, when compute-sanitizer exists,
#   3. the benchmark: LOMO and AdaLomo on bf16 4096², 4096×11008, 32000×4096 against a measured
#      device-to-device copy and lomo-optim 0.1.1 (scripts/gpu_check.py bench).
# Results go to $OUT (default build-gpu-check/): nvidia-smi.txt, parity.txt, sanitizer-*.txt,
# bench.txt, bench.json. Exit status: non-zero if parity or the sanitizer failed.
#
# Prepare on a machine with network (from the repository root), then carry target/release/liblomo.so
# and .whl/ over with the working tree:
#   cargo build --release
#   mkdir -p .whl && pip download --no-deps -d .whl lomo-optim==0.1.1 'nvidia-cuda-nvrtc-cu12>=12.4,<13'
# NVRTC: a system CUDA toolkit's libnvrtc is used when the loader finds it; otherwise the wheel's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build-gpu-check}
mkdir -p "$OUT"
export LOMO_LIBRARY=${LOMO_LIBRARY:-$PWD/target/release/liblomo.so}
[ -f "$LOMO_LIBRARY" ] || { echo "missing $LOMO_LIBRARY (build it elsewhere and carry it)"; exit 2; }
PY=${PYTHON:-python3}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

# Offline installs from the carried wheels, next to the system torch.
VENV=.venv-gpucheck
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv --system-site-packages "$VENV"
fi
if [ -d .whl ]; then
  "$VENV/bin/pip" install -q --no-index --find-links .whl lomo-optim==0.1.1 nvidia-cuda-nvrtc-cu12 \
    > "$OUT/pip.txt" 2>&1 || echo "offline wheel install failed (see $OUT/pip.txt)"
fi
PY="$VENV/bin/python"
if [ -z "${LOMO_NVRTC_PATH:-}" ] && ! ldconfig -p 2>/dev/null | grep -q 'libnvrtc.so'; then
  cand=$(ls "$VENV"/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.12 2>/dev/null | head -n1)
  [ -n "$cand" ] && export LOMO_NVRTC_PATH="$PWD/$cand"
fi

status=0
echo "== parity (CUDA vs CPU through the C API)"
"$PY" scripts/gpu_check.py parity 2>&1 | tee "$OUT/parity.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

if command -v compute-sanitizer >/dev/null 2>&1; then
  for tool in memcheck racecheck; do
    echo "== compute-sanitizer --tool $tool"
    compute-sanitizer --tool "$tool" --error-exitcode 3 "$PY" scripts/gpu_check.py parity --quick \
      > "$OUT/sanitizer-$tool.txt" 2>&1
    rc=$?
    tail -n 3 "$OUT/sanitizer-$tool.txt"
    [ $rc -eq 0 ] || { echo "compute-sanitizer $tool: exit $rc"; status=1; }
  done
else
  echo "compute-sanitizer not found: skipped" | tee "$OUT/sanitizer-skipped.txt"
fi

echo "== benchmark"
LOMO_BENCH_JSON="$OUT/bench.json" "$PY" scripts/gpu_check.py bench 2>&1 | tee "$OUT/bench.txt"
exit $status
