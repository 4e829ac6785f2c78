#!/usr/bin/env python3
"""lomo GPU check (driven by scripts/gpu-check.sh): CUDA-vs-CPU parity through the C API on real
hardware, refusal of host buffers, CUDA-graph capture and replay of whole steps, the PyTorch
drop-ins' and the JAX handlers' CUDA-vs-CPU parity (when jax with a CUDA backend is installed;
skipped visibly otherwise; --quick runs the C API parity only), and a benchmark of LOMO/AdaLomo
on bf16 tensors against a device-to-device copy and lomo-optim 0.1.1.

Usage: gpu_check.py parity [--quick] [--emulate] | bench [--emulate]
  --emulate  runs on this CPU with LOMO_CUDA_EMULATE=1 ("device" tensors are host tensors);
             used to test this script without a GPU.
  LOMO_BENCH_SHAPES=4096x4096,...  benchmarks these shapes instead of the three default ones.
Needs: torch, liblomo.so (LOMO_LIBRARY, default target/release/liblomo.so); the C API is reached
through this checkout's Python binding (bindings/python/lomo_native).
"""
import json
import os
import sys
import time

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


def ulp(x, dtype):
    bits, emin = {torch.float16: (10, -14), torch.bfloat16: (7, -126)}[dtype]
    e = torch.floor(torch.log2(x.abs().double().clamp_min(1e-300))).clamp_min(emin)
    return torch.pow(2.0, e - bits)


def close(cpu, dev):
    a, b = cpu.double(), dev.cpu().double()
    if torch.isnan(a).any() or torch.isnan(b).any():
        return False, "NaN"
    if cpu.dtype == torch.float32:
        bad = (a - b).abs() > 2e-6 * torch.maximum(a.abs(), b.abs()) + 1e-7
    else:
        bad = (a - b).abs() > torch.minimum(ulp(a, cpu.dtype), ulp(b, cpu.dtype)).clamp_min(1e-7)
    n = int(bad.sum())
    return n == 0, f"{n} of {a.numel()} differ" + (f", first cpu {a[bad][0]} dev {b[bad][0]}" if n else "")


SHAPES = [(1,), (31,), (4097,), (3, 4097), (3, 5, 7)]


def parity_case(algorithm, pd, gd, steps=3, **fields):
    gen = torch.Generator().manual_seed(1)
    clip = fields.get("clip_grad_norm", 0.0) > 0
    flags = 1 if fields.pop("carry", False) else 0  # a parameter flag, not a config field
    cpu, dev = Opt(algorithm, **fields), Opt(algorithm, **fields)
    cp = [torch.randn(s, generator=gen).to(pd) for s in SHAPES]
    dp = [t.clone().to(DEV) for t in cp]
    for i, (a, b) in enumerate(zip(cp, dp)):
        cpu.register(f"p{i}", a, -1, 0, flags)
        dev.register(f"p{i}", b, 0, 0, flags)
    failures = []
    for step in range(steps):
        scale = cpu.loss_scale()
        gs = [(torch.randn(s, generator=gen) * 0.5 * min(scale, 1e4)) for s in SHAPES]
        if step == 1:
            gs[3].view(-1)[7] = float("nan")
        gc = [g.to(gd) for g in gs]
        gdv = [g.to(DEV) for g in gc]
        for phase in ([0, 1] if clip else [1]):
            cpu.step(phase, 0.01, gc, None)
            dev.step(phase, 0.01, gdv, stream_ptr())
        for i, (a, b) in enumerate(zip(cp, dp)):
            good, msg = close(a, b)
            if not good:
                failures.append(f"step {step} shape {SHAPES[i]}: {msg}")
            b.copy_(a.to(b.device))
        ci, di = cpu.info(), dev.info()
        for f in ("step", "overflow", "skipped", "skipped_total", "grads_nonfinite", "loss_scale", "next_loss_scale"):
            if getattr(ci, f) != getattr(di, f):
                failures.append(f"step {step} info.{f}: cpu {getattr(ci, f)} dev {getattr(di, f)}")
    failures += state_round_trip(algorithm, fields, dev, dp, flags)
    return failures


def state_round_trip(algorithm, fields, dev, dp, flags):
    """The device optimizer's checkpoint (copied through the host) loads into a fresh device
    optimizer and into a CPU one, and both re-serialize to the same bytes."""
    blob = dev.state()
    failures = []
    for device in (0, -1):
        other = Opt(algorithm, **fields)
        for i, b in enumerate(dp):
            t = b if device == 0 else b.cpu()
            other.keep.append(t)
            other.register(f"p{i}", t, device, 0, flags)
        other.load_state(blob)
        if other.state() != blob:
            failures.append(f"checkpoint: loaded into device {device}, re-serialized differently")
    return failures


