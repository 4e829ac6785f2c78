"""lomo GPU benchmark (gpu_check.py bench): LOMO and AdaLomo on bf16 tensors, each phase timed by
CUDA events against a measured device-to-device copy, the kernels of each phase with their times
(CUPTI), and lomo-optim 0.1.1 on the same tensors when it is installed; then the kernel launches
per step of a Llama-2-7B-shaped registration, counted by the library, with gradients submitted
one by one and in batches (lomo_grad_submit_batch). LOMO_BENCH_SHAPES
(e.g. "4096x4096,32000x4096") replaces the three default shapes; LOMO_BENCH_JSON names a file for
the results."""
import json
import os
import time

import torch

from gpu_common import DEV, EMULATE, Opt, stream_ptr

def timed(fn, iters):
    if EMULATE:
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t) / iters
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def kernels(fn):
    """The GPU kernels one call of fn launches, as [name, microseconds] (torch.profiler through
    CUPTI, which sees launches through the driver API too); None under emulation (fn still
    runs) or when profiling fails."""
    if EMULATE:
        fn()
        return None
    try:
        from torch.profiler import ProfilerActivity, profile
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return [[e.name, round(e.time_range.elapsed_us(), 1)] for e in prof.events()
                if e.device_type == torch.autograd.DeviceType.CUDA
                and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
    except Exception as e:  # noqa: BLE001 - a diagnostic, never a reason to stop benchmarking
        print(f"kernel profile failed: {e!r}")
        return None


def timed_phase(before, fn, after, iters):
    """Seconds per call of fn, timed by events around fn alone; before() and after() run
    untimed around each call (the NORM phase ahead of a timed UPDATE phase, or the UPDATE phase
    after a timed NORM phase)."""
    if EMULATE:
        total = 0.0
        for _ in range(iters):
            before()
            t = time.perf_counter()
            fn()
            total += time.perf_counter() - t
            after()
        return total / iters
    before(), fn(), after()
    pairs = []
    for _ in range(iters):
        before()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        after()
        pairs.append((a, b))
    torch.cuda.synchronize()
    return sum(a.elapsed_time(b) for a, b in pairs) / 1e3 / iters


# (name, algorithm, bytes per element, parameter flags, config fields, timed phase, lomo-optim)
# Bytes per element are the floor of each pass on bf16 (design.md / notes/performance.md):
# LOMO after a NORM phase reads g and p and writes p (6); without one it also pre-reads g for
# the non-finite check (8); the NORM pass reads g (2); AdaLomo reads g and p for its statistics
# and g and p again and writes p to apply (10), or 8 with the parameter RMS carried.
BENCH_ROWS = [
    ("LOMO update after NORM", 0, 6, 0, {"clip_grad_norm": 1.0}, "update", False),
    ("LOMO NORM pass", 0, 2, 0, {"clip_grad_norm": 1.0}, "norm", False),
    ("LOMO update, no NORM", 0, 8, 0, {}, "update", True),
    ("AdaLomo", 1, 10, 0, {"loss_scale_mode": 0}, "update", True),
    ("AdaLomo carried RMS", 1, 8, 1, {"loss_scale_mode": 0}, "update", False),
]


def bench():
    shapes = [(256, 256), (256, 1024)] if EMULATE else [(4096, 4096), (4096, 11008), (32000, 4096)]
    if os.environ.get("LOMO_BENCH_SHAPES"):  # e.g. "4096x4096,32000x4096"
        shapes = [tuple(int(d) for d in x.split("x")) for x in os.environ["LOMO_BENCH_SHAPES"].split(",")]
    iters = 2 if EMULATE else 20
    src = torch.empty(256 << 20 if not EMULATE else 1 << 20, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    copy_s = timed(lambda: dst.copy_(src), iters)
    copy_bw = 2 * src.numel() / copy_s
    out = {"device": "emulated" if EMULATE else torch.cuda.get_device_name(), "copy_GBps": copy_bw / 1e9, "rows": []}
    print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write)")
    try:
        import lomo_optim  # noqa: F401
        have_ref = True
    except ImportError:
        have_ref = False
        print("lomo-optim not installed: no speed-up column")
    for shape in shapes:
        n = shape[0] * shape[1]
        for name, algo, bpe, flags, fields, phase, vs_ref in BENCH_ROWS:
            p = torch.randn(shape, device=DEV).to(torch.bfloat16)
            g = (torch.randn(shape, device=DEV) * 1e-3).to(torch.bfloat16)
            opt = Opt(algo, **fields)
            opt.register("w", p, 0, 0, flags)
            s = stream_ptr()
            norm = lambda: opt.step(0, 1e-4, [g], s)  # noqa: E731
            update = lambda: opt.step(1, 1e-4, [g], s)  # noqa: E731
            nothing = lambda: None  # noqa: E731
            if "clip_grad_norm" not in fields:
                secs, whole = timed_phase(nothing, update, nothing, iters), update
            elif phase == "norm":
                secs, whole = timed_phase(nothing, norm, update, iters), norm
            else:
                secs, whole = timed_phase(norm, update, nothing, iters), update
            bw = bpe * n / secs
            row = {"shape": list(shape), "algo": name, "bytes_per_elem": bpe, "ms": secs * 1e3,
                   "GBps": bw / 1e9, "frac_copy": bw / copy_bw}
            if "clip_grad_norm" in fields and phase == "update":
                norm()  # the profiled UPDATE phase needs its NORM phase first
            ks = kernels(whole)  # the timed phase: begin, submit, end
            if "clip_grad_norm" in fields and phase == "norm":
                update()  # ends the step the profiled NORM phase began
            if ks is not None:
                row["kernels_per_phase"] = len(ks)
                row["kernels_us"] = ks
            if have_ref and vs_ref and not (EMULATE and algo == 1):  # AdaLomo needs .cuda()
                try:
                    row["lomo_optim_ms"] = ref_time(algo, p, g, iters) * 1e3
                    row["speedup"] = row["lomo_optim_ms"] / row["ms"]
                except Exception as e:  # report, keep benchmarking
                    row["lomo_optim_error"] = repr(e)
            out["rows"].append(row)
            print(json.dumps(row))
    try:
        out["launches_per_step"] = launches_per_step()
    except Exception as e:  # noqa: BLE001 - report, keep the benchmark's results
        print(f"launches per step failed: {e!r}")
        out["launches_per_step_error"] = repr(e)
    return out


def llama_shapes(d, f, v, layers):
    """A Llama-shaped registration: embedding [v, d]; per layer q, k, v, o [d, d], gate and up
    [f, d], down [d, f], two norm weights [d]; final norm [d]; head [v, d]."""
    layer = [(d, d)] * 4 + [(f, d), (f, d), (d, f), (d,), (d,)]
    return [(v, d)] + layer * layers + [(d,), (v, d)]


def launches_per_step():
    """Kernel launches per step of a Llama-2-7B-shaped registration (bf16; scaled down to d 128,
    f 344, V 256, 4 layers under --emulate), counted by the library (lomo_cuda_launch_count):
    gradients submitted one by one, per layer (9 per batch, as a trainer handing over a layer's
    gradients at once) and as one batch (lomo_grad_submit_batch: small tensors share launches)."""
    d, f, v, layers = (128, 344, 256, 4) if EMULATE else (4096, 11008, 32000, 32)
    shapes = llama_shapes(d, f, v, layers)
    numels = [int(torch.Size(s).numel()) for s in shapes]
    big = torch.full((max(numels),), 1e-3, dtype=torch.bfloat16, device=DEV)
    grads = [big[:n].view(s) for n, s in zip(numels, shapes)]
    params = [torch.zeros(s, dtype=torch.bfloat16, device=DEV) for s in shapes]
    s = stream_ptr()
    rows = []
    for name, algo, fields in [("LOMO, NORM + UPDATE", 0, {"clip_grad_norm": 1.0}),
                               ("LOMO, UPDATE only", 0, {}),
                               ("AdaLomo, UPDATE only", 1, {"loss_scale_mode": 0})]:
        opt = Opt(algo, **fields)
        for i, p in enumerate(params):
            opt.register(f"p{i}", p, 0)
        o = opt.o
        phases = [0, 1] if "clip_grad_norm" in fields else [1]

        def submit(mode):
            if mode == "separate":
                for i, g in enumerate(grads):
                    o.submit_pointer(i, g.data_ptr(), 2, s, g.numel())
                return
            n = len(grads)
            if mode == "per layer":  # the embedding, each layer's 9, the final norm and head
                parts = [[0]] + [list(range(1 + 9 * k, 10 + 9 * k)) for k in range(layers)]
                parts.append([n - 2, n - 1])
            else:
                parts = [list(range(n))]
            for part in parts:
                o.submit_pointers(part, [grads[i].data_ptr() for i in part], [2] * len(part),
                                  [grads[i].numel() for i in part], s)

        row = {"registration": f"Llama d={d} f={f} V={v} layers={layers} ({len(shapes)} tensors)",
               "algo": name}
        for mode in ["separate", "per layer", "one batch"]:
            for phase in phases:  # a warm-up step: kernels compiled, counts unaffected
                o.begin(phase, 1e-6, s)
                submit(mode)
                o.end(s)
            before = o.cuda_launch_count()
            for phase in phases:
                o.begin(phase, 1e-6, s)
                submit(mode)
                o.end(s)
            row[f"launches_{mode.replace(' ', '_')}"] = o.cuda_launch_count() - before
        rows.append(row)
        print(json.dumps(row))
    return rows


def ref_time(algo, p, g, iters):
    """lomo-optim 0.1.1's update of one tensor: fused_backward on loss = (W·G).sum() (dL/dW = G),
    minus the same backward without the optimizer."""
    from lomo_optim import AdaLomo, Lomo
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(p.clone())
    gf = g.clone()
    opt = AdaLomo(model, lr=1e-4, loss_scale=1.0) if algo else Lomo(model, lr=1e-4)

    def step():
        loss = (model.w * gf).sum()
        opt.fused_backward(loss, 1e-4)

    def plain():
        loss = (model.w * gf).sum()
        loss.backward()
        model.w.grad = None

    return max(timed(step, iters) - timed(plain, iters), 1e-9)
