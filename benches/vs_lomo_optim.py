#!/usr/bin/env python3
"""Side-by-side CPU benchmark: lomo-optim 0.1.1 (PyTorch) versus liblomo, in one process.

    LOMO_LIBRARY=target/release/liblomo.so .venv/bin/python benches/vs_lomo_optim.py [--reps 7]

Needs torch, transformers and lomo-optim==0.1.1 (scripts/test.sh installs them into .venv).
Both sides use the same tensors and 2 threads. lomo-optim is timed on its own per-parameter
update path (`grad_func`, which scans the parameters and applies `fuse_update` to each one that
holds a gradient); liblomo through its C API (lomo_native's NumPy level, one C call each), one
`lomo_grad_submit` per parameter.
Each figure is the median of --reps runs; the ratio column is what to quote.

The same run also measures, per row, the memory floor: a streaming copy (the faster of torch
``copy_`` with the same threads and NumPy ``copyto``) moving the variant's minimum bytes (LOMO: read g and p, write p = 3 × the element size,
12 B/elem f32, 6 bf16; AdaLomo 5 × = 20 / 10), and reports liblomo as a fraction of it
(floor time / liblomo time; 1.0 = at the floor). LOMO rows also time liblomo with
``nonfinite_policy="per_element"`` (one pass) and PyTorch's one-line update
``p.mul_(1 - lr·wd).add_(g, alpha=-lr)`` without weight decay, i.e. ``p.add_(g, alpha=-lr)``.
"""
import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bindings", "python"))  # lomo_native, if not installed
sys.path.insert(0, os.path.join(ROOT, "bindings", "python", "tests"))  # conftest's shim

import torch  # noqa: E402
from conftest import reference_optimizer  # noqa: E402
from lomo_native.core import Optimizer  # noqa: E402

DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
PHASE_UPDATE = 1


class Native:
    """liblomo through lomo_native's NumPy-level optimizer (each call is one C function)."""

    def __init__(self, algorithm, **config):
        self.opt = Optimizer(algorithm, **config)
        self.keep = []

    def register(self, name, t):
        self.keep.append(t)
        return self.opt.register_pointer(name, t.data_ptr(), DTYPES[t.dtype], t.shape)

    def step(self, items, lr):
        self.opt.begin(PHASE_UPDATE, lr)
        for pid, g in items:
            self.opt.submit_pointer(pid, g.data_ptr(), DTYPES[g.dtype])
        self.opt.end()


def median_ms(fn, reps):
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def model_for(kind, dtype):
    torch.manual_seed(0)
    if kind == "4096x4096":
        return torch.nn.Linear(4096, 4096, bias=False).to(dtype)
    # A small GPT-style stack: 4 blocks of width 512, vocabulary 8000 (20.8M parameters in 52 tensors).
    d, layers, vocab = 512, 4, 8000
    mods = [torch.nn.Embedding(vocab, d)]
    for _ in range(layers):
        mods += [torch.nn.LayerNorm(d), torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d),
                 torch.nn.LayerNorm(d), torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)]
    mods += [torch.nn.LayerNorm(d), torch.nn.Linear(d, vocab, bias=False)]
    return torch.nn.Sequential(*mods).to(dtype)


def bench(kind, dtype, algorithm, reps):
    model = model_for(kind, dtype)
    params = list(model.named_parameters())
    grads = [torch.randn(p.shape).to(dtype) * 1e-2 for _, p in params]
    lr = 1e-4
    ref = reference_optimizer(algorithm, model, lr=lr)
    if algorithm == "adalomo":
        ref.step_num = 1  # as inside fused_backward

    def run_ref():
        for (_, p), g in zip(params, grads):
            p.grad = g
        ref.grad_func(0)

    t_ref = median_ms(run_ref, reps)
    with torch.no_grad():
        model2 = model_for(kind, dtype)
    native = Native(algorithm)
    items = [(native.register(n, p.data), g) for (n, p), g in zip(model2.named_parameters(), grads)]
    t_ours = median_ms(lambda: native.step(items, lr), reps)
    n = sum(p.numel() for _, p in params)
    t_elem = t_add = None
    if algorithm == "lomo":
        with torch.no_grad():
            model3 = model_for(kind, dtype)
        one = Native(algorithm, nonfinite_policy="per_element")
        items3 = [(one.register(m, p.data), g) for (m, p), g in zip(model3.named_parameters(), grads)]
        t_elem = median_ms(lambda: one.step(items3, lr), reps)
        ps = [p.data for p in model3.parameters()]

        def run_add():
            for p, g in zip(ps, grads):
                p.add_(g, alpha=-lr)

        t_add = median_ms(run_add, reps)
    elem = torch.finfo(dtype).bits // 8
    floor_bytes = (3 if algorithm == "lomo" else 5) * elem
    t_floor = floor_ms(n * floor_bytes, reps)
    return n, t_ref, t_ours, t_elem, t_add, t_floor, floor_bytes


def floor_ms(nbytes, reps):
    """A streaming copy reading nbytes/2 and writing nbytes/2 (buffers touched before timing):
    the faster of torch ``copy_`` (the benchmark's 2 threads; on a shared VM its 2-thread
    timings often quantize to 8 ms) and NumPy ``copyto`` (one thread)."""
    import numpy as np

    src = torch.ones(nbytes // 2, dtype=torch.uint8)
    dst = torch.zeros_like(src)
    t_torch = median_ms(lambda: dst.copy_(src), reps)
    a, b = src.numpy(), dst.numpy()
    return min(t_torch, median_ms(lambda: np.copyto(b, a), reps))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(2)
    cpu = platform.processor() or "cpu"
    with contextlib.suppress(Exception):
        cpu = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")][0]
    print(f"# {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, threads 2, median of {args.reps}")
    print("| tensor(s) | dtype | algorithm | elements | lomo-optim 0.1.1 | liblomo | speed-up "
          "| liblomo per-element | torch add_ | floor (copy) | liblomo / floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for kind in ("4096x4096", "small GPT"):
        for dtype in (torch.float32, torch.bfloat16):
            for algorithm, name in (("lomo", "LOMO"), ("adalomo", "AdaLomo")):
                n, t_ref, t_ours, t_elem, t_add, t_floor, fb = bench(kind, dtype, algorithm,
                                                                   args.reps)
                dt = str(dtype).replace("torch.", "")
                el = f"{t_elem:.2f} ms" if t_elem is not None else "—"
                ad = f"{t_add:.2f} ms" if t_add is not None else "—"
                print(f"| {kind} | {dt} | {name} | {n/1e6:.1f}M | {t_ref:.1f} ms | {t_ours:.2f} ms "
                      f"| {t_ref/t_ours:.1f}x | {el} | {ad} | {t_floor:.2f} ms ({fb} B/elem) "
                      f"| {t_floor/t_ours:.2f} |")
                sys.stdout.flush()

if __name__ == "__main__":
    main()
