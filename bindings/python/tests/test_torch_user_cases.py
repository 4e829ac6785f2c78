"""Cases a new user of the PyTorch drop-ins runs into: parameters without elements, discarding
the micro-batches of an accumulated step, saving mid-step, torch.compile'd models with a norm
pass, learning rates outside float32. Numbers are compared with a float64 LOMO / AdaLomo written
here from reference/semantics.md §2-§3 over plain autograd gradients."""

import copy
import io
import math

import pytest
import torch

from lomo_native.torch import AdaLomo, Lomo


class Reference:
    """float64 LOMO / AdaLomo (no loss scale: the gradients are the true ones)."""

    def __init__(self, model, algorithm, lr, clip=None, eps=(1e-30, 1e-3), decay_rate=-0.8):
        self.model, self.algorithm, self.lr, self.clip = model, algorithm, lr, clip
        self.eps, self.decay_rate, self.t, self.state = eps, decay_rate, 0, {}

    def step(self, loss):
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for (_, p), g in zip(named, grads)]
        coef = 1.0
        if self.clip is not None:
            norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads))
            coef = min(self.clip / (norm + 1e-6), 1.0)
        self.t += 1
        with torch.no_grad():
            for (n, p), g in zip(named, grads):
                if p.numel() == 0:
                    continue
                g, p64 = g.double() * coef, p.double()
                if self.algorithm == "lomo":
                    p.copy_(p64 - self.lr * g)
                    continue
                beta = 1 - self.t ** self.decay_rate
                sq = g * g + self.eps[0]
                if p.dim() >= 2:
                    g2, sq2 = g.reshape(-1, g.shape[-1]), sq.reshape(-1, g.shape[-1])
                    row, col = self.state.get(n, (0.0, 0.0))
                    row = beta * row + (1 - beta) * sq2.mean(-1)
                    col = beta * col + (1 - beta) * sq2.mean(-2)
                    self.state[n] = (row, col)
                    u = ((row / row.mean()).rsqrt()[:, None] * col.rsqrt()[None, :] * g2)
                    u = u.reshape(g.shape)
                else:
                    v = beta * self.state.get(n, 0.0) + (1 - beta) * sq
                    self.state[n] = v
                    u = v.rsqrt() * g
                u = u / max(1.0, float(u.norm()) / math.sqrt(u.numel()))
                eta = self.lr * max(self.eps[1], float(p64.norm()) / math.sqrt(p64.numel()))
                p.copy_(p64 - eta * u)


def assert_close(model, reference, rtol=2e-6):
    for (n, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.detach().double(), b.detach().double(), rtol=rtol,
                                   atol=1e-7, msg=n)


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


X, Y = torch.randn(6, 8, generator=torch.Generator().manual_seed(1)), torch.randn(6, 3)


def mse(model, x=X, y=Y):
    return ((model(x) - y) ** 2).mean()


