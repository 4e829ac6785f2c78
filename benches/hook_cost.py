#!/usr/bin/env python3
"""Per-hook cost of the PyTorch binding (issue 17 item 3), CPU.

    LOMO_LIBRARY=target/release/liblomo.so .venv/bin/python benches/hook_cost.py [--reps 21]

A model of T independent parameters of n elements each (loss = Σ_k sum(w_k · x_k)): the time of
one ``fused_backward`` minus the time of a plain ``backward`` of the same graph (gradients
kept), divided by T — what the hook, its checks, ctypes and the library's step add per tensor.
Also the bare ctypes ``lomo_grad_submit_checked`` of the same tensors (the floor of any Python
hook). Medians of --reps; one thread.
"""
import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bindings", "python"))

import torch  # noqa: E402

from lomo_native.core import Optimizer as NativeOptimizer  # noqa: E402
from lomo_native.torch import AdaLomo, Lomo  # noqa: E402


class Model(torch.nn.Module):
    def __init__(self, tensors, n):
        super().__init__()
        self.ws = torch.nn.ParameterList(torch.nn.Parameter(torch.full((n,), 0.01))
                                         for _ in range(tensors))
        self.xs = [torch.randn(n) for _ in range(tensors)]

    def forward(self):
        return sum((w * x).sum() for w, x in zip(self.ws, self.xs))


def median_time(fn, reps):
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts[1:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--tensors", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(1)
    T = args.tensors
    print(f"torch {torch.__version__}, {T} tensors, medians of {args.reps}, 1 thread")
    for n in (1, 4096):
        for cls in (Lomo, AdaLomo):
            m = Model(T, n)
            plain = median_time(lambda: m().backward(), args.reps)
            for p in m.parameters():
                p.grad = None
            opt = cls(m, lr=1e-4)
            fused = median_time(lambda: opt.fused_backward(m(), 1e-4), args.reps)
            opt.remove()
            native = NativeOptimizer(cls._ALGORITHM)
            ws = [torch.zeros(n) for _ in range(T)]
            gs = [torch.full((n,), 1e-3) for _ in range(T)]
            ids = [native.register_pointer(f"w{k}", w.data_ptr(), 0, (n,)) for k, w in enumerate(ws)]
            ptrs = [g.data_ptr() for g in gs]

            def ctypes_step():
                native.begin(1, 1e-4)
                for i, p in zip(ids, ptrs):
                    native.submit_pointer(i, p, 0, numel=n)
                native.end()

            raw = median_time(ctypes_step, args.reps)
            print(f"{cls.__name__:<8} n={n:<5} plain backward {plain / T * 1e6:7.2f} us/tensor, "
                  f"fused {fused / T * 1e6:7.2f} us/tensor: hook + step {(fused - plain) / T * 1e6:6.2f} us; "
                  f"ctypes submit alone {raw / T * 1e6:6.2f} us")


if __name__ == "__main__":
    main()
