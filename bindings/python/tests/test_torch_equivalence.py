"""Step-by-step equality of lomo_native.torch with lomo-optim 0.1.1 on the CPU.

Both optimizers start from the same model and see the same batches and learning rates; after
every step the parameters must agree: f32 within rtol 1e-6 (atol 1e-7, reference/semantics.md
§9: reductions such as norms and means may be summed in another order), bf16 within 1 ulp.
After each compared step our model's parameters are reset (in place) to the reference's, so
every step starts from the same point while each optimizer carries its own state (AdaLomo's
statistics, step counter) on. Without that reset, last-bit differences are amplified by
gradients that are zero in exact arithmetic (the attention key bias: softmax is invariant to it),
which AdaLomo normalizes to O(1) updates: a property of the problem, not of either optimizer.
"""

import copy

import pytest
import torch

from conftest import loss_fn, make_batches, make_model, reference_optimizer, ulp_distance
from lomo_native.torch import AdaLomo, Lomo

STEPS = 4
OPTIONS = {
    "defaults": {},
    "norm_clip": dict(clip_grad_norm=0.5),
    "value_clip": dict(clip_grad_value=0.05),
    "weight_decay": dict(weight_decay=0.1),
    "all": dict(clip_grad_norm=1.0, clip_grad_value=0.05, weight_decay=0.1),
}
LRS = {"lomo": [0.1, 0.05, 0.025, 0.0125], "adalomo": [0.01, 0.005, 0.0025, 0.00125]}
OURS = {"lomo": Lomo, "adalomo": AdaLomo}


def run_pair(algo, kind, dtype, kw):
    ref_model = make_model(kind, dtype)
    our_model = copy.deepcopy(ref_model)
    ref = reference_optimizer(algo, ref_model, lr=LRS[algo][0], **kw)
    ours = OURS[algo](our_model, lr=LRS[algo][0], **kw)
    for t, batch in enumerate(make_batches(kind, dtype, STEPS)):
        lr = LRS[algo][t]
        for model, opt in ((ref_model, ref), (our_model, ours)):
            if kw.get("clip_grad_norm"):
                opt.grad_norm(loss_fn(kind, model, batch))
            opt.fused_backward(loss_fn(kind, model, batch), lr)
        ref_p, our_p = dict(ref_model.named_parameters()), dict(our_model.named_parameters())
        yield t, ref_p, our_p, ours
        with torch.no_grad():
            for name, p in ref_p.items():
                our_p[name].copy_(p)  # in place: the registered buffer stays where it is


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("kind", ["mlp", "transformer"])
@pytest.mark.parametrize("algo", ["lomo", "adalomo"])
def test_f32_matches_lomo_optim(algo, kind, option):
    kw = OPTIONS[option]
    changed = False
    for t, ref, ours, opt in run_pair(algo, kind, torch.float32, kw):
        for name, p in ref.items():
            torch.testing.assert_close(ours[name], p, rtol=1e-6, atol=1e-7,
                                       msg=lambda m: f"step {t + 1}, {name}: {m}")
        changed = True
        info = opt.step_info()
        assert info.step == t + 1 and not info.skipped and not info.overflow
    assert changed


@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("kind", ["mlp", "transformer"])
@pytest.mark.parametrize("algo", ["lomo", "adalomo"])
def test_bf16_within_one_ulp_of_lomo_optim(algo, kind, option):
    kw = OPTIONS[option]
    moved = 0
    for t, ref, ours, _ in run_pair(algo, kind, torch.bfloat16, kw):
        for name, p in ref.items():
            dist = ulp_distance(ours[name].detach(), p.detach())
            assert int(dist.max()) <= 1, f"step {t + 1}, {name}: {int(dist.max())} ulp apart"
            moved += 1
    assert moved


def test_updates_really_happen():
    """Guards the comparison above against two optimizers that both do nothing."""
    model = make_model("mlp")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = AdaLomo(model, lr=0.01)
    opt.fused_backward(loss_fn("mlp", model, make_batches("mlp", torch.float32, 1)[0]), 0.01)
    for n, p in model.named_parameters():
        assert not torch.equal(before[n], p), n
        assert p.grad is None, "gradients are dropped after the update"
