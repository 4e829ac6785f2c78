"""DeepSpeed-ZeRO-3-style flat partitions (issue 11, item 3, third bullet): two processes (gloo,
CPU), each owning ``ceil(numel / 2)``-element flat ranges of every parameter (pieces that cut
rows, a short last piece, an empty one for a 1-element bias) registered as ``LOMO_LAYOUT_FLAT``
with ``LOMO_GRAD_REDUCE_SCATTER`` through ``lomo_native._torch_flat``, each running backward on
half of the batch, must train like one process with the PyTorch drop-in on the whole batch —
also accumulating each half in two micro-batches (``FlatPartition.accumulate``)."""

import os

import pytest
import torch

torch_dist = pytest.importorskip("torch.distributed")
if not torch_dist.is_available() or not torch_dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from lomo_native._torch_flat import FlatPartition, partition  # noqa: E402
from lomo_native.torch import AdaLomo, Lomo  # noqa: E402

WORLD = 2
STEPS = 3

CASES = {
    # name: (FlatPartition kwargs, drop-in factory)
    "adalomo_clip": (dict(algorithm="adalomo", clip_grad_norm=0.5),
                     lambda m: AdaLomo(m, lr=0.05, clip_grad_norm=0.5)),
    "adalomo": (dict(algorithm="adalomo"), lambda m: AdaLomo(m, lr=0.05)),
    "lomo_wd": (dict(algorithm="lomo", weight_decay=0.01),
                lambda m: Lomo(m, lr=0.05, weight_decay=0.01)),
    # gradient accumulation: each rank's half in 2 micro-batches (mean), the buffers of whole
    # local gradients reduce-scattered once at the step's end
    "adalomo_clip_accum": (dict(algorithm="adalomo", clip_grad_norm=0.5),
                           lambda m: AdaLomo(m, lr=0.05, clip_grad_norm=0.5)),
    "lomo_accum": (dict(algorithm="lomo", weight_decay=0.01),
                   lambda m: Lomo(m, lr=0.05, weight_decay=0.01)),
}


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=g), torch.randn(8, 1, generator=g)


def _model():
    torch.manual_seed(0)
    # weights [16, 6] and [1, 16]: pieces of 48 and 8 elements cut rows; the [1] bias leaves
    # rank 1 an empty piece
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def _loss(model, rows):
    x, y = _data()
    return torch.nn.functional.mse_loss(model(x[rows]), y[rows])


def _train_flat(case, rows, pg):
    kwargs, _ = CASES[case]
    model = _model()
    flat = FlatPartition(model, pg, **kwargs)
    accum = case.endswith("_accum")
    if accum:
        flat.opt.accum_enable("f32", "mean")
        first, second = slice(rows.start, rows.start + 2), slice(rows.start + 2, rows.stop)
    norms = []
    for _ in range(STEPS):
        if accum:
            flat.accumulate(_loss(model, first))
            flat.fused_backward(_loss(model, second), lr=0.05)
        else:
            flat.fused_backward(_loss(model, rows), lr=0.05)
        norms.append(flat.step_info().grad_norm)
    assert all(p.grad is None for p in model.parameters())
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    flat.close()
    return out, norms


def _train_whole(case, rows):
    _, make = CASES[case]
    model = _model()
    opt = make(model)
    norms = []
    for _ in range(STEPS):
        loss = _loss(model, rows)
        if opt.clip_grad_norm is not None:
            opt.grad_norm(loss)
            norms.append(opt.step_info().grad_norm)
        opt.fused_backward(loss, lr=0.05)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, norms


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                  world_size=WORLD)
    try:
        half = slice(4 * rank, 4 * rank + 4)
        results = {case: _train_flat(case, half, torch_dist.group.WORLD) for case in CASES}
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        torch_dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    d = tmp_path_factory.mktemp("flat")
    torch.multiprocessing.spawn(_worker, args=(str(d / "init"), str(d)), nprocs=WORLD, join=True)
    return [torch.load(d / f"{r}.pt") for r in range(WORLD)]


def test_partition_is_deepspeeds():
    # ceil(numel / world) per rank, the last ranges short or empty
    assert [partition(1, 2, r) for r in range(2)] == [(0, 1), (1, 1)]
    assert [partition(16, 3, r) for r in range(3)] == [(0, 6), (6, 12), (12, 16)]
    assert [partition(5, 4, r) for r in range(4)] == [(0, 2), (2, 4), (4, 5), (5, 5)]


@pytest.mark.parametrize("case", list(CASES))
def test_two_flat_partitions_equal_one_process_on_the_whole_batch(ranks, case):
    whole, whole_norms = _train_whole(case, slice(0, 8))
    half, _ = _train_whole(case, slice(0, 4))
    r0, norms0 = ranks[0][case]
    r1, norms1 = ranks[1][case]
    for name, w in whole.items():
        # every rank gathers the same parameters
        assert torch.equal(r0[name], r1[name]), name
        torch.testing.assert_close(r0[name], w, rtol=1e-5, atol=1e-6)
    # the comparison can fail: training on rank 0's half alone ends elsewhere
    assert any((half[n] - whole[n]).abs().max() > 1e-3 for n in whole)
    if whole_norms:  # with clipping: the global norm, the same on both ranks
        assert norms0 == norms1
        assert norms0 == pytest.approx(whole_norms, rel=1e-5)
