"""A/B of two builds, bit for bit: runs deterministic multi-step scenarios through the C API
(LOMO and AdaLomo; f32/f16/bf16 parameters and gradients; norm and value clipping, weight decay
and groups, dynamic scaling with injected inf/NaN, stochastic rounding, carried RMS; shapes from
1-D to [300, 300], empty ones included) and prints one line per step: a hash of every parameter
(and AdaLomo's state) plus the step diagnostics. A refactoring that claims unchanged behaviour
prints the same lines as the build before it:

    for lib in old/liblomo.so new/liblomo.so; do
      LOMO_LIBRARY=$lib PYTHONPATH=bindings/python .venv/bin/python scripts/ab_steps.py > $lib.txt
    done; cmp old/liblomo.so.txt new/liblomo.so.txt

AB_DEVICE=0 with LOMO_CUDA_EMULATE=1 runs the CUDA backend (emulated; host memory); the
emulation is deterministic, so its lines compare too. LOMO_CPU_LEVEL=baseline for the portable
CPU path."""
import hashlib, itertools, os, sys
import numpy as np
from lomo_native import Optimizer
from lomo_native import _native as N

DEV = int(os.environ.get("AB_DEVICE", "-1"))
SHAPES = [(1,), (31,), (4097,), (3, 4097), (3, 5, 7), (16, 64), (0,), (2, 0), (300, 300)]
CODES = {"f32": N.DTYPE_F32, "f16": N.DTYPE_F16, "bf16": N.DTYPE_BF16}

def make(dt, vals):
    f = vals.astype(np.float32)
    if dt == "f32":
        return f.copy()
    if dt == "f16":
        return f.astype(np.float16)
    return (f.view(np.uint32) >> 16).astype(np.uint16)  # truncation: any bf16 values will do

def run(alg, cfg, pdt, gdt, carry, inject, groups, out):
    rng = np.random.default_rng(1234)
    opt = Optimizer(alg, **cfg)
    if groups:
        opt.group_set(1, 0.5, 0.03)
    params, ids = [], []
    for i, s in enumerate(SHAPES):
        p = make(pdt, rng.standard_normal(s))
        params.append(p)
        ids.append(opt.register_pointer(f"p{i}", p.ctypes.data if p.size else 0, CODES[pdt], s,
                                        DEV, group=(i % 2) if groups else 0, flags=int(carry)))
    norm = cfg.get("clip_grad_norm", 0) > 0
    for step in range(5):
        scale = opt.loss_scale
        grads = []
        for i, s in enumerate(SHAPES):
            g = rng.standard_normal(s) * 0.5 * min(scale, 1e4)
            if inject and (step, i) in inject and g.size:
                g.flat[g.size // 2] = np.inf if step % 2 else np.nan
            grads.append(make(gdt, g))
        lr = [1e-2, 3e-3, 5e-2][step % 3]
        for phase in ([0, 1] if norm else [1]):
            opt.begin(phase, lr)
            for i in ids:
                opt.submit_pointer(i, grads[i].ctypes.data if grads[i].size else 0, CODES[gdt])
            opt.end()
        h = hashlib.sha256()
        for p in params:
            h.update(p.tobytes())
        if opt.supports_state() and alg == "adalomo":
            h.update(opt.state_bytes())
        info = opt.step_info()
        print(alg, cfg, pdt, gdt, carry, bool(inject), groups, step, h.hexdigest()[:16], info, file=out)

configs = [
    {},
    {"clip_grad_norm": 1.0},
    {"clip_grad_value": 0.05, "weight_decay": 0.01},
    {"loss_scale_mode": "dynamic", "loss_scale": 1024.0, "scale_window": 2},
    {"rounding": "stochastic", "seed": 7},
    {"clip_grad_norm": 0.5, "loss_scale_mode": "dynamic", "loss_scale": 256.0, "weight_decay": 0.02},
]
for alg, cfg, (pdt, gdt) in itertools.product(["lomo", "adalomo"], configs,
                                               [("f32", "f32"), ("bf16", "f32"), ("f16", "bf16"), ("bf16", "bf16")]):
    for carry in ([False, True] if alg == "adalomo" else [False]):
        inject = {(1, 3), (2, 1)} if "dynamic" in str(cfg) else None
        run(alg, cfg, pdt, gdt, carry, inject, groups=("weight_decay" in cfg), out=sys.stdout)
