"""Issue 13 in the PyTorch binding, against references independent of the library (autograd
gradients with SGD by hand for LOMO, an f64 AdaLomo in torch for AdaLomo):

* kind 1 — every gradient is checked (shape, dtype, device) before its pointer crosses;
* kind 2 — sparse gradients are densified; reentrant checkpointing with a parameter used in
  several segments gives the model-without-checkpointing result (one update, summed gradient);
* kind 3 — ``load_state_dict(assign=True)``, ``add_param_group`` and per-group lrs from
  schedulers train what they should;
* kind 6 — channels_last and transposed parameters are updated in place, equal to the
  contiguous result (AdaLomo on channels_last: test_torch_layouts.py).
"""

import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from lomo_native import _torch_params as TP
from lomo_native.torch import AdaLomo, Lomo


def grads_of(model, loss_of):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    gs = torch.autograd.grad(loss_of(model), [p for _, p in named], allow_unused=True)
    return {n: (torch.zeros_like(p) if g is None else g.to_dense())
            for (n, p), g in zip(named, gs)}


def sgd(model, loss_of, lrs):
    """Expected LOMO result: p - lr_n * g with autograd's gradients of a copy of the model."""
    ref = copy.deepcopy(model)
    g = grads_of(ref, loss_of)
    lr_of = lrs if isinstance(lrs, dict) else {n: lrs for n in g}
    return {n: (p.detach().double() - lr_of[n] * g[n].double()) for n, p in ref.named_parameters()
            if n in g}


class AdaRef:
    """AdaLomo in f64 (reference/semantics.md §3.3; lomo-optim's defaults), per parameter
    name, on the logical view [prod(shape[:-1]), shape[-1]]."""

    def __init__(self):
        self.state, self.t = {}, 0

    def step(self, model, loss_of, lr):
        self.t += 1
        beta = 1.0 - self.t ** -0.8
        g = grads_of(model, loss_of)
        out = {}
        for n, p in model.named_parameters():
            if n not in g:
                continue
            x, p64 = g[n].double(), p.detach().double()
            if p.dim() >= 2:
                X = x.reshape(-1, x.shape[-1])
                U = X * X + 1e-30
                r, c = self.state.get(n, (torch.zeros(X.shape[0], dtype=torch.float64),
                                          torch.zeros(X.shape[1], dtype=torch.float64)))
                r = beta * r + (1 - beta) * U.mean(1)
                c = beta * c + (1 - beta) * U.mean(0)
                self.state[n] = (r, c)
                u = (X / torch.sqrt(r[:, None] / r.mean() * c[None, :])).reshape(p.shape)
            else:
                v = self.state.get(n, torch.zeros_like(x))
                v = beta * v + (1 - beta) * (x * x + 1e-30)
                self.state[n] = v
                u = x / torch.sqrt(v)
            u = u / max(1.0, float(u.pow(2).mean().sqrt()))
            lr_eff = lr * max(1e-3, float(p64.pow(2).mean().sqrt()))
            out[n] = p64 - lr_eff * u
        return out


def assert_close(model, want, rtol=2e-5):
    for n, p in model.named_parameters():
        if n in want:
            torch.testing.assert_close(p.detach().double(), want[n], rtol=rtol, atol=1e-6, msg=n)


# --------------------------------------------------------------------------------- kind 1
def test_gradients_are_checked_before_the_pointer_crosses():
    p = torch.nn.Parameter(torch.zeros(4, 64))
    e = TP.Entry(0, "w", p, None)
    for g, what in ((torch.zeros(4, 32), "shape"), (torch.zeros(256), "shape"),
                    (torch.zeros(4, 64, dtype=torch.float64), "dtype"),
                    (torch.zeros(4, 64, dtype=torch.int32), "dtype"),
                    (torch.zeros(4, 64, device="meta"), "meta")):
        with pytest.raises(RuntimeError, match=what):
            TP.prepared_grad(e, g)
    # A non-contiguous gradient of the right shape is passed contiguous.
    g = torch.arange(256.0).reshape(64, 4).t()
    out = TP.prepared_grad(e, g)
    assert out.is_contiguous() and torch.equal(out, g)


# --------------------------------------------------------------------------------- kind 2
class SparseEmb(torch.nn.Module):
    def __init__(self, sparse):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(11, 6, sparse=sparse)
        self.lin = torch.nn.Linear(6, 2)

    def forward(self, idx):
        return self.lin(self.emb(idx)).pow(2).mean()


@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
def test_sparse_embedding_trains_as_its_dense_gradient(cls):
    idx = torch.tensor([[1, 3, 3, 7], [0, 3, 9, 1]])   # repeated rows: duplicates summed
    model = SparseEmb(sparse=True)
    ref = AdaRef() if cls is AdaLomo else None
    opt = cls(model, lr=0.05)
    for _ in range(2):
        want = sgd(model, lambda m: m(idx), 0.05) if ref is None else ref.step(
            model, lambda m: m(idx), 0.05)
        opt.fused_backward(model(idx), 0.05)
        assert opt.step_info().grads_submitted == 3
        assert_close(model, want)