def parity(quick):
    dts = [torch.float32, torch.float16, torch.bfloat16]
    cases = []
    for algo in (0, 1):
        pairs = [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)] if quick else [(p, g) for p in dts for g in dts]
        for pd, gd in pairs:
            cases.append((algo, pd, gd, {}))
        if not quick:
            for pd, gd in [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)]:
                cases.append((algo, pd, gd, {"clip_grad_norm": 0.5, "clip_grad_value": 0.01, "weight_decay": 0.1}))
                cases.append((algo, pd, gd, {"rounding": 1, "seed": 7, "weight_decay": 0.05}))
                cases.append((algo, pd, gd, {"loss_scale_mode": 2, "loss_scale": 1024.0, "scale_window": 2}))
                if algo == 1:
                    cases.append((algo, pd, gd, {"carry": True}))
    total_fail = 0
    for algo, pd, gd, f in cases:
        fails = parity_case(algo, pd, gd, **dict(f))
        tag = f"{'adalomo' if algo else 'lomo'} p={pd} g={gd} {f}"
        print(("FAIL " if fails else "ok   ") + tag)
        for x in fails[:5]:
            print("     " + x)
        total_fail += bool(fails)
    print(f"parity: {len(cases) - total_fail}/{len(cases)} cases passed")
    return total_fail == 0


def report(check, failures):
    """Prints one check's verdict and its failures; returns whether it passed."""
    print(("FAIL " if failures else "ok   ") + check)
    for x in failures:
        print("     " + x)
    return not failures


def refused(fn):
    """The lomo status of a call expected to fail (0 if it succeeded)."""
    try:
        fn()
    except lomo_native.LomoError as e:
        return e.status
    return 0


def bad_input():
    """Host memory handed to a CUDA optimizer, as a parameter or as a gradient, is refused with
    INVALID_ARGUMENT before any kernel sees it, and a refused gradient leaves the step usable:
    the same step then ends on the device as on the CPU, and the device has no sticky error."""
    if EMULATE:
        print("SKIP bad-input checks: under emulation every address is host memory")
        return True
    failures = []
    host = torch.randn(4097)
    opt = Opt(0)
    st = refused(lambda: opt.register("host", host, 0))
    if st != 2:
        failures.append(f"host memory registered as a CUDA parameter: status {st}, expected 2")
    cpu, dev = Opt(0), Opt(0)
    p = torch.randn(4097)
    d = p.to("cuda")
    cpu.register("p", p, -1)
    dev.register("p", d, 0)
    g = torch.randn(4097)
    stream = stream_ptr()
    cpu.step(1, 0.01, [g], None)
    dev.o.begin(1, 0.01, stream)
    st = refused(lambda: dev.o.submit_pointer(0, host.data_ptr(), 0, stream))
    if st != 2:
        failures.append(f"host memory submitted as a CUDA gradient: status {st}, expected 2")
    gd = g.to("cuda")
    dev.o.submit_pointer(0, gd.data_ptr(), 0, stream)
    dev.o.end(stream)
    torch.cuda.synchronize()
    good, msg = close(p, d)
    if not good:
        failures.append(f"the step after a refused gradient: {msg}")
    return report("bad input: host memory refused, the step goes on", failures)


def graph_capture():
    """Whole steps (NORM and UPDATE phases, dynamic loss scaling) captured once in a CUDA graph
    with torch.cuda.graph and replayed match the same steps run eagerly, bit for bit: a step
    performs no host synchronization and no call that capture forbids, and its device scalars
    (step counter, loss scale, clip coefficient) move on at every replay."""
    if EMULATE:
        print("SKIP graph capture: needs a CUDA device")
        return True
    failures = []
    shapes = [(4097,), (64, 96), (3, 5, 7)]
    for algo in (0, 1):
        fields = {"clip_grad_norm": 1.0, "loss_scale_mode": 2, "loss_scale": 1024.0, "scale_window": 2}
        eager, cap = Opt(algo, **fields), Opt(algo, **fields)
        gen = torch.Generator().manual_seed(3)
        ep = [torch.randn(s, generator=gen).to(torch.bfloat16).to("cuda") for s in shapes]
        cp = [t.clone() for t in ep]
        grads = [(torch.randn(s, generator=gen) * 100).to(torch.bfloat16).to("cuda") for s in shapes]
        for i, (a, b) in enumerate(zip(ep, cp)):
            eager.register(f"p{i}", a, 0)
            cap.register(f"p{i}", b, 0)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture: compiles and loads the kernels
            for o in (eager, cap):
                for phase in (0, 1):
                    o.step(phase, 0.01, grads, stream_ptr())
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                for phase in (0, 1):
                    cap.step(phase, 0.01, grads, stream_ptr())
        except Exception as e:  # noqa: BLE001 - report any capture failure as a check failure
            failures.append(f"{'adalomo' if algo else 'lomo'}: capture failed: {e}")
            continue
        for _ in range(4):
            graph.replay()
            for phase in (0, 1):
                eager.step(phase, 0.01, grads, stream_ptr())
        torch.cuda.synchronize()
        tag = "adalomo" if algo else "lomo"
        for i, (a, b) in enumerate(zip(ep, cp)):
            if not torch.equal(a, b):
                d = (a.float() - b.float()).abs().max().item()
                failures.append(f"{tag} shape {shapes[i]}: replayed graph differs (max |diff| {d})")
        ei, ci = eager.info(), cap.info()
        for f in ("step", "skipped_total", "loss_scale", "next_loss_scale", "clip_coef"):
            if getattr(ei, f) != getattr(ci, f):
                failures.append(f"{tag} info.{f}: eager {getattr(ei, f)} graph {getattr(ci, f)}")
        if ci.step != 5:
            failures.append(f"{tag}: {ci.step} steps after warm-up + 4 replays, expected 5")
    return report("graph capture: 4 replays of a captured step = 4 eager steps", failures)


