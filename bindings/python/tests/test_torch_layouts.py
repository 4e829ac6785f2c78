"""Issue 13 kind 6 for AdaLomo: channels_last convolution weights (the last dimension is not
innermost) are given to the library with their strides (``lomo_param_set_strides``) and updated
in place: bit for bit the same model trained contiguous when the gradients are the same, with
fused hooks and with ``step()``, a contiguous gradient included; a channels_last Conv2d model
against lomo-optim and an f64 AdaLomo; and the NumPy level on non-C-contiguous arrays."""

import copy

import numpy as np
import pytest
import torch

from conftest import reference_optimizer
from lomo_native import core
from lomo_native import _torch_params as TP
from lomo_native.torch import AdaLomo, Lomo
from test_torch_kinds import AdaRef, assert_close


class Elementwise(torch.nn.Module):
    """A 4-D weight whose gradient is formed elementwise (so it is the same, bit for bit, in any
    memory format), with a zero row and a zero column in the logical [O*I*kH, kW] view."""

    def __init__(self, channels_last, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(11)
        w = torch.randn(4, 3, 3, 5).to(dtype)
        if channels_last:
            w = w.to(memory_format=torch.channels_last)
        self.w = torch.nn.Parameter(w)
        self.b = torch.nn.Parameter(torch.randn(4).to(dtype))
        c = torch.randn(4, 3, 3, 5)
        c[0, 0, 0, :] = 0
        c[..., 2] = 0
        self.register_buffer("c", c.to(dtype))

    def forward(self, s):
        w = self.w.float()
        return (w * self.c * s).sum() + (w * w).sum() * 0.01 * s + (self.b.float() * s).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [True, False])
def test_channels_last_adalomo_equals_contiguous_bit_for_bit(dtype, fused):
    models = [Elementwise(cl, dtype) for cl in (False, True)]
    assert models[1].w.is_contiguous(memory_format=torch.channels_last)
    assert not models[1].w.is_contiguous()
    ptr = models[1].w.data_ptr()
    opts = [AdaLomo(m, lr=0.05, rounding="stochastic" if dtype != torch.float32 else "nearest")
            for m in models]
    assert opts[1]._entries["w"].perm is TP.STRIDES
    for step in range(4):
        for m, o in zip(models, opts):
            loss = m(1.0 + step)
            if fused:
                o.fused_backward(loss, 0.05)
            else:
                o.zero_grad()
                loss.backward()
                if step == 1:  # a contiguous gradient for the channels_last weight
                    m.w.grad = m.w.grad.contiguous()
                o.step()
        assert torch.equal(models[0].w, models[1].w), step
        assert torch.equal(models[0].b, models[1].b), step
    assert models[1].w.data_ptr() == ptr
    assert models[1].w.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(models[1].w, Elementwise(True, dtype).w), "it trained"
    assert opts[1].memory_stats()["workspace_bytes"] > opts[0].memory_stats()["workspace_bytes"]


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(12)
        self.conv1 = torch.nn.Conv2d(3, 6, 3)
        self.conv2 = torch.nn.Conv2d(6, 4, 3)
        self.head = torch.nn.Linear(4 * 4 * 4, 2)

    def forward(self, x):
        h = torch.tanh(self.conv1(x))
        h = torch.tanh(self.conv2(h))
        return self.head(h.flatten(1)).pow(2).mean()


