#!/usr/bin/env python3
"""lomo GPU check (driven by scripts/gpu-check.sh): CUDA-vs-CPU parity through the C API on real
hardware, refusal of host buffers, CUDA-graph capture and replay of whole steps, the PyTorch
drop-ins' and the JAX handlers' CUDA-vs-CPU parity (when jax with a CUDA backend is installed;
skipped visibly otherwise; --quick runs the C API parity only), and the benchmark of
scripts/gpu_bench.py (LOMO/AdaLomo on bf16 tensors against a device-to-device copy and
lomo-optim 0.1.1).

Usage: gpu_check.py parity [--quick] [--emulate] | bench [--emulate]
  --emulate  runs on this CPU with LOMO_CUDA_EMULATE=1 ("device" tensors are host tensors);
             used to test this script without a GPU.
  LOMO_BENCH_SHAPES=4096x4096,...  benchmarks these shapes instead of the three default ones.
Needs: torch, liblomo.so (LOMO_LIBRARY, default target/release/liblomo.so); the C API is reached
through this checkout's Python binding (bindings/python/lomo_native; scripts/gpu_common.py).
"""
import os
import sys

import torch

from gpu_common import DEV, EMULATE, Opt, lomo_native, stream_ptr, use_bindings


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
    accum = fields.pop("accum", None)  # (k, buffer, reduction): lomo_accum_enable, k micro-batches
    cpu, dev = Opt(algorithm, **fields), Opt(algorithm, **fields)
    cp = [torch.randn(s, generator=gen).to(pd) for s in SHAPES]
    dp = [t.clone().to(DEV) for t in cp]
    for i, (a, b) in enumerate(zip(cp, dp)):
        cpu.register(f"p{i}", a, -1, 0, flags)
        dev.register(f"p{i}", b, 0, 0, flags)
    if accum:
        for o in (cpu, dev):
            o.o.accum_enable(accum[1], accum[2])
    failures = []
    for step in range(steps):
        scale = cpu.loss_scale()
        for _ in range(accum[0] - 1 if accum else 0):  # ACCUMULATE phases: micro-batches 1..k-1
            gm = [(torch.randn(s, generator=gen) * 0.5 * min(scale, 1e4)).to(gd) for s in SHAPES]
            cpu.step(2, 0.0, gm, None)
            dev.step(2, 0.0, [g.to(DEV) for g in gm], stream_ptr())
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
            # gradient accumulation: buffers in device memory, kernels/accum.cu
            cases.append((algo, torch.bfloat16, torch.bfloat16,
                          {"accum": (3, "f32", "sum"), "clip_grad_norm": 0.5}))
            cases.append((algo, torch.float16, torch.float16,
                          {"accum": (2, "param", "mean"), "loss_scale_mode": 2,
                           "loss_scale": 1024.0, "scale_window": 2}))
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
    cases = ((Lomo, {}), (AdaLomo, {"clip_grad_norm": 1.0}),
             (AdaLomo, {"clip_grad_norm": 1.0, "accumulation_steps": 2}))  # buffers on the device
    for cls, kw in cases:
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

                    for _ in range(kw.get("accumulation_steps", 1)):  # micro-batches
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
    print(f"torch drop-in parity: {2 * len(cases) - failures}/{2 * len(cases)} cases passed")
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
        import json

        from gpu_bench import bench

        res = bench()
        path = os.environ.get("LOMO_BENCH_JSON")
        if path:
            with open(path, "w") as f:
                json.dump(res, f, indent=1)
