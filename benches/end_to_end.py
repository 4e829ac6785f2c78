#!/usr/bin/env python3
"""Whole training steps of a small GPT on the CPU: liblomo against lomo-optim 0.1.1 and
torch AdamW(foreach=True) — step time, peak memory, optimizer state.

    LOMO_LIBRARY=target/release/liblomo.so .venv/bin/python benches/end_to_end.py [--reps 5]
    ... benches/end_to_end.py --size tiny --reps 1 --rounds 1 --one-process --check   # test.sh's smoke run

The model has the parameter shapes of ``benches/vs_lomo_optim.py``'s small GPT (token embedding
8000×512, 4 pre-LN blocks of width 512 with causal attention of 8 heads and a 4× MLP, final
LayerNorm, untied head: 20.8M parameters, 52 tensors; no position embedding), batch 4 × 128
tokens, cross-entropy on the next token. One step = forward + backward + update:

* ``backward only``: ``loss.backward()`` and ``zero_grad`` — no update (the compute floor);
* ``drop-hook floor``: a post-accumulate-grad hook per parameter that only drops ``.grad`` — the
  memory of any fused step without its arithmetic;
* liblomo ``Lomo`` / ``AdaLomo`` and lomo-optim ``Lomo`` / ``AdaLomo``: ``fused_backward(loss, lr)``
  (defaults; lomo-optim's AdaLomo state is built with ``.cuda()`` made the identity, as the tests'
  reference harness does);
* ``AdamW foreach``: ``backward()``, ``step()``, ``zero_grad()``.

Each variant runs in its own process (so that its peak RSS is its own), one thread by default
(``--threads``); the step time is the process CPU time (``--clock cpu``, the default: on a shared
machine wall time also counts the waits for a core, which under load swamp a step; ``--threads 2
--clock wall`` on a quiet machine), the best (and the median) of --rounds × --reps steps, each round running every variant in
turn after one warm-up step (on a shared machine the best is the figure least disturbed by other
jobs). Memory, from one further step run under
``torch.profiler`` with ``profile_memory=True`` (every allocation and free of PyTorch's CPU
allocator, in time order; the library's own state is not in it and is counted separately):

* ``peak`` — parameters + the largest amount PyTorch held above what it held before the step
  (activations, gradients, temporaries);
* ``bound`` — LOMO's promise: parameters + activations + the largest parameter's gradient, where
  "activations" is the peak of the same forward and a backward that computes every activation
  gradient but no parameter gradient (``autograd.grad`` with respect to the embedding's output,
  profiled the same way); ``peak / bound`` ≤ 1.05 is the aim for the fused steps;
* ``max live grads`` — the largest total of parameter ``.grad`` bytes seen by a post-accumulate-grad
  hook registered before the optimizer's (any gradient that outlives its hook shows up here);
* ``state`` — optimizer state (AdamW's ``exp_avg``/``exp_avg_sq``, lomo-optim's AdaLomo factors,
  liblomo's ``memory_stats()['state_bytes']``);
* ``RSS`` — the process's peak resident set (``ru_maxrss``) and its growth over the steps.

``--one-process`` runs every variant in this process (the smoke run: one start-up instead of
seven; the RSS columns are then the process's). ``--check`` fails when a fused variant's peak exceeds its bound by more than 5 %
or a gradient outlives its hook; it asserts no time.
"""
import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings

warnings.filterwarnings("ignore")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bindings", "python"))
sys.path.insert(0, os.path.join(ROOT, "bindings", "python", "tests"))

VARIANTS = ("backward only", "drop-hook floor", "liblomo Lomo", "lomo-optim Lomo",
            "liblomo AdaLomo", "lomo-optim AdaLomo", "AdamW foreach")
SIZES = {  # vocab, width, heads, layers, batch, tokens
    "small": (8000, 512, 8, 4, 4, 128),
    "tiny": (500, 64, 4, 2, 2, 32),
}
FUSED = ("liblomo Lomo", "lomo-optim Lomo", "liblomo AdaLomo", "lomo-optim AdaLomo")


def make_gpt(size, dtype):
    import torch
    from conftest import Block

    vocab, d, heads, layers, _, _ = SIZES[size]

    class GPT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = torch.nn.Embedding(vocab, d)
            self.blocks = torch.nn.ModuleList(Block(d, heads) for _ in range(layers))
            self.ln = torch.nn.LayerNorm(d)
            self.head = torch.nn.Linear(d, vocab, bias=False)

        def forward(self, idx, x=None):
            x = self.tok(idx) if x is None else x
            for blk in self.blocks:
                x = blk(x)
            return self.head(self.ln(x))

    torch.manual_seed(0)
    return GPT().to(dtype)


