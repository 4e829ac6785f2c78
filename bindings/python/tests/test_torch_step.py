"""The non-fused path: ``loss.backward()`` + ``step()`` (any trainer, accelerate, gradient
accumulation) against independent references: lomo-optim 0.1.1's fused step, the SGD update
written out by hand, and the fused path of a second optimizer fed the same batches."""

import copy
import warnings

import pytest
import torch

from conftest import loss_fn, make_batches, make_model, reference_optimizer
from lomo_native.torch import AdaLomo, Lomo

OURS = {"lomo": Lomo, "adalomo": AdaLomo}
LR = {"lomo": 0.1, "adalomo": 0.01}


def assert_same(model, ref, rtol=0.0, atol=0.0):
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        if rtol or atol:
            torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=atol, msg=n)
        else:
            assert torch.equal(p.detach(), q.detach()), n


@pytest.mark.parametrize("kw", [{}, dict(clip_grad_norm=0.5, weight_decay=0.1),
                                dict(clip_grad_value=0.05)], ids=["plain", "clip_wd", "value"])
@pytest.mark.parametrize("algo", ["lomo", "adalomo"])
def test_step_matches_lomo_optim(algo, kw):
    """backward() + step() per batch equals lomo-optim's grad_norm/fused_backward step by step
    (the equivalence tolerance of test_torch_equivalence)."""
    ref_model = make_model("transformer")
    model = copy.deepcopy(ref_model)
    ref = reference_optimizer(algo, ref_model, lr=LR[algo], **kw)
    opt = OURS[algo](model, lr=LR[algo], **kw)
    for b in make_batches("transformer", torch.float32, 3):
        if kw.get("clip_grad_norm"):
            ref.grad_norm(loss_fn("transformer", ref_model, b))
        ref.fused_backward(loss_fn("transformer", ref_model, b), LR[algo])
        opt.zero_grad()
        loss_fn("transformer", model, b).backward()
        opt.step()
        assert_same(model, ref_model, rtol=1e-6, atol=1e-7)
        with torch.no_grad():  # start each step from the same point (see test_torch_equivalence)
            for p, q in zip(model.parameters(), ref_model.parameters()):
                p.copy_(q)
    assert opt.step_info().step == 3


