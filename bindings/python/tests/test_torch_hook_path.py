"""The post-accumulate-grad hook's short path (``_torch_params.make_hook``): contiguous CPU
parameters with a matching dense gradient go through one prebuilt ctypes call; everything else
through ``prepared_grad``. Both must give the same parameters bit for bit, the short path must be
the one taken on an ordinary model, and a failing call must raise."""

import pytest
import torch

from conftest import loss_fn, make_batches, make_model
from lomo_native import LomoError
from lomo_native.torch import AdaLomo, Lomo


def _train(cls, dtype, short_path, grad_edit=None, steps=3):
    model = make_model("gpt", dtype)
    if grad_edit is not None:  # registered first: runs before the optimizer's hook
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(grad_edit)
    opt = cls(model, lr=1e-2)
    assert all(e.fast for e in opt._entries.values())  # the model's entries qualify
    if not short_path:
        for e in opt._entries.values():
            e.fast = False
    general = []  # gradients that went through opt._submit (prepared_grad)
    submit = opt._submit
    opt._submit = lambda e, p: (general.append(e.name), submit(e, p))
    for batch in make_batches("gpt", dtype, steps):
        opt.fused_backward(loss_fn("gpt", model, batch), 1e-2)
    assert opt.step_info().step == steps
    if short_path and grad_edit is None:
        assert general == []
    else:
        assert len(general) > 0
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_short_path_equals_the_general_path_bit_for_bit(cls, dtype):
    fast = _train(cls, dtype, True)
    slow = _train(cls, dtype, False)
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [Lomo, AdaLomo])
def test_non_contiguous_gradient_leaves_the_short_path_with_the_same_result(cls):
    def transpose_grad(p):  # same values, column-major memory
        if p.grad is not None and p.grad.dim() == 2:
            p.grad = p.grad.t().contiguous().t()
            assert not p.grad.is_contiguous()

    plain = _train(cls, torch.float32, True)
    edited = _train(cls, torch.float32, True, transpose_grad)
    for a, b in zip(plain, edited):
        assert torch.equal(a, b)


def test_a_failing_submit_on_the_short_path_raises():
    model = make_model("gpt", torch.float32)
    opt_box = []

    def cancel_step(p):  # runs before the optimizer's hook: its submit finds no step
        if p is model.head.weight:
            opt_box[0].native.cancel()

    model.head.weight.register_post_accumulate_grad_hook(cancel_step)
    opt = Lomo(model, lr=1e-2)
    opt_box.append(opt)
    before = model.head.weight.detach().clone()
    batch = make_batches("gpt", torch.float32, 1)[0]
    with pytest.raises(LomoError) as err:
        opt.fused_backward(loss_fn("gpt", model, batch), 1e-2)
    assert err.value.function == "lomo_grad_submit_checked"  # raised by the hook's own call
    assert torch.equal(model.head.weight.detach(), before)