def torch_parity():
    """The PyTorch drop-ins (lomo_native.torch) on a CUDA module against the same module on the
    CPU: Lomo and AdaLomo (with clip_grad_norm), f32 and bf16, three steps. The loss is linear in
    the parameters, so both devices get bit-identical gradients through their own backward and
    hooks; parameters are compared per element after every step (then re-synchronized)."""
    use_bindings()
    from lomo_native.torch import AdaLomo, Lomo

    class M(torch.nn.Module):
        def __init__(self, dtype):
            super().__init__()
            gen = torch.Generator().manual_seed(3)
            self.weight = torch.nn.Parameter(torch.randn(64, 48, generator=gen).to(dtype))
            self.bias = torch.nn.Parameter(torch.randn(48, generator=gen).to(dtype))

    failures = 0
    for cls, kw in ((Lomo, {}), (AdaLomo, {"clip_grad_norm": 1.0})):
        for dtype in (torch.float32, torch.bfloat16):
            mc, md = M(dtype), M(dtype).to(DEV)
            oc, od = cls(mc, lr=0.01, **kw), cls(md, lr=0.01, **kw)
            gen = torch.Generator().manual_seed(4)
            bad = []
            for step in range(3):
                cw, cb = torch.randn(64, 48, generator=gen), torch.randn(48, generator=gen)
                for m, o in ((mc, oc), (md, od)):
                    dev = m.weight.device

                    def loss():
                        return (m.weight.float() * cw.to(dev)).sum() + (m.bias.float() * cb.to(dev)).sum()

                    if kw:
                        o.grad_norm(loss())
                    o.fused_backward(loss(), 0.01)
                for (name, a), b in zip(mc.named_parameters(), md.parameters()):
                    good, msg = close(a.detach(), b.detach())
                    if not good:
                        bad.append(f"step {step} {name}: {msg}")
                    with torch.no_grad():
                        b.copy_(a.to(b.device))
            print(("FAIL " if bad else "ok   ") + f"torch drop-in {cls.__name__} {dtype} {kw}")
            for x in bad[:5]:
                print("     " + x)
            failures += bool(bad)
    print(f"torch drop-in parity: {4 - failures}/4 cases passed")
    return failures == 0


