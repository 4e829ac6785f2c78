#!/usr/bin/env bash
# lomo GPU check: runs on a machine with an NVIDIA GPU, its driver, Python with PyTorch (CUDA) and
# no network, using a liblomo.so built elsewhere. It runs
#   1. the CUDA-vs-CPU parity tests on the hardware (scripts/gpu_check.py parity): the C API with a
#      checkpoint round trip per case, host buffers refused with a status, whole steps captured in
#      a CUDA graph and replayed, the PyTorch drop-ins, and lomo_native.jax when jax has CUDA,
#   2. compute-sanitizer memcheck and racecheck on a quick parity run, when compute-sanitizer exists,
#   3. the benchmark: LOMO and AdaLomo on bf16 4096², 4096×11008, 32000×4096 against a measured
#      device-to-device copy and lomo-optim 0.1.1 (scripts/gpu_check.py bench).
# Results go to $OUT (default build-gpu-check/): nvidia-smi.txt, parity.txt, sanitizer-*.txt,
# bench.txt, bench.json. Exit status: non-zero if parity or the sanitizer failed.
#
# With the workplace's `device` tool (its $OUT is picked up below): build and download here, then
#   run(command="bash scripts/gpu-check.sh", carry=["target/release/liblomo.so", ".whl"], timeout_s=420)
# Not yet timed on a GPU (first-use NVRTC compiles, parity, two sanitizer passes, the benchmark):
# keep the timeout under the 10-minute command limit and leave device time for a rerun.
#
# Prepare on a machine with network (from the repository root), then carry target/release/liblomo.so
# (20 MB with debug info; `objcopy --strip-debug` makes it 2.5 MB) and .whl/ with the working tree:
#   cargo build --release
#   mkdir -p .whl && pip download --no-deps -d .whl lomo-optim==0.1.1
# NVRTC: LOMO_NVRTC_PATH if set; else the loader's libnvrtc.so / .so.13 / .so.12 (a CUDA toolkit on
# the loader path); else the first libnvrtc.so.1[23] under the Python environment's
# site-packages/nvidia (PyTorch's and JAX's CUDA wheels bring one). Only where none exists, also
# carry `pip download --no-deps -d .whl 'nvidia-cuda-nvrtc-cu12>=12.4,<13'` (~70 MB: mind the
# device tool's 64 MiB limit).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build-gpu-check}
mkdir -p "$OUT"
export LOMO_LIBRARY=${LOMO_LIBRARY:-$PWD/target/release/liblomo.so}
[ -f "$LOMO_LIBRARY" ] || { echo "missing $LOMO_LIBRARY (build it elsewhere and carry it)"; exit 2; }
PY=${PYTHON:-python3}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

# Offline installs of the carried wheels into a folder on PYTHONPATH, next to the interpreter's own
# packages (torch). Not a venv: the machine's python3 may itself be a venv, whose packages a
# nested `venv --system-site-packages` would not see.
SITE="$PWD/.gpucheck-site"
if [ -d .whl ]; then
  for w in .whl/*.whl; do   # each on its own: a missing optional wheel must not stop the others
    "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$w" >> "$OUT/pip.txt" 2>&1 \
      || echo "offline install of $w failed (see $OUT/pip.txt)"
  done
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${LOMO_NVRTC_PATH:-}" ] && ! ldconfig -p 2>/dev/null | grep -qE 'libnvrtc\.so(\.1[23])? '; then
  sites=$("$PY" -c 'import site, sys; print(" ".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null)
  cand=""
  for d in "$SITE" $sites /usr/local/cuda/lib64; do
    cand=$(ls "$d"/nvidia/cu13/lib/libnvrtc.so.13 "$d"/nvidia/cuda_nvrtc/lib/libnvrtc.so.1[23] \
      "$d"/libnvrtc.so.1[23] 2>/dev/null | head -n1)
    [ -n "$cand" ] && break
  done
  if [ -n "$cand" ]; then
    export LOMO_NVRTC_PATH="$(cd "$(dirname "$cand")" && pwd)/$(basename "$cand")"
  fi
fi
echo "NVRTC: ${LOMO_NVRTC_PATH:-the dynamic loader finds libnvrtc}" | tee "$OUT/nvrtc.txt"

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