def test_channels_last_conv_model_against_contiguous_and_an_f64_reference():
    # lomo-optim 0.1.1's AdaLomo cannot be the reference here: it sizes the factored state
    # (shape[0]) and (shape[1]) and fails on any parameter of rank > 2, contiguous or not.
    x = torch.randn(2, 3, 8, 8)
    base = ConvNet()
    cl = copy.deepcopy(base).to(memory_format=torch.channels_last)
    contiguous = copy.deepcopy(base)
    assert not cl.conv1.weight.is_contiguous()
    ptrs = {n: p.data_ptr() for n, p in cl.named_parameters()}
    opt_cl, opt_c = AdaLomo(cl, lr=0.01), AdaLomo(contiguous, lr=0.01)
    f64 = AdaRef()
    xl = x.to(memory_format=torch.channels_last)
    for _ in range(3):
        want = f64.step(cl, lambda m: m(xl), 0.01)
        opt_cl.fused_backward(cl(xl), 0.01)
        opt_c.fused_backward(contiguous(x), 0.01)
        assert_close(cl, want, rtol=1e-4)
        for (n, p), q in zip(cl.named_parameters(), contiguous.parameters()):
            # the convolutions' gradients differ in the last bits between memory formats
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    for n, p in cl.named_parameters():
        assert p.data_ptr() == ptrs[n], n
    assert cl.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_conv_model_lomo_against_lomo_optim():
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    ours = ConvNet().to(memory_format=torch.channels_last)
    theirs = copy.deepcopy(ours)
    opt = Lomo(ours, lr=0.05)
    ref = reference_optimizer("lomo", theirs, lr=0.05)
    for _ in range(3):
        opt.fused_backward(ours(x), 0.05)
        ref.fused_backward(theirs(x), 0.05)
        for (n, p), q in zip(ours.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)
    assert ours.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_numpy_level_non_contiguous_arrays_equal_the_contiguous_run():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 3, 3, 5)).astype(np.float32)
    cl = np.ascontiguousarray(w.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)  # channels_last
    tr = np.ascontiguousarray(rng.standard_normal((7, 9)).astype(np.float32).T)
    tr_c = np.ascontiguousarray(tr.T.copy().T)  # same values, contiguous (9, 7)
    assert not cl.flags["C_CONTIGUOUS"] and cl.base is not None
    tr_v = tr_c.T.copy().T  # a transposed view of the same values
    assert not tr_v.flags["C_CONTIGUOUS"]
    a, b = core.Optimizer("adalomo"), core.Optimizer("adalomo")
    ia = [a.register_array("w", w.copy()), a.register_array("t", tr_c.copy())]
    ib = [b.register_array("w", cl), b.register_array("t", tr_v)]
    wa, ta = a._arrays[ia[0]], a._arrays[ia[1]]
    for step in range(3):
        gw = rng.standard_normal(w.shape).astype(np.float32)
        gt = rng.standard_normal(tr_c.shape).astype(np.float32)
        a.step({ia[0]: gw, ia[1]: gt}, lr=0.05)
        # gradients: C-contiguous for one parameter, in the parameter's layout for the other
        gw_b = gw if step % 2 else np.ascontiguousarray(gw.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        b.step({ib[0]: gw_b, ib[1]: gt}, lr=0.05)
        assert np.array_equal(wa, cl) and np.array_equal(ta, tr_v), step
    assert not np.array_equal(wa, w)
    with pytest.raises(ValueError, match="dense"):
        core.Optimizer("adalomo").register_array("g", np.zeros((4, 6), np.float32)[:, ::2])


class Square(torch.nn.Module):
    """A square matrix, stored transposed or not, and a rows-permuted 3-D tensor; gradients
    formed elementwise (the same bits in any layout)."""

    def __init__(self, permuted):
        super().__init__()
        torch.manual_seed(13)
        m, t = torch.randn(6, 6), torch.randn(4, 5, 3)
        self.m = torch.nn.Parameter(m.t().contiguous().t() if permuted else m)
        self.t = torch.nn.Parameter(t.transpose(0, 1).contiguous().transpose(0, 1) if permuted
                                    else t)
        c = torch.randn(6, 6)
        c[:, 1] = 0
        self.register_buffer("c", c)

    def forward(self, s):
        return (self.m * self.c * s).sum() + (self.t * self.t).sum() * s


def test_adalomo_transposed_and_permuted_cpu_parameters_equal_contiguous_and_share_checkpoints():
    models = [Square(False), Square(True)]
    assert not models[1].m.is_contiguous() and not models[1].t.is_contiguous()
    opts = [AdaLomo(m, lr=0.05) for m in models]
    assert all(opts[1]._entries[n].perm is TP.STRIDES for n in ("m", "t"))
    for step in range(4):
        if step == 2:
            # the permuted model's state continues the contiguous one's: logical order both
            opts[1].load_state_dict(opts[0].state_dict())
            with torch.no_grad():
                models[1].m.copy_(models[0].m)
                models[1].t.copy_(models[0].t)
        for m, o in zip(models, opts):
            o.fused_backward(m(1.0 + step), 0.05)
        assert torch.equal(models[0].m, models[1].m) and torch.equal(models[0].t, models[1].t)
    assert not models[1].m.is_contiguous()


def test_a_layout_changed_after_construction_is_followed_with_the_state():
    models = [Elementwise(False), Elementwise(False)]
    opts = [AdaLomo(m, lr=0.05) for m in models]
    for step in range(4):
        if step == 2:
            models[1].to(memory_format=torch.channels_last)  # .data replaced: re-registered
            assert not models[1].w.is_contiguous()
        for m, o in zip(models, opts):
            o.fused_backward(m(1.0 + step), 0.05)
        assert torch.equal(models[0].w, models[1].w), step
    assert opts[1]._entries["w"].perm is TP.STRIDES


def test_state_order():
    assert TP.state_order(None) is None and TP.state_order(TP.STRIDES) is None
    assert TP.state_order([1, 0]) == (1, 0)


def test_memory_order_state_refuses_a_checkpoint_of_another_order(monkeypatch):
    # The CUDA registration of a transposed AdaLomo matrix (memory order), simulated on the
    # CPU: its state is not the contiguous one's, so exchanging checkpoints raises, and so does
    # a layout change after construction, each before anything changes.
    def cuda_like(name, p, algorithm):
        perm = TP.memory_order(p)
        return (None, tuple(p.shape)) if perm is None else (perm, tuple(p.shape[d] for d in perm))

    monkeypatch.setattr(TP, "registered_layout", cuda_like)
    models = [Square(False), Square(True)]
    opts = [AdaLomo(m, lr=0.05) for m in models]
    assert opts[1]._entries["m"].perm == [1, 0]
    for m, o in zip(models, opts):
        o.fused_backward(m(1.0), 0.05)
    before = [p.detach().clone() for p in models[1].parameters()]
    with pytest.raises(ValueError, match="'m'.*memory order"):
        opts[1].load_state_dict(opts[0].state_dict())
    with pytest.raises(ValueError, match="'m'.*memory order"):
        opts[0].load_state_dict(opts[1].state_dict())
    models[1].m.data = models[1].m.detach().contiguous()
    with pytest.raises(ValueError, match="'m' changed its memory layout"):
        opts[1].fused_backward(models[1](2.0), 0.05)
    assert all(torch.equal(p, q) for p, q in zip(models[1].parameters(), before))