def rss_now():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(variant, size, dtype_name, reps, threads, clock):
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    # Every variant imports the same modules before its baseline RSS (lazy imports would
    # otherwise land in one variant's growth and not another's).
    import lomo_optim  # noqa: F401
    from conftest import reference_optimizer
    from lomo_native.torch import AdaLomo, Lomo

    torch.optim.SGD([torch.zeros(1, requires_grad=True)])  # torch.optim's lazy imports (~150 MB)

    dtype = getattr(torch, dtype_name)
    vocab, _, _, _, batch, tokens = SIZES[size]
    model = make_gpt(size, dtype)
    torch.set_num_threads(threads)  # after conftest's import, which sets 1
    now = time.process_time if clock == "cpu" else time.perf_counter
    params = [p for p in model.parameters()]
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    largest = max(p.numel() * p.element_size() for p in params)
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(0, vocab, (batch, tokens + 1), generator=g)
    x, y = seq[:, :-1], seq[:, 1:]
    lr = 1e-4

    def loss_of():
        logits = model(x)
        return torch.nn.functional.cross_entropy(logits.float().view(-1, vocab), y.reshape(-1))

    # Warm-up of PyTorch's lazy initialisation (kernels, autograd engine) before the baseline
    # RSS, keeping one small gradient only: the whole backward runs, no gradient memory stays.
    first = model.blocks[0].ln1.weight
    loss_of().backward(inputs=[first])
    first.grad = None

    live = {"max": 0}

    def watch(p):  # registered first: runs before the optimizer's own hook
        total = sum(q.grad.numel() * q.grad.element_size() for q in params if q.grad is not None)
        live["max"] = max(live["max"], total)

    watchers = [p.register_post_accumulate_grad_hook(watch) for p in params]

    state_bytes = lambda: 0  # noqa: E731
    if variant in ("backward only", "drop-hook floor"):
        if variant == "drop-hook floor":
            def drop(p):
                p.grad = None
            for p in params:
                p.register_post_accumulate_grad_hook(drop)

        def step():
            loss = loss_of()
            loss.backward()
            for p in params:
                p.grad = None
    elif variant.startswith("liblomo"):
        opt = (Lomo if variant.endswith("Lomo") and "Ada" not in variant else AdaLomo)(model, lr=lr)

        def step():
            opt.fused_backward(loss_of(), lr)

        state_bytes = lambda: opt.memory_stats()["state_bytes"]  # noqa: E731
    elif variant.startswith("lomo-optim"):
        opt = reference_optimizer("adalomo" if "Ada" in variant else "lomo", model, lr=lr)

        def step():
            opt.fused_backward(loss_of(), lr)

        def state_bytes():
            tabs = [getattr(opt, k, {}) for k in ("exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col")]
            return sum(t.numel() * t.element_size() for tab in tabs for t in tab.values())
    else:
        opt = torch.optim.AdamW(params, lr=lr, foreach=True)

        def step():
            loss_of().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def state_bytes():
            return sum(t.numel() * t.element_size() for s in opt.state.values()
                       for t in s.values() if torch.is_tensor(t) and t.dim() > 0)

    rss0 = rss_now()
    step()  # warm-up (AdamW allocates its state here)
    ts = []
    for _ in range(reps):
        t = now()
        step()
        ts.append(now() - t)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the profiler's
    # Memory: one more step under the profiler (allocations in time order).
    live["max"] = 0
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("lomo_bench_forward"):
            loss = loss_of()
        with record_function("lomo_bench_rest"):
            if variant in ("backward only", "drop-hook floor"):
                loss.backward()
                for p in params:
                    p.grad = None
            elif variant == "AdamW foreach":
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            else:
                opt.fused_backward(loss, lr)
            del loss
    peak, act = profiled_peak(prof)
    # The same forward, and a backward computing every activation gradient but no parameter
    # gradient (autograd.grad with respect to the embedding's output): parameters + its peak is
    # what the step needs without gradients; LOMO's bound adds the largest gradient.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("lomo_bench_forward"):
            emb = model.tok(x).detach().requires_grad_()
            logits = model(x, emb)
            loss = torch.nn.functional.cross_entropy(logits.float().view(-1, vocab), y.reshape(-1))
            del logits
        with record_function("lomo_bench_rest"):
            torch.autograd.grad(loss, emb)
            del loss, emb
    act_bwd, _ = profiled_peak(prof)
    for w in watchers:
        w.remove()
    return dict(variant=variant, ts=ts, param_bytes=param_bytes,
                largest=largest, act=act, act_bwd=act_bwd, peak=param_bytes + peak,
                bound=param_bytes + act_bwd + largest, live=live["max"], state=state_bytes(),
                rss_peak=rss_peak, rss_growth=rss_peak - rss0,
                n=sum(p.numel() for p in params), tensors=len(params))


