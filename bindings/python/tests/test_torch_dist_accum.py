"""Gradient accumulation (``accumulation_steps=k``) together with distribution: 2 gloo processes
on the CPU, each running k = 2 micro-batches of its part of the batch per step, must train like
one process without accumulation on the whole batch — FSDP2 models (``fully_shard``: the pieces
accumulate their reduce-scattered gradients in the library, which runs the pieces' passes at the
step's end in parameter order) and replicated models with ``process_group=`` (each micro-batch's
gradient is averaged across the ranks from its hook, then accumulated) — AdaLomo and LOMO, with
global norm clipping, the sum (losses divided by k) and the mean reduction, ``step_info()``
identical on every rank."""

import os

import pytest
import torch

torch_dist = pytest.importorskip("torch.distributed")
if not torch_dist.is_available() or not torch_dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)
fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("this torch has no FSDP2 (fully_shard)", allow_module_level=True)

from lomo_native.torch import AdaLomo, Lomo  # noqa: E402

WORLD = 2
K = 2
STEPS = 3
BATCH = 16


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 1, generator=g)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3),
                               torch.nn.Tanh(), torch.nn.Linear(3, 1))


def _shard(model):
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fsdp.fully_shard(layer)
    fsdp.fully_shard(model)
    return model


CASES = {
    # name: (optimizer factory (model, process_group, k), reduction, FSDP2)
    "fsdp_adalomo_mean": (lambda m, pg, k: AdaLomo(m, lr=0.05, weight_decay=0.01,
                                                    accumulation_steps=k,
                                                    accumulation_reduction="mean"), "mean", True),
    "fsdp_adalomo_clip_sum": (lambda m, pg, k: AdaLomo(m, lr=0.05, clip_grad_norm=0.3,
                                                       accumulation_steps=k), "sum", True),
    "fsdp_lomo_clip_mean": (lambda m, pg, k: Lomo(m, lr=0.1, clip_grad_norm=0.2,
                                                  accumulation_steps=k,
                                                  accumulation_reduction="mean"), "mean", True),
    "pg_adalomo_clip_sum": (lambda m, pg, k: AdaLomo(m, lr=0.05, clip_grad_norm=0.3,
                                                     process_group=pg, accumulation_steps=k),
                            "sum", False),
    "pg_lomo_mean": (lambda m, pg, k: Lomo(m, lr=0.1, weight_decay=0.01, process_group=pg,
                                           accumulation_steps=k, accumulation_reduction="mean"),
                     "mean", False),
}


def _full(model):
    out = {}
    for n, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[n] = t.detach().clone()
    return out


def _train(case, rows, k, dist):
    """Trains a fresh model on the samples ``rows`` in ``k`` micro-batches per step (sharded with
    FSDP2, or with ``process_group``, when ``dist``); returns the whole parameters and every
    step's StepInfo."""
    make, reduction, sharded = CASES[case]
    model = _model()
    if dist and sharded:
        _shard(model)
    opt = make(model, torch_dist.group.WORLD if dist and not sharded else None, k)
    x, y = _data()
    idx = list(range(BATCH))[rows]
    per = len(idx) // k
    infos = []
    for _ in range(STEPS):
        for j in range(k):
            mb = idx[per * j:per * (j + 1)]

            def loss_of():
                loss = torch.nn.functional.mse_loss(model(x[mb]), y[mb])
                return loss / k if reduction == "sum" else loss

            loss = loss_of()
            if j == k - 1 and opt.clip_grad_norm is not None:
                opt.grad_norm(loss)
                loss = loss_of()  # LOMO's second backward, and FSDP2 gathers again
            opt.fused_backward(loss, lr=None)
        infos.append(opt.step_info())
        assert not any(p.grad is not None for p in model.parameters())
    return _full(model), infos


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                  world_size=WORLD)
    try:
        part = BATCH // WORLD
        rows = slice(part * rank, part * (rank + 1))
        results = {case: _train(case, rows, K, True) for case in CASES}
        torch.save({"results": results}, os.path.join(out_dir, f"{rank}.pt"))
        torch_dist.barrier()  # gloo: a rank that tears down while a peer still sends aborts
    finally:
        torch_dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    d = tmp_path_factory.mktemp("distaccum")
    torch.multiprocessing.spawn(_worker, args=(str(d / "init"), str(d)), nprocs=WORLD, join=True)
    return [torch.load(d / f"{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("case", list(CASES))
def test_accumulating_ranks_equal_one_process_on_the_whole_batch(ranks, case):
    whole, whole_infos = _train(case, slice(0, BATCH), 1, False)
    # the comparison can fail: rank 0's part alone, or its last micro-batch alone, ends elsewhere
    part, _ = _train(case, slice(0, BATCH // WORLD), K, False)
    last, _ = _train(case, slice(BATCH // WORLD // K, BATCH // WORLD), 1, False)
    r0, infos0 = ranks[0]["results"][case]
    for r in ranks:
        params, infos = r["results"][case]
        assert list(map(repr, infos)) == list(map(repr, infos0))
        for name, w in params.items():
            assert torch.equal(w, r0[name]), name  # replicas / assembled pieces agree
    for name, w in whole.items():
        torch.testing.assert_close(r0[name], w, rtol=1e-5, atol=1e-6)
    for other in (part, last):
        assert any((other[n] - whole[n]).abs().max() > 1e-3 for n in whole)
    for info, ref in zip(infos0, whole_infos):
        assert info.step == ref.step and info.skipped == ref.skipped
        if "clip" in case:
            assert info.grad_norm == pytest.approx(ref.grad_norm, rel=1e-5)
            assert info.clip_coef == pytest.approx(ref.clip_coef, rel=1e-5)
            assert info.clip_coef < 1.0  # clipping was active
