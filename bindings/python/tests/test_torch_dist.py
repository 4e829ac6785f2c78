"""Data parallel with ``process_group`` (issue 11, item 3, first bullet): two processes (gloo,
CPU, ``torch.multiprocessing.spawn``), each holding the whole model and half of the batch, must
train like one process on the whole batch — fused steps (AdaLomo with norm clipping, LOMO) and
``step()`` on ``.grad`` — with the replicas bit-identical; a DDP-wrapped model is refused."""

import os

import pytest
import torch

torch_dist = pytest.importorskip("torch.distributed")
if not torch_dist.is_available() or not torch_dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

from lomo_native.torch import AdaLomo, Lomo  # noqa: E402

WORLD = 2
STEPS = 3


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


CASES = {
    # name: (optimizer factory, fused)
    "adalomo_clip": (lambda m, pg: AdaLomo(m, lr=0.05, clip_grad_norm=0.5, process_group=pg), True),
    "lomo": (lambda m, pg: Lomo(m, lr=0.1, weight_decay=0.01, process_group=pg), True),
    "adalomo_step": (lambda m, pg: AdaLomo(m, lr=0.05, process_group=pg), False),
}


def _train(case, rows, pg):
    """Trains a fresh model on the samples ``rows`` of the batch; returns its parameters and the
    gradient norms reported after every step."""
    make, fused = CASES[case]
    model = _model()
    opt = make(model, pg)
    x, y = _data()
    norms = []
    for _ in range(STEPS):
        loss = torch.nn.functional.mse_loss(model(x[rows]), y[rows])
        if fused:
            if opt.clip_grad_norm is not None:
                opt.grad_norm(loss)
                norms.append(opt.step_info().grad_norm)
            opt.fused_backward(loss, lr=None)
        else:
            loss.backward()
            opt.step()
            opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, norms


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                  world_size=WORLD)
    try:
        half = slice(4 * rank, 4 * rank + 4)
        results = {case: _train(case, half, torch_dist.group.WORLD) for case in CASES}
        try:
            AdaLomo(torch.nn.parallel.DistributedDataParallel(_model()))
            refused = ""
        except ValueError as e:
            refused = str(e)
        torch.save({"results": results, "refused": refused}, os.path.join(out_dir, f"{rank}.pt"))
        torch_dist.barrier()  # gloo: a rank that tears down while a peer still sends aborts
    finally:
        torch_dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    torch.multiprocessing.spawn(_worker, args=(str(d / "init"), str(d)), nprocs=WORLD, join=True)
    return [torch.load(d / f"{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_equal_one_process_on_the_whole_batch(ranks, case):
    whole, whole_norms = _train(case, slice(0, 8), None)
    half, _ = _train(case, slice(0, 4), None)
    r0, norms0 = ranks[0]["results"][case]
    r1, norms1 = ranks[1]["results"][case]
    for name, w in whole.items():
        # the replicas are bit-identical
        assert torch.equal(r0[name], r1[name]), name
        # and equal one process on the whole batch (the mean of two half-batch means is the
        # whole-batch mean up to f32 rounding)
        torch.testing.assert_close(r0[name], w, rtol=1e-5, atol=1e-6)
    # the comparison can fail: training on rank 0's half alone ends elsewhere
    assert any((half[n] - whole[n]).abs().max() > 1e-3 for n in whole)
    assert norms0 == norms1
    assert norms0 == pytest.approx(whole_norms, rel=1e-5)


def test_ddp_wrapped_model_is_refused(ranks):
    assert "DistributedDataParallel" in ranks[0]["refused"]
    assert "process_group" in ranks[0]["refused"]
