#!/usr/bin/env bash
# lomo GPU check: runs on a machine with an NVIDIA GPU, its driver, Python with PyTorch (CUDA) and
# no network, using a liblomo.so built elsewhere. It runs
#   1. the CUDA-vs-CPU parity tests on the hardware (scripts/gpu_check.py parity): the C API with a
#      checkpoint round trip per case, host buffers refused with a status, whole steps captured in
#      a CUDA graph and replayed, the PyTorch drop-ins, and lomo_native.jax when jax has CUDA,
#   2. the benchmark: LOMO and AdaLomo on bf16 4096², 4096×11008, 32000×4096 against a measured
#      device-to-device copy and lomo-optim 0.1.1, with kernel launches per step (gpu_check.py bench),
#      then the launches per step of a Llama-2-7B-shaped registration (291 bf16 tensors, 13.5 GB),
#      counted by the library (lomo_cuda_launch_count): gradients one by one, per layer and in one
#      batch (lomo_grad_submit_batch, where small tensors share multi-tensor launches),
#   3. compute-sanitizer memcheck and racecheck on a quick parity run, when compute-sanitizer exists.
# Each part runs under its own time limit (T_PARITY, T_BENCH, T_SANITIZER seconds) and can be
# skipped (SKIP_PARITY=1, SKIP_BENCH=1, SKIP_SANITIZER=1) for a rerun of one part.
# Results go to $OUT (default build-gpu-check/; at most 7 files, the device tool returns 8):
# nvidia-smi.txt, parity.txt, bench.txt, bench.json, sanitizer-*.txt, times.txt.
# Exit status: non-zero if parity or the sanitizer failed.
#
# With the workplace's `device` tool (its $OUT is picked up below): build and download here, then
#   run(command="bash scripts/gpu-check.sh", carry=["target/release/liblomo.so", ".whl"], timeout_s=300)
# Timed on an H200 (2026-11-30): parity 31–42 s (first-use NVRTC compiles included), benchmark
# 11–16 s, memcheck 6 s, racecheck 8 s; a fresh machine takes about a minute more to start.
# LOMO_BENCH_SHAPES=4096x4096,... restricts the benchmark's shapes (e.g. under ncu).
#
# Prepare on a machine with network (from the repository root), then carry target/release/liblomo.so
# (about 2.3 MB: the release profile builds it without debug info) and .whl/ with the working tree:
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
    "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$w" >> /tmp/lomo-pip.txt 2>&1 \
      || { echo "offline install of $w failed:"; tail -n 5 /tmp/lomo-pip.txt; }
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
echo "NVRTC: ${LOMO_NVRTC_PATH:-the dynamic loader finds libnvrtc}"

status=0
export PYTHONUNBUFFERED=1
# Each part has its own time limit (seconds; override by environment), so that one slow part
# cannot eat the others' device time: parity, then the benchmark, then the sanitizers.
T_PARITY=${T_PARITY:-240} T_BENCH=${T_BENCH:-150} T_SANITIZER=${T_SANITIZER:-100}
part() {  # part NAME LIMIT CMD... : runs CMD under `timeout`, output to $OUT/NAME.txt
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout -k 5 "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "-- $name: exit $rc after $((SECONDS - t0)) s (limit $limit s)" | tee -a "$OUT/times.txt"
  return "$rc"
}

if [ "${SKIP_PARITY:-0}" != 1 ]; then
  echo "== parity (CUDA vs CPU through the C API)"
  part parity "$T_PARITY" "$PY" scripts/gpu_check.py parity || status=1
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  echo "== benchmark"
  LOMO_BENCH_JSON="$OUT/bench.json" part bench "$T_BENCH" "$PY" scripts/gpu_check.py bench
fi

if [ "${SKIP_SANITIZER:-0}" != 1 ]; then
  if command -v compute-sanitizer >/dev/null 2>&1; then
    for tool in memcheck racecheck; do
      echo "== compute-sanitizer --tool $tool"
      part "sanitizer-$tool" "$T_SANITIZER" compute-sanitizer --tool "$tool" --error-exitcode 3 \
        "$PY" scripts/gpu_check.py parity --quick > /dev/null
      rc=$?
      tail -n 3 "$OUT/sanitizer-$tool.txt"
      [ $rc -eq 0 ] || { echo "compute-sanitizer $tool: exit $rc"; status=1; }
    done
  else
    echo "compute-sanitizer not found: skipped" | tee "$OUT/sanitizer-skipped.txt"
  fi
fi
exit $status
