#!/usr/bin/env python3
"""Per-hook cost of the PyTorch binding (issue 17 item 3), CPU.

    LOMO_LIBRARY=target/release/liblomo.so .venv/bin/python benches/hook_cost.py [--reps 21]

A model of T independent parameters of n elements each (loss = Σ_k sum(w_k · x_k)): the time of
one ``fused_backward`` minus the time of a plain ``backward`` of the same graph (gradients
kept), divided by T — what the hook, its checks, ctypes and the library's step add per tensor.
Also the bare ctypes ``lomo_grad_submit_checked`` of the same tensors through lomo_native's NumPy
level (``submit_pointer``). Medians of --reps of the process CPU time (time descheduled on a
shared machine does not count); one thread.

``--compare DIR`` measures, in the same run, the package under DIR (another checkout's
``bindings/python``, e.g. ``git worktree add /tmp/old main``) against this one: each side in
its own process, alternating for --rounds rounds, the best round's figures kept (the machine
is shared; what is compared is the same library through the two packages' hooks).
"""
import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if "--pkg" in sys.argv:
    sys.path.insert(0, sys.argv[sys.argv.index("--pkg") + 1])
else:
    sys.path.insert(0, os.path.join(ROOT, "bindings", "python"))

import json  # noqa: E402
import subprocess  # noqa: E402

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
    """Median process CPU time of fn over reps (the first dropped): CPU time, not wall time, so
    that time spent descheduled on a shared machine does not count (one thread: the backward,
    the hooks and the library all run on it)."""
    ts = []
    for _ in range(reps):
        t = time.process_time()
        fn()
        ts.append(time.process_time() - t)
    return statistics.median(ts[1:])


def paired(fn_a, fn_b, reps):
    """(median a, median b, median of b - a) over reps runs of a then b, back to back (the
    difference of each pair is less disturbed by the load than the difference of medians)."""
    a, b, d = [], [], []
    for _ in range(reps + 1):
        t0 = time.process_time()
        fn_a()
        t1 = time.process_time()
        fn_b()
        t2 = time.process_time()
        a.append(t1 - t0)
        b.append(t2 - t1)
        d.append((t2 - t1) - (t1 - t0))
    return statistics.median(a[1:]), statistics.median(b[1:]), statistics.median(d[1:])


def measure(T, reps):
    """{"Class n": (plain, fused, hook + step, hook alone, ctypes) seconds per tensor}."""
    out = {}
    for n in (1, 4096):
        for cls in (Lomo, AdaLomo):
            m = Model(T, n)
            opt = cls(m, lr=1e-4)

            saved = [dict(p._post_accumulate_grad_hooks) for p in m.ws]

            def without_hooks():  # a plain backward: the hooks taken out, .grad kept
                for p in m.ws:
                    p._post_accumulate_grad_hooks.clear()
                m().backward()
                for p, hs in zip(m.ws, saved):
                    p._post_accumulate_grad_hooks.update(hs)
                    p.grad = None

            t_plain, t_fused, d = paired(without_hooks,
                                         lambda: opt.fused_backward(m(), 1e-4), reps)
            # The hook alone: each parameter's hook called directly on a gradient just set, in
            # an UPDATE phase set up as fused_backward does; minus setting and clearing .grad.
            gs = [torch.full((n,), 1e-3) for _ in range(T)]
            pairs = [(p, g, next(iter(hs.values()))) for p, g, hs in zip(m.ws, gs, saved)]

            def set_only():
                for p, g, _ in pairs:
                    p.grad = g
                    p.grad = None

            def call_hooks():
                opt._native.begin(1, 1e-4)
                opt._phase, opt._pending, opt._submitted, opt._outer_task = 1, {}, set(), -1
                for p, g, hook in pairs:
                    p.grad = g
                    hook(p)
                opt._phase = None
                opt._native.end()

            _, _, d_hook = paired(set_only, call_hooks, reps)
            opt.remove()
            native = NativeOptimizer(cls._ALGORITHM)
            ws = [torch.zeros(n) for _ in range(T)]
            ids = [native.register_pointer(f"w{k}", w.data_ptr(), 0, (n,)) for k, w in enumerate(ws)]
            ptrs = [g.data_ptr() for g in gs]

            def ctypes_step():
                native.begin(1, 1e-4)
                for i, p in zip(ids, ptrs):
                    native.submit_pointer(i, p, 0, numel=n)
                native.end()

            raw = median_time(ctypes_step, reps)
            out[f"{cls.__name__} {n}"] = (t_plain / T, t_fused / T, d / T, d_hook / T, raw / T)
    return out


def show(label, res):
    for key, (plain, fused, d, hook, raw) in res.items():
        name, n = key.split()
        print(f"{label}{name:<8} n={n:<5} plain backward {plain * 1e6:6.2f}, fused {fused * 1e6:6.2f}: "
              f"hook + step {d * 1e6:5.2f} us/tensor; hook called directly {hook * 1e6:5.2f} us; "
              f"ctypes submit alone {raw * 1e6:5.2f} us")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--tensors", type=int, default=256)
    ap.add_argument("--compare", metavar="DIR")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pkg", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    T = args.tensors
    if args.json:
        print("RESULT " + json.dumps(measure(T, args.reps)))
        return
    if not args.compare:
        print(f"torch {torch.__version__}, {T} tensors, medians of {args.reps} (CPU time), 1 thread")
        show("", measure(T, args.reps))
        return
    sides = {"this checkout": os.path.join(ROOT, "bindings", "python"),
             f"{args.compare}": args.compare}
    best = {}
    for _ in range(args.rounds):
        for label, pkg in sides.items():
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--pkg", pkg,
                                  "--json", "--reps", str(args.reps), "--tensors", str(T)],
                                 capture_output=True, text=True, check=True)
            res = json.loads([ln for ln in out.stdout.splitlines()
                              if ln.startswith("RESULT ")][0][7:])
            for key, v in res.items():  # per row, the round where the hook cost least
                old = best.setdefault(label, {}).get(key)
                if old is None or v[3] < old[3]:
                    best[label][key] = v
    print(f"torch {torch.__version__}, {T} tensors, medians of {args.reps} (CPU time), 1 thread, best of "
          f"{args.rounds} alternating rounds, load average {os.getloadavg()[0]:.1f}")
    for label in sides:
        print(f"-- {label}")
        show("", best[label])
    a, b = (best[k] for k in sides)
    for key in a:
        print(f"{key}: hook called directly {b[key][3] * 1e6:.2f} -> {a[key][3] * 1e6:.2f} "
              f"us/tensor ({b[key][3] / a[key][3]:.2f}x); in a backward {b[key][2] * 1e6:.2f} -> "
              f"{a[key][2] * 1e6:.2f} us/tensor")


if __name__ == "__main__":
    main()