def jax_parity():
    """lomo_native.jax on the CUDA platform against the CPU platform (same inputs): the functional
    updates for three dtype pairs, the option sets and every shape, with and without donation,
    and three steps of the pytree optimizer with clip_grad_norm and dynamic loss scaling."""
    try:
        import jax
        import jax.numpy as jnp
        import numpy as np
    except ImportError:
        print("SKIP jax parity: jax is not installed")
        return True
    try:
        gpu, cpu = jax.devices("cuda")[0], jax.devices("cpu")[0]
    except RuntimeError as e:
        print(f"SKIP jax parity: this jax has no CUDA backend ({e})")
        return True
    use_bindings()
    from lomo_native import jax as lj

    tdt = {jnp.dtype(jnp.float32): torch.float32, jnp.dtype(jnp.float16): torch.float16,
           jnp.dtype(jnp.bfloat16): torch.bfloat16}

    def on(dev, fn, updated, grad, donate):
        """fn(updated, grad) on dev; `updated` (param and state) donated when `donate`."""
        updated, grad = jax.device_put((updated, grad), dev)
        out = jax.jit(fn, donate_argnums=(0,) if donate else ())(updated, grad)
        return jax.tree_util.tree_leaves(jax.device_get(out))

    def compare(tag, c_out, g_out, n_params):
        """The first n_params outputs are parameters (close()); the rest are state and flags:
        f32 within 2e-5 relative (AdaLomo state; NaN only where both are NaN), others exact."""
        fails = []
        for k, (a, b) in enumerate(zip(c_out, g_out)):
            a, b = np.asarray(a), np.asarray(b)
            if k < n_params:
                dt = tdt[jnp.dtype(a.dtype)]
                good, msg = close(torch.from_numpy(a.astype(np.float32)).to(dt),
                                  torch.from_numpy(b.astype(np.float32)).to(dt))
            elif a.dtype == np.float32:
                x, y = a.astype(np.float64), b.astype(np.float64)
                bad = ~((np.abs(x - y) <= 2e-5 * np.maximum(np.abs(x), np.abs(y)))
                        | (np.isnan(x) & np.isnan(y)))
                good, msg = not bad.any(), f"{int(bad.sum())} of {a.size} differ"
            else:
                good, msg = np.array_equal(a, b), f"cpu {a} cuda {b}"
            if not good:
                fails.append(f"{tag} output {k}: {msg}")
        return fails

    rng = np.random.default_rng(3)
    fails, n = [], 0
    option_sets = [{}, {"weight_decay": 0.1, "clip_grad_value": 0.01, "lr_multiplier": 0.5},
                   {"rounding": "stochastic", "seed": 7, "param_id": 3}]
    for algo in ("lomo", "adalomo"):
        for pd, gd in [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.bfloat16), (jnp.float16, jnp.float32)]:
            for opts in option_sets:
                for i, shape in enumerate(SHAPES):
                    p = jnp.asarray(rng.standard_normal(shape), pd)
                    g = jnp.asarray(rng.standard_normal(shape) * 0.5, gd)
                    if algo == "lomo":
                        upd = (p,)
                        fn = lambda u, g, o=opts: lj.lomo_update(u[0], g, lr=0.01, step=3, **o)  # noqa: E731
                    else:
                        upd = (p, lj.adalomo_state(p))
                        fn = lambda u, g, o=opts: lj.adalomo_update(u[0], g, u[1], lr=0.01, step=1, **o)  # noqa: E731
                    tag = f"{algo} p={jnp.dtype(pd)} g={jnp.dtype(gd)} {opts} {shape}"
                    fails += compare(tag, on(cpu, fn, upd, g, False), on(gpu, fn, upd, g, i % 2 == 0), 1)
                    n += 1
    for algo in ("lomo", "adalomo"):
        opt = (lj.lomo if algo == "lomo" else lj.adalomo)(
            clip_grad_norm=1.0, loss_scale_mode="dynamic", loss_scale=1024.0, scale_window=2, weight_decay=0.01)
        params = [jnp.asarray(rng.standard_normal(s), jnp.bfloat16) for s in SHAPES]
        results = {}
        for name, dev in (("cpu", cpu), ("cuda", gpu)):
            ps = jax.device_put(params, dev)
            st = jax.device_put(opt.init(ps), dev)
            srng = np.random.default_rng(5)
            step = jax.jit(opt.step)
            for t in range(3):
                gs = [jnp.asarray(srng.standard_normal(s) * 0.5 * 1024.0, jnp.bfloat16) for s in SHAPES]
                if t == 1:
                    gs[3] = gs[3].at[0, 7].set(jnp.nan)
                ps, st = step(ps, jax.device_put(gs, dev), st, 0.01)
            results[name] = jax.tree_util.tree_leaves(jax.device_get((ps, st)))
        fails += compare(f"{algo} optimizer, 3 steps", results["cpu"], results["cuda"], len(SHAPES))
        n += 1
    for x in fails[:20]:
        print("FAIL " + x)
    print(f"jax parity: {n} cases, {len(fails)} mismatching outputs")
    return not fails


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
    return out


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


if __name__ == "__main__":
    if not EMULATE and not torch.cuda.is_available():
        sys.exit("no CUDA device visible to torch")
    print("lomo_cuda_available:", lomo_native.cuda_available())
    if "parity" in sys.argv:
        quick = "--quick" in sys.argv
        good = parity(quick)
        good = bad_input() and good
        good = graph_capture() and good
        if quick:  # the sanitizer runs: the C API only
            print("SKIP torch drop-in and jax parity: --quick")
        else:
            good = torch_parity() and good
            good = jax_parity() and good
        sys.exit(0 if good else 1)
    if "bench" in sys.argv:
        res = bench()
        path = os.environ.get("LOMO_BENCH_JSON")
        if path:
            with open(path, "w") as f:
                json.dump(res, f, indent=1)
