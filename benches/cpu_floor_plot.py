#!/usr/bin/env python3
"""Time per element against tensor size on the CPU: liblomo, lomo-optim 0.1.1 and the memory
floor, from one run; writes a PNG (matplotlib) and prints the table it plots.

    LOMO_LIBRARY=target/release/liblomo.so .venv/bin/python benches/cpu_floor_plot.py \
        [--out docs/cpu_floor.png] [--max-log2 24]

One matrix of 2^k elements (shape 2^⌊k/2⌋ × 2^⌈k/2⌉, k = 6, 8, ..., --max-log2), f32 and bf16,
LOMO and AdaLomo (defaults, lr 1e-4; LOMO also with ``nonfinite_policy="per_element"``, the
one-pass policy): liblomo is one step through its C API (lomo_native's
NumPy level: begin, one ``lomo_grad_submit``, end); lomo-optim its own update path
(``grad_func`` over the one parameter, as ``benches/vs_lomo_optim.py`` times it); the floor a
streaming copy moving the variant's minimum bytes (LOMO 3 × the element size: read g and p, write
p; AdaLomo 5 ×), as in vs_lomo_optim.py. Each point is the median of --reps timings of a loop
long enough to take ≥ 2 ms. By default one thread and the process CPU time (``--clock cpu``):
on a shared machine, wall time also counts the time the process waits for a core, which under
load swamps what is measured (multi-threaded torch waits at every barrier); ``--threads 2
--clock wall`` for a quiet machine.
"""
import argparse
import os
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bindings", "python"))
sys.path.insert(0, os.path.join(ROOT, "bindings", "python", "tests"))
sys.path.insert(0, os.path.join(ROOT, "benches"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from conftest import reference_optimizer  # noqa: E402
from vs_lomo_optim import Native  # noqa: E402


CLOCK = [time.process_time]


def per_call_s(fn, reps, min_s=2e-3):
    now = CLOCK[0]
    fn()
    n, t = 1, 0.0
    while True:  # calibrate the loop length
        t0 = now()
        for _ in range(n):
            fn()
        t = now() - t0
        if t >= min_s:
            break
        n *= 2 if t == 0 else max(2, min(64, int(min_s / t) + 1))
    ts = []
    for _ in range(reps):
        t0 = now()
        for _ in range(n):
            fn()
        ts.append((now() - t0) / n)
    return statistics.median(ts)


def point(k, dtype, algorithm, reps):
    rows, cols = 2 ** (k // 2), 2 ** (k - k // 2)
    n = rows * cols
    torch.manual_seed(0)
    lr = 1e-4
    model = torch.nn.Linear(cols, rows, bias=False).to(dtype)
    g = (torch.randn(rows, cols) * 1e-2).to(dtype)
    ref = reference_optimizer(algorithm, model, lr=lr)
    if algorithm == "adalomo":
        ref.step_num = 1
    p = model.weight

    def run_ref():
        p.grad = g
        ref.grad_func(0)

    t_ref = per_call_s(run_ref, reps)
    w = torch.nn.Linear(cols, rows, bias=False).to(dtype).weight.data
    native = Native(algorithm)
    items = [(native.register("w", w), g)]
    t_ours = per_call_s(lambda: native.step(items, lr), reps)
    t_elem = None
    if algorithm == "lomo":  # the one-pass non-finite policy
        w2 = torch.nn.Linear(cols, rows, bias=False).to(dtype).weight.data
        one = Native(algorithm, nonfinite_policy="per_element")
        items2 = [(one.register("w", w2), g)]
        t_elem = per_call_s(lambda: one.step(items2, lr), reps)
    nbytes = (3 if algorithm == "lomo" else 5) * g.element_size() * n
    src = torch.ones(nbytes // 2, dtype=torch.uint8)
    dst = torch.zeros_like(src)
    t_floor = per_call_s(lambda: dst.copy_(src), reps)
    a, b = src.numpy(), dst.numpy()
    t_floor = min(t_floor, per_call_s(lambda: np.copyto(b, a), reps))
    return n, t_ref, t_ours, t_floor, t_elem


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "cpu_floor.png"))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-log2", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["LOMO_NUM_THREADS"] = str(args.threads)
    CLOCK[0] = time.process_time if args.clock == "cpu" else time.perf_counter
    ks = list(range(6, args.max_log2 + 1, 2))
    load = os.getloadavg()[0]
    print(f"# torch {torch.__version__}, {os.cpu_count()} CPUs, threads {args.threads}, "
          f"{args.clock} time, median of {args.reps}, load average {load:.1f} at the start")
    print("| algorithm | dtype | elements | lomo-optim ns/elem | liblomo ns/elem | floor ns/elem "
          "| speed-up | liblomo / floor | liblomo per-element ns/elem |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = {}
    for algorithm in ("lomo", "adalomo"):
        for dtype in (torch.float32, torch.bfloat16):
            dt = str(dtype).replace("torch.", "")
            for k in ks:
                n, t_ref, t_ours, t_floor, t_elem = point(k, dtype, algorithm, args.reps)
                results.setdefault((algorithm, dt), []).append((n, t_ref, t_ours, t_floor, t_elem))
                el = f"{t_elem / n * 1e9:.3f}" if t_elem is not None else "—"
                print(f"| {algorithm} | {dt} | 2^{k} | {t_ref / n * 1e9:.2f} | {t_ours / n * 1e9:.3f} "
                      f"| {t_floor / n * 1e9:.3f} | {t_ref / t_ours:.1f}x | {t_floor / t_ours:.2f} "
                      f"| {el} |")
                sys.stdout.flush()
    plot(results, args.out, load, args)
    print(f"wrote {args.out}")


def plot(results, out, load, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    colors = {"liblomo": "tab:blue", "lomo-optim 0.1.1": "tab:red", "floor (copy)": "0.3",
              "liblomo per-element": "tab:cyan"}
    for ax, algorithm, title in zip(axes, ("lomo", "adalomo"), ("LOMO", "AdaLomo")):
        for dt, style in (("float32", "-"), ("bfloat16", "--")):
            rows = results[(algorithm, dt)]
            n = [r[0] for r in rows]
            series = [(2, "liblomo"), (1, "lomo-optim 0.1.1"), (3, "floor (copy)")]
            if algorithm == "lomo":
                series.append((4, "liblomo per-element"))
            for idx, label in series:
                ax.plot(n, [r[idx] / r[0] * 1e9 for r in rows], style, marker="o", ms=3,
                        color=colors[label], label=f"{label}, {dt}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{title}: one step of one tensor")
        ax.set_xlabel("tensor elements")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("time per element (ns), log")
    axes[0].legend(fontsize=7, loc="upper right")
    axes[1].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"CPU, {args.threads} thread(s), {args.clock} time (shared 2-vCPU VM, load "
                 f"average {load:.1f}); floor = streaming copy of the minimum bytes", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
