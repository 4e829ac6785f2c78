"""Gradient accumulation in the library (``lomo_accum_enable``) from Python: the NumPy level
against a plain step on the gradients summed in NumPy, and the PyTorch drop-ins'
``accumulation_steps`` against one fused step on the concatenated batch (plain autograd gives the
reference gradient: the sum of the micro-batch losses)."""

import copy

import numpy as np
import pytest
import torch

from conftest import loss_fn, make_batches, make_model
from lomo_native import LomoError, Optimizer
from lomo_native.torch import AdaLomo, Lomo


# ------------------------------------------------------------------------------------ NumPy
@pytest.mark.parametrize("algorithm", ["lomo", "adalomo"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_numpy_accumulation_equals_a_step_on_the_summed_gradient(algorithm, k, reduction):
    rng = np.random.default_rng(k)
    shapes = {"w": (5, 7), "b": (7,)}
    init = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    cfg = dict(clip_grad_norm=0.5, weight_decay=0.01)
    acc, plain = Optimizer(algorithm, **cfg), Optimizer(algorithm, **cfg)
    pa = {n: v.copy() for n, v in init.items()}
    pp = {n: v.copy() for n, v in init.items()}
    for n in shapes:
        acc.register_array(n, pa[n])
        plain.register_array(n, pp[n])
    acc.accum_enable("f32", reduction)
    assert acc.accum_bytes == 4 * (35 + 7)
    for step in range(2):
        s = acc.loss_scale
        micro = [{n: (rng.standard_normal(sh) * s).astype(np.float32) for n, sh in shapes.items()}
                 for _ in range(k)]
        for g in micro[:-1]:
            acc.accumulate(g)
            assert all(np.array_equal(pa[n], pp[n]) for n in shapes)
        assert acc.accum_pending == k - 1
        info = acc.step(micro[-1], lr=0.05)
        # the library adds in micro-batch order in f32, then multiplies by 1/k once (mean)
        total = {n: micro[0][n].copy() for n in shapes}
        for g in micro[1:]:
            for n in shapes:
                total[n] = total[n] + g[n]
        if reduction == "mean" and k > 1:
            total = {n: v * np.float32(1.0 / k) for n, v in total.items()}
        ref = plain.step(total, lr=0.05)
        for n in shapes:
            np.testing.assert_array_equal(pa[n], pp[n])
        assert info.grad_norm == ref.grad_norm and info.step == ref.step == step + 1
        assert acc.accum_pending == 0


def test_numpy_refusals_leave_everything_as_it_was():
    opt = Optimizer("adalomo")
    p = np.ones((2, 3), np.float32)
    opt.register_array("p", p)
    with pytest.raises(LomoError) as e:
        opt.accumulate({"p": np.ones_like(p)})
    assert e.value.status_name == "PHASE_ERROR"
    with pytest.raises(ValueError):
        opt.accum_enable("f64")
    opt.accum_enable("param", "sum")
    ws = opt.memory_stats()["workspace_bytes"]
    assert opt.accum_bytes == 24
    opt.accumulate({"p": np.ones_like(p)})
    with pytest.raises(LomoError):
        opt.save("/tmp/lomo_accum_py.safetensors")  # pending micro-batches: no checkpoint
    with pytest.raises(LomoError):
        opt.accum_disable()
    np.testing.assert_array_equal(p, 1.0)
    opt.cancel()
    assert opt.accum_pending == 0
    opt.accum_disable()
    assert opt.accum_bytes == 0 and opt.memory_stats()["workspace_bytes"] == ws - 24


# ---------------------------------------------------------------------------------- PyTorch
def whole_step(cls, model, batches, kind, lr, **kw):
    """The reference: one fused step of a fresh optimizer on the sum of the micro-batch losses
    (the gradient of the concatenated batch, as torch's .grad accumulation gives it)."""
    opt = cls(model, lr=lr, **kw)
    total = lambda: sum(loss_fn(kind, model, b) for b in batches)  # noqa: E731
    if kw.get("clip_grad_norm"):
        opt.grad_norm(total())
    opt.fused_backward(total(), lr)
    return opt


@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("dtype,buffer", [(torch.float32, "f32"), (torch.bfloat16, "f32"),
                                          (torch.bfloat16, "param")])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_fused_backward_accumulates_k_micro_batches(cls, k, dtype, buffer, clip):
    # AdaLomo normalizes each gradient element: the GPT's key bias has a gradient that is zero
    # up to rounding, whose normalized update depends on the summation order alone; the MLP
    # has no such element.
    kind = "gpt" if cls is Lomo else "mlp"
    model = make_model(kind, dtype)
    ref_model = copy.deepcopy(model)
    batches = make_batches(kind, dtype, 2 * k, seed=3)
    opt = cls(model, lr=0.02, clip_grad_norm=clip, accumulation_steps=k,
              accumulation_buffer=buffer)
    nelem = sum(p.numel() for p in model.parameters())
    per = 4 if buffer == "f32" else 2
    assert opt.native.accum_bytes == per * nelem
    for step in range(2):
        before = [p.detach().clone() for p in model.parameters()]
        for j, b in enumerate(batches[step * k:(step + 1) * k]):
            if clip:
                opt.grad_norm(loss_fn(kind, model, b))
            opt.fused_backward(loss_fn(kind, model, b), 0.02)
            assert all(p.grad is None for p in model.parameters())
            if j < k - 1:
                assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
        assert opt.step_info().step == step + 1
    # reference: the same two steps on the concatenated batches (state carries over)
    ref = None
    for step in range(2):
        group = batches[step * k:(step + 1) * k]
        if ref is None:
            ref = whole_step(cls, ref_model, group, kind, 0.02, clip_grad_norm=clip)
        else:
            total = lambda: sum(loss_fn(kind, ref_model, b) for b in group)  # noqa: E731
            if clip:
                ref.grad_norm(total())
            ref.fused_backward(total(), 0.02)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 and buffer == "f32" else \
        dict(rtol=2e-2, atol=2e-3)
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.float(), q.float(), msg=n, **tol)
    if clip:
        # bf16: the reference's gradients are bf16 sums over the whole batch, ours f32 sums
        # (or bf16 partial sums) of bf16 micro-batch gradients
        rel = 1e-4 if dtype == torch.float32 else 5e-3
        assert opt.step_info().grad_norm == pytest.approx(ref.step_info().grad_norm, rel=rel)


def test_explicit_accumulate_flag_and_short_steps():
    """accumulate=True/False overrides the count (a trainer's short last step of an epoch)."""
    kind = "mlp"
    model = make_model(kind)
    ref_model = copy.deepcopy(model)
    batches = make_batches(kind, torch.float32, 3, seed=4)
    opt = Lomo(model, lr=0.1, accumulation_steps=4)
    opt.fused_backward(loss_fn(kind, model, batches[0]), accumulate=True)
    opt.fused_backward(loss_fn(kind, model, batches[1]), accumulate=False)  # a step of 2
    whole_step(Lomo, ref_model, batches[:2], kind, 0.1)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert opt.native.accum_pending == 0
    with pytest.raises(RuntimeError):
        Lomo(make_model(kind), lr=0.1).fused_backward(loss_fn(kind, model, batches[2]),
                                                      accumulate=True)


def test_accumulation_refusals_and_settings():
    model = make_model("mlp")
    with pytest.raises(ValueError):
        Lomo(model, accumulation_steps=0)
    with pytest.raises(ValueError):
        AdaLomo(model, accumulation_steps=2, accumulation_buffer="f64")
    opt = AdaLomo(model, lr=0.01, accumulation_steps=3)
    b = make_batches("mlp", torch.float32, 1)[0]
    opt.fused_backward(loss_fn("mlp", model, b))
    with pytest.raises(RuntimeError):
        opt.set_accumulation(1)  # a micro-batch is pending
    with pytest.raises(RuntimeError):
        opt.state_dict()
    with pytest.raises(RuntimeError):
        opt.step()
    opt.fused_backward(loss_fn("mlp", model, b))
    opt.fused_backward(loss_fn("mlp", model, b))
    assert opt.step_info().step == 1
    opt.state_dict()  # between steps: fine
    opt.set_accumulation(1)
    assert opt.native.accum_bytes == 0
