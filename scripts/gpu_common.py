"""Shared by scripts/gpu_check.py (parity) and scripts/gpu_bench.py (benchmark): the library
under test (LOMO_LIBRARY, default target/release/liblomo.so) reached through this checkout's
Python binding (bindings/python/lomo_native), an optimizer wrapper that registers and steps torch
tensors by address, and the device ("cuda", or "cpu" under --emulate, where LOMO_CUDA_EMULATE=1
makes host tensors stand in for device tensors; the emulation is in test builds only:
`cargo build --release --lib --features cuda-emulation`, as scripts/test.sh does)."""
import os
import sys

import torch

LIB = os.environ.get("LOMO_LIBRARY", "target/release/liblomo.so")
EMULATE = "--emulate" in sys.argv
if EMULATE:
    os.environ["LOMO_CUDA_EMULATE"] = "1"
DEV = "cpu" if EMULATE else "cuda"
DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def use_bindings():
    """Makes lomo_native (bindings/python of this checkout) importable, on the library under test."""
    os.environ["LOMO_LIBRARY"] = os.path.abspath(LIB)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bindings", "python")
    if path not in sys.path:
        sys.path.insert(0, path)


use_bindings()
import lomo_native  # noqa: E402  (after LOMO_LIBRARY is set)

if EMULATE and not lomo_native.cuda_available():
    sys.exit(f"--emulate: {lomo_native.library_path()} has no CUDA emulation; build one with "
             "`cargo build --release --lib --features cuda-emulation` and set LOMO_LIBRARY to it")


class Opt:
    """lomo_native's optimizer, registering and stepping torch tensors (host or device memory)
    by address; `keep` holds tensors that must outlive it."""

    def __init__(self, algorithm, **fields):
        self.o = lomo_native.Optimizer("adalomo" if algorithm else "lomo", **fields)
        self.keep = []

    def register(self, name, t, device, group=0, flags=0):
        return self.o.register_pointer(name, t.data_ptr(), DT[t.dtype], t.shape, device, group, flags)

    def step(self, phase, lr, grads, stream):
        self.o.begin(phase, lr, stream)
        for i, g in enumerate(grads):
            self.o.submit_pointer(i, g.data_ptr(), DT[g.dtype], stream)
        self.o.end(stream)

    def info(self):
        return self.o.step_info()

    def loss_scale(self):
        return self.o.loss_scale

    def state(self):
        return self.o.state_bytes()

    def load_state(self, blob):
        self.o.load_state_bytes(blob)


def stream_ptr():
    return None if EMULATE else torch.cuda.current_stream().cuda_stream