class Shared(torch.nn.Module):
    """One Linear applied twice, each application in its own checkpoint segment."""

    def __init__(self, ckpt):
        super().__init__()
        torch.manual_seed(1)
        self.inp = torch.nn.Linear(5, 8)
        self.shared = torch.nn.Linear(8, 8)
        self.mid = torch.nn.Linear(8, 8)
        self.out = torch.nn.Linear(8, 1)
        self.ckpt = ckpt

    def seg1(self, h):
        return torch.tanh(self.mid(torch.tanh(self.shared(h))))

    def seg2(self, h):
        return torch.tanh(self.shared(h))

    def forward(self, x):
        h = self.inp(x)
        if self.ckpt:
            h = checkpoint(self.seg1, h, use_reentrant=True)
            h = checkpoint(self.seg2, h, use_reentrant=True)
        else:
            h = self.seg2(self.seg1(h))
        return self.out(h).pow(2).mean()


@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
def test_reentrant_checkpointing_equals_the_model_without_it(cls):
    torch.manual_seed(2)
    xs = [torch.randn(4, 5, requires_grad=True) for _ in range(3)]
    model = Shared(ckpt=True)
    plain = Shared(ckpt=False)
    ref = AdaRef() if cls is AdaLomo else None
    opt = cls(model, lr=0.05)
    for x in xs:
        want = sgd(plain, lambda m: m(x), 0.05) if ref is None else ref.step(
            plain, lambda m: m(x), 0.05)
        opt.fused_backward(model(x), 0.05)
        info = opt.step_info()
        assert info.grads_submitted == 8 and not info.overflow
        assert_close(model, want)
        with torch.no_grad():
            for (_, q), (_, p) in zip(plain.named_parameters(), model.named_parameters()):
                q.copy_(p)
        assert all(p.grad is None for p in model.parameters())


class Mixed(torch.nn.Module):
    """A Linear used outside a reentrant checkpoint segment and inside it."""

    def __init__(self, ckpt):
        super().__init__()
        torch.manual_seed(7)
        self.a, self.b, self.ckpt = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), ckpt

    def seg(self, h):
        return torch.tanh(self.a(self.b(h)))

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = checkpoint(self.seg, h, use_reentrant=True) if self.ckpt else self.seg(h)
        return h.pow(2).mean()


def test_parameter_used_inside_and_outside_a_checkpoint():
    x = torch.randn(3, 4, requires_grad=True)
    model, plain = Mixed(ckpt=True), Mixed(ckpt=False)
    opt = Lomo(model, lr=0.1)
    for _ in range(3):
        want = sgd(plain, lambda m: m(x), 0.1)
        opt.fused_backward(model(x), 0.1)
        assert opt.step_info().grads_submitted == 4
        assert_close(model, want)
        with torch.no_grad():
            for q, p in zip(plain.parameters(), model.parameters()):
                q.copy_(p)


# --------------------------------------------------------------------------------- kind 3
@pytest.mark.parametrize("how", ["assign", "data"])
@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
def test_load_state_dict_assign_rehomes_the_optimizer(cls, how):
    torch.manual_seed(3)
    x = torch.randn(8, 4)
    a, b = torch.nn.Linear(4, 3), None
    b = copy.deepcopy(a)
    opt_a, opt_b = cls(a, lr=0.05), cls(b, lr=0.05)
    for step in range(3):
        if step == 1 and how == "assign":
            # What resume loaders do: new parameter objects with the same values.
            a.load_state_dict({k: v.detach().clone() for k, v in a.state_dict().items()},
                              assign=True)
        elif step == 1:
            # The same objects with new memory.
            a.weight.data = a.weight.data.clone()
        before = a.weight.detach().clone()
        opt_a.fused_backward(a(x).pow(2).mean(), 0.05)
        opt_b.fused_backward(b(x).pow(2).mean(), 0.05)
        assert opt_a.step_info().grads_submitted == 2, step
        assert a.weight.grad is None and not torch.equal(a.weight, before)
        # Same values as the optimizer never re-homed: the state (AdaLomo's statistics, the
        # step counter) moved with the registration.
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias), step
    assert opt_a.step_info().step == 3


def test_a_replaced_parameter_of_another_shape_raises_before_anything_changes():
    model = torch.nn.Linear(4, 3)
    opt = Lomo(model, lr=0.1)
    model.weight = torch.nn.Parameter(torch.zeros(5, 4))
    with pytest.raises(ValueError, match="shape"):
        opt.fused_backward(model.weight.sum() + model.bias.sum(), 0.1)
    assert torch.equal(model.weight, torch.zeros(5, 4))