def run_variant(args, v, dtype):
    if args.one_process:
        os.environ["LOMO_NUM_THREADS"] = str(args.threads)
        return child(v, args.size, dtype, args.reps, args.threads, args.clock)
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--size", args.size,
                          "--reps", str(args.reps), "--threads", str(args.threads), "--clock",
                          args.clock, "--child", v, dtype], capture_output=True, text=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not line:
        sys.stderr.write(out.stdout + out.stderr)
        raise SystemExit(f"{v} ({dtype}) failed")
    return json.loads(line[0][7:])


def profiled_peak(prof):
    """(peak, held at the end of the forward) of PyTorch's CPU allocations in a profile, in
    bytes above what was allocated when it started."""
    events = prof.profiler.kineto_results.events()
    fwd_end = max(e.end_ns() for e in events if e.name() == "lomo_bench_forward")
    allocs = sorted((e.start_ns(), e.nbytes()) for e in events
                    if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    cur = peak = act = 0
    for t, n in allocs:
        cur += n
        peak = max(peak, cur)
        if t <= fwd_end:
            act = cur
    return peak, act


def mib(b):
    return f"{b / 2**20:.1f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--one-process", action="store_true",
                    help="every variant in this process (smoke runs: the RSS columns are then "
                         "the process's, not the variant's)")
    ap.add_argument("--child", nargs=2, metavar=("VARIANT", "DTYPE"))
    args = ap.parse_args()
    if args.child:
        os.environ["LOMO_NUM_THREADS"] = str(args.threads)
        print("RESULT " + json.dumps(child(args.child[0], args.size, args.child[1], args.reps,
                                           args.threads, args.clock)))
        return 0
    cpu = platform.processor() or "cpu"
    with contextlib.suppress(Exception):
        cpu = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
               if ln.startswith("model name")][0]
    import torch

    vocab, d, heads, layers, batch, tokens = SIZES[args.size]
    print(f"# {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, threads {args.threads}, "
          f"{args.clock} time, "
          f"load average {os.getloadavg()[0]:.1f}; GPT {args.size}: vocab {vocab}, width {d}, "
          f"{layers} blocks, batch {batch}x{tokens}; step times: best and median of "
          f"{args.rounds} rounds x {args.reps} steps per variant")
    failures = []
    for dtype in args.dtypes.split(","):
        rows = []
        for rnd in range(args.rounds):  # rounds interleave the variants (the load drifts)
            for i, v in enumerate(VARIANTS):
                r = run_variant(args, v, dtype)
                if rnd == 0:
                    rows.append(r)
                else:
                    rows[i]["ts"] += r["ts"]
        for r in rows:
            r["ms"] = min(r["ts"]) * 1e3
            r["median"] = statistics.median(r["ts"]) * 1e3
        r0 = rows[0]
        print(f"\n{dtype}: {r0['n'] / 1e6:.1f}M parameters in {r0['tensors']} tensors "
              f"({mib(r0['param_bytes'])} MiB), largest {mib(r0['largest'])} MiB; activations "
              f"{mib(r0['act'])} MiB after the forward, peak {mib(r0['act_bwd'])} MiB with the "
              "backward's activation gradients (no parameter gradient)")
        print("| step | time (best) | median | vs lomo-optim | peak (MiB) | bound P+A+G (MiB) | peak / bound "
              "| max live grads (MiB) | state (MiB) | peak RSS (MiB) | RSS growth (MiB) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        by = {r["variant"]: r for r in rows}
        for r in rows:
            v = r["variant"]
            peer = by.get(v.replace("liblomo", "lomo-optim")) if v.startswith("liblomo") else None
            vs = f"{peer['ms'] / r['ms']:.2f}x" if peer else "—"
            ratio = r["peak"] / r["bound"]
            print(f"| {v} | {r['ms']:.1f} ms | {r['median']:.1f} ms | {vs} | {mib(r['peak'])} | {mib(r['bound'])} "
                  f"| {ratio:.3f} | {mib(r['live'])} | {mib(r['state'])} | {mib(r['rss_peak'])} "
                  f"| {mib(r['rss_growth'])} |")
            if v.startswith("liblomo"):
                if ratio > 1.05:
                    failures.append(f"{v} {dtype}: peak {ratio:.3f} of the bound")
                if r["live"] > r["largest"]:
                    failures.append(f"{v} {dtype}: {r['live']} B of gradients live at once "
                                    f"(largest tensor {r['largest']} B)")
        sys.stdout.flush()
    if args.check and failures:
        print("FAILED: " + "; ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
