#!/usr/bin/env python3
"""AdaLomo against its memory floor, two (or more) builds side by side in one run.

    .venv/bin/python benches/ada_floor_ab.py OLD/liblomo.so target/release/liblomo.so \
        [--rounds 3] [--reps 15] [--shape 4096x4096] [--threads 1]

For each round and each library (alternating, each in its own process with LOMO_LIBRARY set):
one AdaLomo step (lomo_native's NumPy level: begin, one lomo_grad_submit, end; defaults, f32 and
bf16 parameters and gradients, RMS(p) recomputed every step) on one matrix, timed as process CPU
time (median of --reps loops of 10 steps; CPU time, because on a shared machine wall time also
counts the waits for a core), and in the same process the floor: NumPy ``copyto`` moving
AdaLomo's minimum bytes (5 × the element size per element: read g twice, read p, write p — as
2.5 × read + 2.5 × write). Prints step time, floor time and floor / step (1.0 = at the floor).
Asserts nothing.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child(shape, reps):
    sys.path.insert(0, os.path.join(ROOT, "bindings", "python"))
    import numpy as np
    from lomo_native import Optimizer
    from lomo_native import _native as N

    def med(fn, n=10):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.process_time()
            for _ in range(n):
                fn()
            ts.append((time.process_time() - t0) / n)
        return statistics.median(ts)

    rng = np.random.default_rng(0)
    out = []
    for dt in ("f32", "bf16"):
        f = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        gf = (rng.standard_normal(shape) * 1e-2).astype(np.float32)
        if dt == "f32":
            p, g, code = f, gf, N.DTYPE_F32
        else:
            p, g = ((a.view(np.uint32) >> 16).astype(np.uint16) for a in (f, gf))
            code = N.DTYPE_BF16
        opt = Optimizer("adalomo")
        pid = opt.register_pointer("w", p.ctypes.data, code, p.shape, -1)

        def step():
            opt.begin(1, 1e-5)
            opt.submit_pointer(pid, g.ctypes.data, code)
            opt.end()

        t = med(step)
        nb = 5 * p.itemsize * p.size // 2
        a, b = np.ones(nb, np.uint8), np.zeros(nb, np.uint8)
        tf = med(lambda: np.copyto(b, a))
        out.append(f"{dt} {t * 1e3:6.2f} ms, floor {tf * 1e3:5.2f} ms: {tf / t:.2f}")
    print(" | ".join(out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("libs", nargs="*")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--shape", default="4096x4096")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    shape = tuple(int(x) for x in args.shape.split("x"))
    if args.child:
        child(shape, args.reps)
        return
    print(f"# AdaLomo {args.shape}, {args.threads} thread(s), CPU time, median of {args.reps}, "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    for r in range(args.rounds):
        for lib in args.libs:
            env = dict(os.environ, LOMO_LIBRARY=lib, LOMO_NUM_THREADS=str(args.threads))
            res = subprocess.run([sys.executable, __file__, "--child", "--reps", str(args.reps),
                                  "--shape", args.shape], env=env, capture_output=True, text=True)
            line = res.stdout.strip() or res.stderr.strip().splitlines()[-1]
            print(f"round {r + 1}  {lib:<40} {line}")
            sys.stdout.flush()
    print(f"# load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
