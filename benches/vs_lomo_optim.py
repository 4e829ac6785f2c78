#!/usr/bin/env python3
"""Side-by-side CPU benchmark: lomo-optim 0.1.1 (PyTorch) versus liblomo, in one process.

    python benches/vs_lomo_optim.py [--lib target/release/liblomo.so] [--reps 7]

Needs torch, transformers and lomo-optim==0.1.1 (scripts/test.sh installs them into .venv).
Both sides use the same tensors and 2 threads. lomo-optim is timed on its own per-parameter
update path (`grad_func`, which scans the parameters and applies `fuse_update` to each one that
holds a gradient); liblomo through its C API (ctypes), one `lomo_grad_submit` per parameter.
Each figure is the median of --reps runs; the ratio column is what to quote.
"""
import argparse
import contextlib
import ctypes
import os
import platform
import statistics
import sys
import time
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import torch  # noqa: E402
from lomo_optim import AdaLomo, Lomo  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class Config(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("algorithm", ctypes.c_uint32),
                ("weight_decay", ctypes.c_double), ("clip_grad_norm", ctypes.c_double),
                ("clip_grad_value", ctypes.c_double), ("loss_scale_mode", ctypes.c_uint32),
                ("loss_scale", ctypes.c_double), ("scale_factor", ctypes.c_double),
                ("scale_window", ctypes.c_uint32), ("min_loss_scale", ctypes.c_double),
                ("hysteresis", ctypes.c_uint32), ("eps1", ctypes.c_double), ("eps2", ctypes.c_double),
                ("clip_threshold", ctypes.c_double), ("decay_rate", ctypes.c_double),
                ("rounding", ctypes.c_uint32), ("seed", ctypes.c_uint64)]


class ParamDesc(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("name", ctypes.c_char_p), ("data", ctypes.c_void_p),
                ("dtype", ctypes.c_uint32), ("ndim", ctypes.c_uint32), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("device", ctypes.c_int32), ("group", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class Native:
    """The few C calls the benchmark needs."""

    def __init__(self, path, algorithm):
        self.lib = lib = ctypes.CDLL(path)
        vp, u32 = ctypes.c_void_p, ctypes.c_uint32
        for name, args in [("lomo_config_init", [ctypes.POINTER(Config), u32]),
                           ("lomo_optimizer_new", [ctypes.POINTER(Config), ctypes.POINTER(vp)]),
                           ("lomo_param_register", [vp, ctypes.POINTER(ParamDesc), ctypes.POINTER(u32)]),
                           ("lomo_step_begin", [vp, u32, ctypes.c_float, vp]),
                           ("lomo_grad_submit", [vp, u32, vp, u32, vp]),
                           ("lomo_step_end", [vp, vp])]:
            f = getattr(lib, name)
            f.argtypes, f.restype = args, u32
        lib.lomo_optimizer_free.argtypes, lib.lomo_optimizer_free.restype = [vp], None
        cfg = Config()
        self.check(lib.lomo_config_init(ctypes.byref(cfg), algorithm))
        self.opt = vp()
        self.check(lib.lomo_optimizer_new(ctypes.byref(cfg), ctypes.byref(self.opt)))
        self.keep = []

    def check(self, st):
        if st:
            raise RuntimeError(f"liblomo status {st}")

    def register(self, name, t):
        shape = (ctypes.c_int64 * max(t.dim(), 1))(*t.shape)
        d = ParamDesc(ctypes.sizeof(ParamDesc), name.encode(), t.data_ptr(), DTYPES[t.dtype], t.dim(), shape, -1, 0, 0)
        self.keep.append(shape)
        pid = ctypes.c_uint32()
        self.check(self.lib.lomo_param_register(self.opt, ctypes.byref(d), ctypes.byref(pid)))
        return pid.value

    def step(self, items, lr):
        self.check(self.lib.lomo_step_begin(self.opt, 1, lr, None))
        for pid, g in items:
            self.check(self.lib.lomo_grad_submit(self.opt, pid, g.data_ptr(), DTYPES[g.dtype], None))
        self.check(self.lib.lomo_step_end(self.opt, None))


@contextlib.contextmanager
def cuda_is_identity():
    orig = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = orig


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
    # A small GPT-style stack: 4 blocks of width 512, vocabulary 8000 (~16.8M parameters).
    d, layers, vocab = 512, 4, 8000
    mods = [torch.nn.Embedding(vocab, d)]
    for _ in range(layers):
        mods += [torch.nn.LayerNorm(d), torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d),
                 torch.nn.LayerNorm(d), torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)]
    mods += [torch.nn.LayerNorm(d), torch.nn.Linear(d, vocab, bias=False)]
    return torch.nn.Sequential(*mods).to(dtype)


def bench(lib, kind, dtype, algorithm, reps):
    model = model_for(kind, dtype)
    params = list(model.named_parameters())
    grads = [torch.randn(p.shape).to(dtype) * 1e-2 for _, p in params]
    lr = 1e-4
    if algorithm == 0:
        ref = Lomo(model, lr=lr)
    else:
        with cuda_is_identity():
            ref = AdaLomo(model, lr=lr)
        ref.step_num = 1  # as inside fused_backward

    def run_ref():
        for (_, p), g in zip(params, grads):
            p.grad = g
        ref.grad_func(0)

    t_ref = median_ms(run_ref, reps)
    with torch.no_grad():
        model2 = model_for(kind, dtype)
    native = Native(lib, algorithm)
    items = [(native.register(n, p.data), g) for (n, p), g in zip(model2.named_parameters(), grads)]
    t_ours = median_ms(lambda: native.step(items, lr), reps)
    n = sum(p.numel() for _, p in params)
    return n, t_ref, t_ours


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", default=os.environ.get("LOMO_LIBRARY", os.path.join(ROOT, "target/release/liblomo.so")))
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(2)
    cpu = platform.processor() or "cpu"
    with contextlib.suppress(Exception):
        cpu = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")][0]
    print(f"# {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, threads 2, median of {args.reps}")
    print("| tensor(s) | dtype | algorithm | elements | lomo-optim 0.1.1 | liblomo | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for kind in ("4096x4096", "small GPT"):
        for dtype in (torch.float32, torch.bfloat16):
            for algorithm, name in ((0, "LOMO"), (1, "AdaLomo")):
                n, t_ref, t_ours = bench(args.lib, kind, dtype, algorithm, args.reps)
                dt = str(dtype).replace("torch.", "")
                print(f"| {kind} | {dt} | {name} | {n/1e6:.1f}M | {t_ref:.1f} ms | {t_ours:.2f} ms | {t_ref/t_ours:.1f}x |")
                sys.stdout.flush()


if __name__ == "__main__":
    main()
