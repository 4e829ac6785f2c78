"""Optimizer state in torch's layout (issue 11, item 3, fourth bullet): ``state_dict()`` /
``load_state_dict()`` per rank and ``torch.distributed.checkpoint`` (``get_optimizer_state_dict``
/ ``set_optimizer_state_dict``, ``get_state_dict`` / ``set_state_dict``, ``dcp.save`` /
``dcp.load``) on a plain model and on an FSDP2 model over 2 gloo ranks. Reading the state never
steps (DCP used to call ``step()`` on zero gradients: AdaLomo's t advanced and its statistics
moved); a fresh optimizer loaded from it continues bit for bit like an uninterrupted run."""

import copy
import os

import pytest
import torch

torch_dist = pytest.importorskip("torch.distributed")
dcp = pytest.importorskip("torch.distributed.checkpoint")
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    get_model_state_dict, get_optimizer_state_dict, get_state_dict, set_model_state_dict,
    set_optimizer_state_dict, set_state_dict)

from lomo_native.torch import AdaLomo, Lomo  # noqa: E402

STEPS, SPLIT = 5, 2


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3),
                               torch.nn.LayerNorm(3), torch.nn.Linear(3, 1)).to(dtype)


def _batch(step, rows=slice(None), dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(12, 6, generator=g), torch.randn(12, 1, generator=g)
    return x[rows].to(dtype), y[rows].to(dtype)


MAKERS = {
    "adalomo": lambda m: AdaLomo(m, lr=0.05, clip_grad_norm=0.5, no_decay=True,
                                 weight_decay=0.01),
    "lomo_fp16": lambda m: Lomo(m, lr=0.1, loss_scale_args={"init_scale": 2.0 ** 20,
                                                            "scale_window": 2}),
}
DTYPES = {"adalomo": torch.float32, "lomo_fp16": torch.float16}


def _steps(model, opt, begin, end, rows=slice(None), dtype=torch.float32):
    for s in range(begin, end):
        x, y = _batch(s, rows, dtype)
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        if opt.clip_grad_norm is not None:
            opt.grad_norm(loss)
        opt.fused_backward(loss, lr=None)


def _fresh(case, model_state):
    model = _model(DTYPES[case])
    model.load_state_dict(model_state)
    return model, MAKERS[case](model)


@pytest.mark.parametrize("case", list(MAKERS))
def test_reading_the_state_changes_nothing_and_has_torchs_layout(case):
    model = _model(DTYPES[case])
    opt = MAKERS[case](model)
    _steps(model, opt, 0, 1, dtype=DTYPES[case])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    native, info = opt.native.state_bytes(), opt.step_info()
    osd = get_optimizer_state_dict(model, opt)
    assert opt.native.state_bytes() == native  # no step on zero gradients
    assert opt.step_info() == info or repr(opt.step_info()) == repr(info)
    assert [g["lr"] for g in opt.param_groups] == [0.05 if case == "adalomo" else 0.1] * len(
        opt.param_groups)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    names = [n for n, p in model.named_parameters()]
    assert sorted(osd["state"]) == sorted(names)  # one entry per trainable parameter
    st = osd["state"]["0.weight"]
    assert int(st["step"]) == info.step
    if case == "adalomo":
        assert st["exp_avg_sq_row"].shape == (16,) and st["exp_avg_sq_col"].shape == (6,)
        assert osd["state"]["0.bias"]["exp_avg_sq"].shape == (16,)
        assert (st["exp_avg_sq_row"] > 0).all()
    else:
        assert set(st) == {"step"}
        assert osd["param_groups"][0]["lomo_loss_scale"] == opt.loss_scale
    assert opt.state[model[0].weight]["step"] == info.step  # torch's per-parameter view


@pytest.mark.parametrize("case", list(MAKERS))
@pytest.mark.parametrize("via", ["state_dict", "get_set", "get_set_state", "dcp"])
def test_resume_equals_the_uninterrupted_run(case, via, tmp_path):
    dtype = DTYPES[case]
    model = _model(dtype)
    opt = MAKERS[case](model)
    _steps(model, opt, 0, STEPS, dtype=dtype)
    straight = {n: p.detach().clone() for n, p in model.named_parameters()}

    model = _model(dtype)
    opt = MAKERS[case](model)
    _steps(model, opt, 0, SPLIT, dtype=dtype)
    if via == "state_dict":
        torch.save(opt.state_dict(), tmp_path / "opt.pt")
        model2, opt2 = _fresh(case, model.state_dict())
        opt2.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=False))
    elif via == "get_set":
        osd = copy.deepcopy(get_optimizer_state_dict(model, opt))
        model2, opt2 = _fresh(case, model.state_dict())
        set_optimizer_state_dict(model2, opt2, osd)
    elif via == "get_set_state":
        msd, osd = get_state_dict(model, opt)
        msd, osd = copy.deepcopy(msd), copy.deepcopy(osd)
        model2 = _model(dtype)
        opt2 = MAKERS[case](model2)
        set_state_dict(model2, opt2, model_state_dict=msd, optim_state_dict=osd)
    else:
        dcp.save({"model": get_model_state_dict(model),
                  "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(tmp_path))
        model2 = _model(dtype)
        opt2 = MAKERS[case](model2)
        sd = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
        dcp.load(sd, checkpoint_id=str(tmp_path))
        set_model_state_dict(model2, sd["model"])
        set_optimizer_state_dict(model2, opt2, sd["optim"])
    assert opt2.native.state_bytes() == opt.native.state_bytes()
    _steps(model2, opt2, SPLIT, STEPS, dtype=dtype)
    for n, p in model2.named_parameters():
        assert torch.equal(p, straight[n]), n
    # the comparison can fail: a fresh optimizer without the state ends elsewhere
    model3, opt3 = _fresh(case, model.state_dict())
    _steps(model3, opt3, SPLIT, STEPS, dtype=dtype)
    assert any(not torch.equal(p, straight[n]) for n, p in model3.named_parameters())


def test_a_wrong_state_raises_with_nothing_changed():
    model = _model()
    opt = MAKERS["adalomo"](model)
    _steps(model, opt, 0, 1)
    sd = opt.state_dict()
    before = opt.native.state_bytes()
    bad = copy.deepcopy(sd)
    bad["state"][0]["exp_avg_sq_row"] = torch.zeros(5)
    with pytest.raises(ValueError, match="exp_avg_sq_row"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    del bad["state"][1]
    with pytest.raises(ValueError, match="no state"):
        opt.load_state_dict(bad)
    with pytest.raises(ValueError, match="lomo"):
        Lomo(_model(), lr=0.1).load_state_dict(sd)
    assert opt.native.state_bytes() == before


# ------------------------------------------------------------------------------ FSDP2, 2 ranks
WORLD = 2


def _fsdp_model():
    from torch.distributed.fsdp import fully_shard

    model = _model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _full(model):
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def _fsdp_worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                  world_size=WORLD)
    try:
        rows = slice(6 * rank, 6 * rank + 6)
        out = {}
        for case in ("adalomo",):
            model = _fsdp_model()
            opt = MAKERS[case](model)
            _steps(model, opt, 0, STEPS, rows)
            out["straight"] = _full(model)
            model = _fsdp_model()
            opt = MAKERS[case](model)
            _steps(model, opt, 0, SPLIT, rows)
            osd = get_optimizer_state_dict(model, opt)
            out["row_is_dtensor"] = type(osd["state"]["0.weight"]["exp_avg_sq_row"]).__name__
            ckpt = os.path.join(out_dir, "ckpt")
            dcp.save({"model": get_model_state_dict(model), "optim": osd}, checkpoint_id=ckpt)
            out["saved_state"] = {n: {k: v.full_tensor() if hasattr(v, "full_tensor") else v
                                      for k, v in st.items()} for n, st in osd["state"].items()}
            out["saved_params"] = _full(model)
            for via in ("dcp", "get_set"):
                model2 = _fsdp_model()
                opt2 = MAKERS[case](model2)
                if via == "dcp":
                    sd = {"model": get_model_state_dict(model2),
                          "optim": get_optimizer_state_dict(model2, opt2)}
                    dcp.load(sd, checkpoint_id=ckpt)
                    set_state_dict(model2, opt2, model_state_dict=sd["model"],
                                   optim_state_dict=sd["optim"])
                else:
                    set_model_state_dict(model2, get_model_state_dict(model))
                    set_optimizer_state_dict(model2, opt2, get_optimizer_state_dict(model, opt))
                out[via + "_same_state"] = opt2.native.state_bytes() == opt.native.state_bytes()
                _steps(model2, opt2, SPLIT, STEPS, rows)
                out[via] = _full(model2)
        torch.save(out, os.path.join(out_dir, f"{rank}.pt"))
        torch_dist.barrier()  # gloo: a rank that tears down while a peer still sends aborts
    finally:
        torch_dist.destroy_process_group()


def test_fsdp2_resume_equals_the_uninterrupted_run(tmp_path):
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard") or not torch_dist.is_gloo_available():
        pytest.skip("no FSDP2 or gloo")
    torch.multiprocessing.spawn(_fsdp_worker, args=(str(tmp_path / "init"), str(tmp_path)),
                                nprocs=WORLD, join=True)
    for r in range(WORLD):
        out = torch.load(tmp_path / f"{r}.pt", weights_only=False)
        assert out["row_is_dtensor"] == "DTensor"
        for via in ("dcp", "get_set"):
            assert out[via + "_same_state"], via
            for n, w in out["straight"].items():
                assert torch.equal(out[via][n], w), (r, via, n)
    # resharding: the 2-rank checkpoint loads into one process holding the whole model, with
    # the statistics each rank saved in their places
    out = torch.load(tmp_path / "0.pt", weights_only=False)
    model = _model()
    opt = MAKERS["adalomo"](model)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=str(tmp_path / "ckpt"))
    set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    assert opt.step_info().step == SPLIT
    state = get_optimizer_state_dict(model, opt)["state"]
    assert sorted(state) == sorted(out["saved_state"])
    for n, st in out["saved_state"].items():
        for k, v in st.items():
            assert torch.equal(state[n][k], v), (n, k)
    for n, p in model.named_parameters():
        assert torch.equal(p, out["saved_params"][n]), n