def test_unfrozen_parameter_without_add_param_group_raises():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    model[0].requires_grad_(False)
    opt = Lomo(model, lr=0.1)
    model[0].requires_grad_(True)
    model.add_module("extra", torch.nn.Identity())  # any registration triggers a scan
    model[1].weight = model[1].weight  # re-registers a parameter
    with pytest.raises(ValueError, match="add_param_group"):
        opt.fused_backward(model(torch.randn(2, 4)).sum(), 0.1)


def test_add_param_group_trains_the_new_parameters_with_their_lr():
    torch.manual_seed(4)
    x = torch.randn(6, 4)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    model[0].requires_grad_(False)
    opt = Lomo(model, lr=0.1)
    model[0].requires_grad_(True)
    opt.add_param_group({"params": list(model[0].parameters()), "lr": 0.02})
    loss_of = lambda m: m(x).pow(2).mean()  # noqa: E731
    lrs = {"0.weight": 0.02, "0.bias": 0.02, "2.weight": 0.1, "2.bias": 0.1}
    for _ in range(2):
        want = sgd(model, loss_of, lrs)
        opt.fused_backward(loss_of(model))
        assert opt.step_info().grads_submitted == 4
        assert all(p.grad is None for p in model.parameters())
        assert_close(model, want)
    with pytest.raises(ValueError, match="already trained"):
        opt.add_param_group({"params": [model[0].weight]})
    frozen = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    with pytest.raises(ValueError, match="requires_grad"):
        opt.add_param_group({"params": [frozen]})
    assert len(opt.param_groups) == 2


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
def test_per_group_lr_from_a_scheduler_is_honoured(cls):
    torch.manual_seed(5)
    x = torch.randn(6, 4)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = cls(model, lr=0.05, groups=[{"params": list(model[2].parameters())}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 0.5 ** s, lambda s: 0.0])
    loss_of = lambda m: m(x).pow(2).mean()  # noqa: E731
    ref = AdaRef() if cls is AdaLomo else None
    for step in range(3):
        lr0 = 0.05 * 0.5 ** step
        assert opt.param_groups[0]["lr"] == pytest.approx(lr0)
        assert opt.param_groups[1]["lr"] == 0.0
        frozen = [p.detach().clone() for p in model[2].parameters()]
        if ref is None:
            want = sgd(model, loss_of, {"0.weight": lr0, "0.bias": lr0, "2.weight": 0.0,
                                        "2.bias": 0.0})
        else:
            want = {n: v for n, v in ref.step(model, loss_of, lr0).items() if n.startswith("0.")}
        opt.fused_backward(loss_of(model))
        for p, q in zip(model[2].parameters(), frozen):
            assert torch.equal(p, q), "the group scheduled to lr 0 moved"
        assert_close(model, want)
        sched.step()


# --------------------------------------------------------------------------------- kind 6
class Layouts(torch.nn.Module):
    def __init__(self, channels_last):
        super().__init__()
        torch.manual_seed(6)
        self.conv = torch.nn.Conv2d(3, 4, 3)
        if channels_last:
            self.conv = self.conv.to(memory_format=torch.channels_last)
        w = torch.randn(5, 36)
        self.wt = torch.nn.Parameter(w.t() if channels_last else w.t().contiguous())  # (36, 5)
        v = torch.randn(2, 5, 3)
        self.v = torch.nn.Parameter(v.transpose(0, 1) if channels_last
                                    else v.transpose(0, 1).contiguous())  # (5, 2, 3)

    def forward(self, x):
        h = self.conv(x).flatten(1)
        return (h @ self.wt).pow(2).mean() + (self.v * self.v.sum()).mean()


def test_lomo_updates_non_contiguous_parameters_in_place():
    x = torch.randn(2, 3, 5, 5)
    model = Layouts(channels_last=True)
    assert not model.conv.weight.is_contiguous() and not model.wt.is_contiguous()
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    strides = {n: p.stride() for n, p in model.named_parameters()}
    opt = Lomo(model, lr=0.05)
    for _ in range(2):
        want = sgd(model, lambda m: m(x), 0.05)
        opt.fused_backward(model(x), 0.05)
        assert_close(model, want)
    for n, p in model.named_parameters():
        assert p.data_ptr() == ptrs[n] and p.stride() == strides[n], n


def test_adalomo_transposed_parameters_equal_the_contiguous_result():
    x = torch.randn(2, 3, 5, 5)
    model = Layouts(channels_last=False)
    model.wt = torch.nn.Parameter(model.wt.detach().t().contiguous().t())   # transposed matrix
    model.v = torch.nn.Parameter(model.v.detach().transpose(0, 1).contiguous().transpose(0, 1))
    assert not model.wt.is_contiguous() and not model.v.is_contiguous()
    ref = AdaRef()
    opt = AdaLomo(model, lr=0.05)
    for _ in range(3):
        want = ref.step(model, lambda m: m(x), 0.05)
        opt.fused_backward(model(x), 0.05)
        assert_close(model, want, rtol=1e-4)
