"""Issue 13 kind 3: a parameter frozen when the optimizer was built and later unfrozen with a
plain ``requires_grad_(True)`` (no ``add_param_group``, no re-registration on any module) raises
at the start of the next step, before any parameter changes, in every entry point; once it is
added with ``add_param_group`` (or frozen again) the steps go on."""

import pytest
import torch

from lomo_native.torch import AdaLomo, Lomo


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def unchanged(model, before):
    return all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
@pytest.mark.parametrize("entry", ["fused", "grad_norm", "step"])
def test_unfreezing_without_add_param_group_raises_before_anything_changes(cls, entry):
    torch.manual_seed(1)
    x = torch.randn(5, 4)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    model[0].requires_grad_(False)
    kw = {"clip_grad_norm": 1.0} if entry == "grad_norm" else {}
    opt = cls(model, lr=0.1, **kw)
    assert [n for n, _ in opt._frozen] == ["0.weight", "0.bias"]  # the list checked per step

    def one_step():
        loss = model(x).pow(2).mean()
        if entry == "fused":
            opt.fused_backward(loss, 0.1)
        elif entry == "grad_norm":
            opt.grad_norm(loss)
            opt.fused_backward(loss, 0.1)
        else:
            opt.zero_grad()
            loss.backward()
            opt.step()

    one_step()
    model[0].weight.requires_grad_(True)
    before, info = snapshot(model), opt.step_info()
    with pytest.raises(ValueError, match=r"'0\.weight'.*add_param_group"):
        one_step()
    assert unchanged(model, before), "a parameter changed before the error"
    assert opt.step_info().step == info.step
    # frozen again: the steps go on
    model[0].weight.requires_grad_(False)
    model[0].weight.grad = None
    one_step()
    assert not unchanged(model, before)
    # added with add_param_group: it trains
    model[0].weight.requires_grad_(True)
    opt.zero_grad()  # the step() path leaves .grad, which add_param_group refuses
    opt.add_param_group({"params": [model[0].weight]})
    w = model[0].weight.detach().clone()
    one_step()
    assert not torch.equal(model[0].weight, w)
    assert model[0].weight.grad is None or entry == "step"