# ---------------------------------------------------------------- parameters without elements
class WithEmpty(torch.nn.Module):
    """A real layer next to layers of no elements: a [4, 0] weight (no columns), a [0, 8] one,
    a [0, 3, 2, 2] convolution and their [0] biases."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(8, 4)
        self.no_cols = torch.nn.Linear(0, 4)
        self.no_rows = torch.nn.Linear(8, 0)
        self.conv = torch.nn.Conv2d(3, 0, 2)
        with torch.no_grad():
            self.no_cols.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return ((self.a(x) + self.no_cols(x[:, :0])) ** 2).mean() + self.no_rows(x).sum()


@pytest.mark.parametrize("cls,algorithm", [(Lomo, "lomo"), (AdaLomo, "adalomo")])
def test_empty_parameters_train_save_and_resume(cls, algorithm):
    """AdaLomo's state_dict() raised on a [4, 0] weight (its row statistics, which the library
    does not keep for an empty tensor, were reshaped to [4]), and a checkpoint holding several
    empty statistics failed its checksum at random (their order in the file was a hash
    order)."""
    model = WithEmpty()
    ref_model = copy.deepcopy(model)
    opt = cls(model, lr=0.05, clip_grad_norm=1.0)
    ref = Reference(ref_model, algorithm, 0.05, clip=1.0)
    for _ in range(3):
        loss = model(X)
        opt.grad_norm(loss)
        opt.fused_backward(loss, 0.05)
        ref.step(ref_model(X))
    assert_close(model, ref_model)
    sd = opt.state_dict()
    if algorithm == "adalomo":
        index = [n for n, _ in model.named_parameters()].index("no_cols.weight")
        assert sd["state"][index]["exp_avg_sq_row"].shape == (4,)
        assert sd["state"][index]["exp_avg_sq_col"].shape == (0,)
        assert opt.state[model.no_cols.weight]["exp_avg_sq_row"].shape == (4,)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": sd}, buf)
    for _ in range(4):  # fresh optimizers: a hash order differs between them
        buf.seek(0)
        ckpt = torch.load(buf)
        resumed = WithEmpty()
        resumed.load_state_dict(ckpt["model"])
        opt2 = cls(resumed, lr=0.05, clip_grad_norm=1.0)
        opt2.load_state_dict(ckpt["opt"])
        loss = resumed(X)
        opt2.grad_norm(loss)
        opt2.fused_backward(loss, 0.05)
        opt2.remove()
    loss = model(X)
    opt.grad_norm(loss)
    opt.fused_backward(loss, 0.05)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


# ------------------------------------------------------------- accumulation: discard, save mid-step
@pytest.mark.parametrize("cls,algorithm", [(Lomo, "lomo"), (AdaLomo, "adalomo")])
def test_zero_grad_discards_the_pending_micro_batches(cls, algorithm):
    """zero_grad() discards gradients accumulated so far, as torch's does with .grad; it left
    the library's pending micro-batches in place (step() then raised, pointing to zero_grad,
    and the next fused step would have added them)."""
    model = mlp()
    ref_model = copy.deepcopy(model)
    opt = cls(model, lr=0.05, clip_grad_norm=1.0, accumulation_steps=3)
    ref = Reference(ref_model, algorithm, 0.05, clip=1.0)
    xs, ys = torch.randn(5, 2, 8), torch.randn(5, 2, 3)
    loss = mse(model, 10 * xs[0], ys[0])  # a micro-batch the user throws away
    opt.grad_norm(loss)
    opt.fused_backward(loss)
    opt.zero_grad()
    assert opt.native.accum_pending == 0
    total = 0
    for j in range(1, 4):
        loss = mse(model, xs[j], ys[j]) / 3
        opt.grad_norm(loss)
        opt.fused_backward(loss, 0.05)
        total = total + mse(ref_model, xs[j], ys[j]) / 3
    ref.step(total)
    assert_close(model, ref_model)
    # the non-fused path after a discarded micro-batch
    opt.fused_backward(mse(model, xs[4], ys[4]))
    opt.zero_grad()
    mse(model, xs[4], ys[4]).backward()
    opt.step()
    ref.step(mse(ref_model, xs[4], ys[4]))
    assert_close(model, ref_model)


def test_saving_mid_step_says_what_to_do():
    model = mlp()
    opt = AdaLomo(model, lr=0.05, accumulation_steps=2)
    sd = opt.state_dict()
    opt.fused_backward(mse(model))
    for call in (opt.state_dict, lambda: opt.load_state_dict(sd)):
        with pytest.raises(RuntimeError, match="micro-batch.*zero_grad"):
            call()
    assert opt.native.accum_pending == 1  # nothing changed: the step goes on
    opt.zero_grad()
    opt.load_state_dict(sd)


# ------------------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize("cls,algorithm", [(Lomo, "lomo"), (AdaLomo, "adalomo")])
def test_compiled_model_with_a_norm_pass(cls, algorithm):
    """grad_norm keeps the graph (retain_graph=True), which a compiled backward donating its
    buffers refuses: the error says how to turn donation off, with nothing changed; with it off
    the compiled model trains as the plain one."""
    config = pytest.importorskip("torch._functorch.config")
    torch._dynamo.reset()
    model = mlp()
    ref_model = copy.deepcopy(model)
    # A recompilation (here: another module through the same forward; also another batch
    # shape) makes the backward donate its buffers.
    torch.compile(mlp(), backend="aot_eager")(X).sum().backward()
    compiled = torch.compile(model, backend="aot_eager")
    opt = cls(model, lr=0.05, clip_grad_norm=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="donated_buffer = False"):
        opt.grad_norm(mse(compiled))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    torch._dynamo.reset()
    saved = config.donated_buffer
    config.donated_buffer = False
    try:
        compiled = torch.compile(model, backend="aot_eager")
        ref = Reference(ref_model, algorithm, 0.05, clip=1.0)
        for _ in range(3):
            loss = mse(compiled)
            opt.grad_norm(loss)
            opt.fused_backward(loss, 0.05)
            ref.step(mse(ref_model))
    finally:
        config.donated_buffer = saved
        torch._dynamo.reset()
    assert_close(model, ref_model)
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------------------- learning rates
@pytest.mark.parametrize("lr", [-1e-3, float("nan"), float("inf"), 1e39])
def test_learning_rates_outside_float32_are_refused(lr):
    model = mlp()
    with pytest.raises(ValueError, match="float32"):
        AdaLomo(model, lr=lr)
    opt = Lomo(model, lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="float32"):
        opt.fused_backward(mse(model), lr)
    with pytest.raises(ValueError, match="float32"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "lr": lr})
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.fused_backward(mse(model), 1e-3)  # usable afterwards


# ------------------------------------------------------------------ reentrant checkpoint conflicts
class OutsideLast(torch.nn.Module):
    """``a`` is used inside a reentrant checkpoint segment and again after it: its outer
    gradient is complete (and handed over) before the segment is recomputed."""

    def __init__(self, ckpt):
        super().__init__()
        torch.manual_seed(3)
        self.a, self.b, self.ckpt = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), ckpt

    def seg(self, h):
        return torch.tanh(self.b(torch.tanh(self.a(h))))

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        x = x.clone().requires_grad_(True)
        h = checkpoint(self.seg, x, use_reentrant=True) if self.ckpt else self.seg(x)
        return self.a(h).pow(2).mean()


def test_reentrant_conflict_in_a_norm_or_accumulate_backward_changes_nothing():
    """A parameter used inside a reentrant segment and after it: the first backward learns it
    and raises. In a NORM or ACCUMULATE backward nothing is updated, and the error says so and
    names every such parameter at once (it named one per step, each time saying the step was
    abandoned part-way); no partial gradient is left in .grad; the step run again trains as
    the model without checkpointing."""
    model, plain = OutsideLast(ckpt=True), OutsideLast(ckpt=False)
    opt = AdaLomo(model, lr=0.05, clip_grad_norm=1.0, accumulation_steps=2)
    ref = Reference(plain, "adalomo", 0.05, clip=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    xs = torch.randn(4, 3, 8)
    with pytest.raises(RuntimeError, match=r"'a.bias', 'a.weight'.*Nothing was updated"):
        opt.fused_backward(model(xs[0]) / 2)  # the first micro-batch: ACCUMULATE
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert opt.native.accum_pending == 0
    for s in range(2):
        total = 0
        for j in range(2):
            loss = model(xs[2 * s + j]) / 2
            opt.grad_norm(loss)
            opt.fused_backward(loss)
            total = total + plain(xs[2 * s + j]) / 2
        ref.step(total)
        assert_close(model, plain)


def test_reentrant_conflict_in_an_update_backward_says_it_was_partial():
    model = OutsideLast(ckpt=True)
    opt = Lomo(model, lr=0.05)
    with pytest.raises(RuntimeError, match=r"'a.bias', 'a.weight'.*abandoned part-way"):
        opt.fused_backward(model(torch.randn(3, 8)), 0.05)
    assert all(p.grad is None for p in model.parameters())
    plain = copy.deepcopy(model)
    plain.ckpt = False
    ref = Reference(plain, "lomo", 0.05)
    x = torch.randn(3, 8)
    opt.fused_backward(model(x), 0.05)
    ref.step(plain(x))
    assert_close(model, plain)


@pytest.mark.parametrize("accumulate", [False, True])
def test_a_failed_backward_leaves_no_gradient_behind(accumulate):
    """Another post-accumulate-grad hook of a parameter, registered before the optimizer's,
    raises: the backward stops with that parameter's .grad set and its (optimizer) hook never
    run. That .grad was left, and the next step added it to its own gradient silently."""
    model = mlp()
    plain = copy.deepcopy(model)
    armed = [True]

    def user_hook(p):
        if armed[0]:
            armed[0] = False
            raise ValueError("the user's hook failed")

    model[2].weight.register_post_accumulate_grad_hook(user_hook)
    opt = Lomo(model, lr=0.05, clip_grad_norm=1e-3, accumulation_steps=2 if accumulate else 1)
    ref = Reference(plain, "lomo", 0.05, clip=1e-3)
    xs, ys = torch.randn(3, 4, 8), torch.randn(3, 4, 3)
    with pytest.raises(ValueError, match="user's hook"):
        loss = mse(model, xs[0], ys[0])
        opt.grad_norm(loss)  # without accumulation: a NORM backward, nothing is updated
        opt.fused_backward(loss)  # with: an ACCUMULATE backward, nothing is updated
    assert all(p.grad is None for p in model.parameters())
    k = 2 if accumulate else 1
    total = 0
    for j in range(1, 1 + k):
        loss = mse(model, xs[j], ys[j]) / k
        opt.grad_norm(loss)
        opt.fused_backward(loss, 0.05)
        total = total + mse(plain, xs[j], ys[j]) / k
    ref.step(total)
    assert_close(model, plain)


# ------------------------------------------------------------------- layouts changed mid-training
@pytest.mark.parametrize("cls,algorithm", [(Lomo, "lomo"), (AdaLomo, "adalomo")])
def test_memory_format_changed_after_construction(cls, algorithm):
    """model.to(memory_format=...) after the optimizer was built re-registers the weights. LOMO
    registers a permuted weight in memory order (another shape), and the re-registration
    refused its own state ('has shape [2, 4, 2, 2] in the checkpoint but [2, 2, 2, 4] here')."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 2))
    plain = copy.deepcopy(model)
    opt = cls(model, lr=0.05, clip_grad_norm=1.0)
    ref = Reference(plain, algorithm, 0.05, clip=1.0)
    x = torch.randn(2, 3, 6, 6)
    for i, fmt in enumerate([None, torch.channels_last, None, torch.contiguous_format, None]):
        if fmt is not None:
            model.to(memory_format=fmt)
        loss = model(x).pow(2).mean()
        opt.grad_norm(loss)
        opt.fused_backward(loss, 0.05)
        ref.step(plain(x).pow(2).mean())
        assert_close(model, plain)
    assert int(opt.state_dict()["state"][0]["step"]) == 5


