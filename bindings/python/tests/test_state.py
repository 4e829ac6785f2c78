"""state_dict() / load_state_dict(): the complete optimizer state, and resuming continues
identically. Needs lomo_state_size/serialize/deserialize in the loaded liblomo; the round-trip
tests skip only when the library lacks those symbols."""

import copy
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import loss_fn, make_batches, make_model
from lomo_native import Optimizer, _native
from lomo_native.torch import AdaLomo, Lomo

needs_state = pytest.mark.skipif(
    not Optimizer.supports_state(),
    reason="the loaded liblomo has no lomo_state_serialize/lomo_state_deserialize",
)


def train(model, opt, batches, lr, clip):
    for b in batches:
        if clip:
            opt.grad_norm(loss_fn("transformer", model, b))
        opt.fused_backward(loss_fn("transformer", model, b), lr)


@needs_state
@pytest.mark.parametrize("cls,lr,kw", [
    (AdaLomo, 0.01, dict(clip_grad_norm=1.0, weight_decay=0.01)),
    (AdaLomo, 0.01, {}),
    (Lomo, 0.1, dict(clip_grad_value=0.05)),
])
def test_resume_continues_identically(cls, lr, kw):
    batches = make_batches("transformer", torch.float32, 6)
    model = make_model("transformer")
    opt = cls(model, lr=lr, no_decay=True, **kw)
    train(model, opt, batches[:3], lr, "clip_grad_norm" in kw)

    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed = make_model("transformer", seed=123)  # different weights, overwritten below
    resumed.load_state_dict(ckpt["model"])  # copies into the existing buffers
    ropt = cls(resumed, lr=lr, no_decay=True, **kw)
    ropt.load_state_dict(ckpt["opt"])
    assert ropt.step_info().step == opt.step_info().step == 3

    train(model, opt, batches[3:], lr, "clip_grad_norm" in kw)
    train(resumed, ropt, batches[3:], lr, "clip_grad_norm" in kw)
    for (n, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), f"{n} differs after resuming"


def test_state_matters_for_adalomo():
    """The round trip above could pass vacuously if the state did not matter: resuming with a
    fresh optimizer (AdaLomo restarts at t = 1, lomo-optim's B15) gives different parameters."""
    batches = make_batches("transformer", torch.float32, 5)
    model = make_model("transformer")
    opt = AdaLomo(model, lr=0.01)
    train(model, opt, batches[:3], 0.01, False)
    other = copy.deepcopy(model)
    fresh = AdaLomo(other, lr=0.01)
    train(model, opt, batches[3:], 0.01, False)
    train(other, fresh, batches[3:], 0.01, False)
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), other.parameters()))


@needs_state
def test_loss_scaler_state_round_trips():
    torch.manual_seed(0)
    model = make_model("mlp", torch.float16)
    opt = Lomo(model, lr=0.01, loss_scale_args=dict(init_scale=2.0 ** 40))
    x, y = (t.half() for t in make_batches("mlp", torch.float16, 1)[0])
    for _ in range(3):
        opt.fused_backward(((model(x) - y) ** 2).float().mean(), 0.01)
    scale, skipped = opt.loss_scale, opt.step_info().skipped_total
    assert scale < 2.0 ** 40 and skipped >= 1
    sd = opt.state_dict()
    other = Lomo(copy.deepcopy(model), lr=0.01, loss_scale_args=dict(init_scale=2.0 ** 40))
    other.load_state_dict(sd)
    assert other.loss_scale == scale


@needs_state
def test_mismatched_state_is_rejected():
    sd = AdaLomo(make_model("mlp"), lr=0.01).state_dict()
    with pytest.raises(ValueError):
        Lomo(make_model("mlp")).load_state_dict(sd)
    with pytest.raises(ValueError):
        AdaLomo(make_model("transformer")).load_state_dict(sd)


@pytest.mark.skipif(Optimizer.supports_state(), reason="the library has the state functions")
def test_state_dict_without_library_support_says_so():
    with pytest.raises(RuntimeError, match="lomo_state_serialize"):
        Lomo(make_model("mlp")).state_dict()


@pytest.mark.skipif(not _native.has_symbol("lomo_memory_stats_get"),
                    reason="the loaded liblomo has no lomo_memory_stats_get")
def test_memory_stats_count_adalomo_state():
    """AdaLomo keeps rows + cols (f32) per matrix and a vector per 1-D parameter."""
    model = make_model("mlp")  # Linear(4,6), Linear(6,3)
    st = AdaLomo(model).memory_stats()
    assert st["param_count"] == 4 and st["param_elements"] == 4 * 6 + 6 + 6 * 3 + 3
    assert st["state_bytes"] == 4 * ((6 + 4) + 6 + (3 + 6) + 3)
    assert st["devices"][-1]["param_bytes"] == 4 * st["param_elements"]
    assert Lomo(make_model("mlp")).memory_stats()["state_bytes"] == 0


@needs_state
def test_cuda_parameter_state_moves_to_the_cpu():
    """Optimizers over CUDA parameters save and load their device state (copied through the
    host). Without a GPU this runs on the emulated device (LOMO_CUDA_EMULATE=1: host memory
    stands in for device memory), registering NumPy buffers as device-0 pointers. The emulation
    is a test-only build (`cargo build --release --lib --features cuda-emulation`), named by
    LOMO_EMULATION_LIBRARY (scripts/test.sh sets it); the check runs in a process of its own
    that loads it."""
    emulation = os.environ.get("LOMO_EMULATION_LIBRARY")
    if not emulation:
        pytest.skip("LOMO_EMULATION_LIBRARY (a liblomo.so built with --features cuda-emulation) "
                    "is not set")
    here = Path(__file__).resolve().parent
    env = dict(os.environ, LOMO_LIBRARY=emulation, LOMO_CUDA_EMULATE="1",
               PYTHONPATH=os.pathsep.join([str(here), str(here.parent)]))
    r = subprocess.run([sys.executable, "-c", "import test_state; test_state._cuda_state_check()"],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _cuda_state_check():
    import numpy as np

    assert _native.load().lomo_cuda_available(), "the library has no CUDA emulation"
    rng = np.random.default_rng(5)
    init = {"w": rng.standard_normal((6, 5)).astype(np.float32),
            "b": rng.standard_normal(6).astype(np.float32)}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in init.items()}
             for _ in range(3)]

    def build(device):
        opt = Optimizer("adalomo", clip_grad_norm=1.0)
        arrays = {k: v.copy() for k, v in init.items()}
        for k, a in arrays.items():
            opt.register_pointer(k, a.ctypes.data, _native.DTYPE_F32, a.shape, device)
        return opt, arrays

    dev, dev_arrays = build(0)
    for g in grads:
        dev.step(g, 0.01)
    blob = dev.state_bytes()
    cpu, _ = build(_native.DEVICE_CPU)
    cpu.load_state_bytes(blob)
    assert cpu.state_bytes() == blob
    assert cpu.step_info().step == dev.step_info().step == 3
    # The state is real: a fresh CPU optimizer writes different bytes.
    assert build(_native.DEVICE_CPU)[0].state_bytes() != blob
    stats = dev.memory_stats()
    assert list(stats["devices"]) == [0]
    assert stats["state_bytes"] == 4 * ((6 + 5) + 6)
    assert dev_arrays["w"].tobytes() != init["w"].tobytes()