@pytest.mark.parametrize("scaled", [False, True], ids=["plain_loss", "scale_loss"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("algo", ["lomo", "adalomo"])
def test_step_equals_fused_path_bit_for_bit(algo, dtype, scaled):
    """Same model, same batches: the step() path (with AdaLomo's static scale 1024 applied by
    multiplying the plain gradients, or by scale_loss) equals fused_backward exactly, with norm
    clipping (two passes over .grad against two backwards)."""
    fused_model = make_model("transformer", dtype)
    model = copy.deepcopy(fused_model)
    kw = dict(lr=LR[algo], clip_grad_norm=0.5, weight_decay=0.05, no_decay=True)
    fused, opt = OURS[algo](fused_model, **kw), OURS[algo](model, **kw)
    for b in make_batches("transformer", dtype, 3):
        fused.grad_norm(loss_fn("transformer", fused_model, b))
        fused.fused_backward(loss_fn("transformer", fused_model, b))
        loss = loss_fn("transformer", model, b)
        (opt.scale_loss(loss) if scaled else loss).backward()
        opt.step()
        opt.zero_grad()
        assert_same(model, fused_model)
        a, f = opt.step_info(), fused.step_info()
        assert (a.grad_norm, a.clip_coef, a.step) == (f.grad_norm, f.clip_coef, f.step)


def test_step_is_the_sgd_update():
    """Independent of any fused path: p ← p − lr·g from autograd's gradients, group lr_scale."""
    model = make_model("mlp")
    b = make_batches("mlp", torch.float32, 1)[0]
    grads = torch.autograd.grad(loss_fn("mlp", model, b), list(model.parameters()))
    expected = [p.detach() - 0.05 * g for p, g in zip(model.parameters(), grads)]
    opt = Lomo(model, lr=0.1, groups=[{"params": list(model.parameters()), "lr_scale": 0.5}])
    loss_fn("mlp", model, b).backward()
    opt.step()
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-7)
        assert p.grad is not None, "step() leaves .grad as torch's optimizers do"


@pytest.mark.parametrize("algo", ["lomo", "adalomo"])
def test_accumulated_backwards_equal_one_step_on_the_whole_batch(algo):
    """k backwards of loss/k, one step() = one step on the concatenated batch (equal sizes)."""
    whole = make_model("mlp")
    model = copy.deepcopy(whole)
    o1 = OURS[algo](whole, lr=LR[algo], clip_grad_norm=1.0)
    o2 = OURS[algo](model, lr=LR[algo], clip_grad_norm=1.0)
    for step in range(2):
        parts = make_batches("mlp", torch.float32, 4, seed=10 + step)
        x = torch.cat([p[0] for p in parts])
        y = torch.cat([p[1] for p in parts])
        loss_fn("mlp", whole, (x, y)).backward()
        o1.step()
        o1.zero_grad()
        for part in parts:
            (loss_fn("mlp", model, part) / len(parts)).backward()
        o2.step()
        o2.zero_grad()
        assert_same(model, whole, rtol=1e-5, atol=1e-6)
    assert o2.step_info().step == 2


def test_fp16_overflow_in_step_skips_and_backs_off():
    """Dynamic scaling on the non-fused path: an overflowing .grad skips the step with every
    parameter untouched and halves the scale; clean steps apply."""
    torch.manual_seed(0)
    model = make_model("mlp").half()
    x, y = (t.half() for t in make_batches("mlp", torch.float32, 1)[0])
    opt = Lomo(model, lr=0.01)
    assert opt.loss_scale == 2.0 ** 16
    opt.scale_loss(((model(x) - y) ** 2).float().mean()).backward()
    opt.step()
    opt.zero_grad()
    assert opt.step_info().step == 1 and not opt.step_info().skipped
    before = [p.detach().clone() for p in model.parameters()]
    loss = ((model(x) - y) ** 2).float().mean() + model.net[0].bias.float().sum() * 10.0
    opt.scale_loss(loss).backward()  # 10·2^16 overflows fp16
    opt.step()
    info = opt.step_info()
    assert info.skipped and info.overflow and opt.loss_scale == 2.0 ** 15
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_no_gradient_is_a_no_op_and_closure_is_called():
    model = make_model("mlp")
    opt = AdaLomo(model, lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    assert opt.step() is None
    assert opt.step_info().step == 0
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    b = make_batches("mlp", torch.float32, 1)[0]

    def closure():
        opt.zero_grad()
        loss = loss_fn("mlp", model, b)
        loss.backward()
        return loss

    assert isinstance(opt.step(closure), torch.Tensor) and opt.step_info().step == 1


def test_step_after_fused_backward_does_nothing_and_stray_rule_holds():
    model = make_model("mlp")
    opt = Lomo(model, lr=0.1)
    b = make_batches("mlp", torch.float32, 1)[0]
    opt.fused_backward(loss_fn("mlp", model, b))
    snap = [p.detach().clone() for p in model.parameters()]
    opt.step()  # the fused path left no .grad
    assert all(torch.equal(a, p) for a, p in zip(snap, model.parameters()))
    loss_fn("mlp", model, b).backward()
    opt.step()
    with pytest.raises(RuntimeError, match="zero_grad"):  # .grad is still there
        opt.fused_backward(loss_fn("mlp", model, b))
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    opt.fused_backward(loss_fn("mlp", model, b))
    assert opt.step_info().step == 3


def test_model_zero_grad_clears_the_stray_rule_and_state_dict_ignores_grads():
    """The HF Trainer clears gradients with model.zero_grad(), which the optimizer does not
    see: what counts is whether .grad is still set. state_dict() does not care about .grad
    (the stock Trainer's checkpoints)."""
    model = make_model("mlp")
    opt = Lomo(model, lr=0.1)
    b = make_batches("mlp", torch.float32, 1)[0]
    loss_fn("mlp", model, b).backward()
    opt.step()
    state = opt.state_dict()  # .grad is still set: fine for a checkpoint
    with pytest.raises(RuntimeError, match="zero_grad"):
        opt.fused_backward(loss_fn("mlp", model, b))
    with pytest.raises(RuntimeError, match="zero_grad"):  # still there: still refused
        opt.fused_backward(loss_fn("mlp", model, b))
    model.zero_grad()
    opt.fused_backward(loss_fn("mlp", model, b))
    assert opt.step_info().step == 2
    opt.load_state_dict(state)
    assert opt.step_info().step == 1


def test_no_scheduler_warning_and_scheduler_lr_is_used():
    """fused_backward and step() both mark the optimizer as stepped for torch's schedulers."""
    model = make_model("mlp")
    opt = Lomo(model, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    b = make_batches("mlp", torch.float32, 1)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for use_step in (False, True, False):
            if use_step:
                loss_fn("mlp", model, b).backward()
                opt.step()
                opt.zero_grad()
            else:
                opt.fused_backward(loss_fn("mlp", model, b))
            sched.step()
    assert opt.lr == 0.025


def test_accelerate_prepare_trains_like_a_plain_loop():
    """accelerate's prepare() wraps the optimizer; its backward is a plain backward, its step()
    ours. Compared with the same loop on a copy without accelerate."""
    accelerate = pytest.importorskip("accelerate")
    ref_model = make_model("transformer")
    model = copy.deepcopy(ref_model)
    ref = AdaLomo(ref_model, lr=0.01, clip_grad_norm=1.0)
    acc = accelerate.Accelerator(cpu=True)
    model, opt = acc.prepare(model, AdaLomo(model, lr=0.01, clip_grad_norm=1.0))
    for b in make_batches("transformer", torch.float32, 3):
        ref.grad_norm(loss_fn("transformer", ref_model, b))
        ref.fused_backward(loss_fn("transformer", ref_model, b))
        acc.backward(loss_fn("transformer", model, b))
        opt.step()
        opt.zero_grad()
    assert_same(acc.unwrap_model(model), ref_model)
    assert opt.optimizer.step_info().step == 3