def test_lomo_legacy_state_loads_into_another_memory_format():
    """The same for a lomo_native.torch/1 state dict (the library's blob, which records the
    registered shapes) saved with one layout and loaded with another."""
    from lomo_native import _torch_fused

    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 4, 2)
    other = copy.deepcopy(model).to(memory_format=torch.channels_last)
    opt = Lomo(model, lr=0.1)
    opt.fused_backward(model(torch.randn(2, 3, 5, 5)).sum())
    legacy = {"format": _torch_fused._STATE_FORMAT, "algorithm": "lomo",
              "param_names": list(opt._entries), "groups": [dict(g) for g in opt.param_groups],
              "native": opt.native.state_bytes(), "lr": 0.1}
    opt2 = Lomo(other, lr=0.1)
    opt2.load_state_dict(legacy)
    assert int(opt2.state_dict()["state"][0]["step"]) == 1


# ---------------------------------------------------------------- a bad loss in the middle of a step
@pytest.mark.parametrize("kind", ["detached", "no_grad", "vector"])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_a_bad_loss_mid_accumulation_keeps_the_step(kind, clip):
    """A loss backward() refuses (detached, made under no_grad, not one element) on the second
    micro-batch: raised inside the ACCUMULATE backward, it cancelled the step and silently
    discarded the first micro-batch, so the retried step applied only the others. It is now
    refused before anything begins."""
    model = mlp()
    plain = copy.deepcopy(model)
    opt = Lomo(model, lr=0.05, clip_grad_norm=clip, accumulation_steps=3)
    ref = Reference(plain, "lomo", 0.05, clip=clip)
    xs, ys = torch.randn(3, 4, 8), torch.randn(3, 4, 3)

    def micro(j, loss):
        if clip:
            opt.grad_norm(loss)
        opt.fused_backward(loss)

    micro(0, mse(model, xs[0], ys[0]))
    if kind == "detached":
        bad = mse(model, xs[1], ys[1]).detach()
    elif kind == "no_grad":
        with torch.no_grad():
            bad = mse(model, xs[1], ys[1])
    else:
        bad = ((model(xs[1]) - ys[1]) ** 2).mean(1)
    with pytest.raises(RuntimeError, match="nothing was changed"):
        micro(1, bad)
    assert opt.native.accum_pending == 1
    for j in (1, 2):
        micro(j, mse(model, xs[j], ys[j]))
    ref.step(sum(mse(plain, xs[j], ys[j]) for j in range(3)))
    assert_close(model, plain)
