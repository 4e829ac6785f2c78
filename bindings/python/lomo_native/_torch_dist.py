"""Data parallel without DDP for :class:`lomo_native.torch.Lomo` / ``AdaLomo``
(``process_group=pg``): the model is replicated on every rank of ``pg``, each rank runs backward
on its own part of the batch, and every gradient is averaged across ``pg`` (one SUM all-reduce,
then a division by the group size) right before it is handed to the library — from its
post-accumulate-grad hook in ``fused_backward``/``grad_norm``, or in ``step()`` for ``.grad``.
Every rank then applies the same averaged gradient, so the replicas stay identical and each step
equals one process on the whole batch (for a loss that is a mean over the batch and equal parts).

No gradient buckets: only the gradient being submitted is alive, as without distribution. The
all-reduces are issued in hook order, which is the same on every rank for the same model; every
rank must run the same steps (``grad_norm``, ``fused_backward``, ``step``) in the same order.
On CUDA it is a plain synchronous ``dist.all_reduce`` from the hook (no side stream, nothing in
flight; not yet run on a GPU)."""

from __future__ import annotations

from typing import Optional

import torch


def check_model(model: torch.nn.Module, process_group) -> None:
    """Refuses a DDP-wrapped model (its buckets hold every gradient, the memory LOMO saves);
    checks that ``process_group`` is usable."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        raise ValueError(
            "the model is wrapped in DistributedDataParallel, whose gradient buckets keep a copy "
            "of every gradient until the end of backward — the memory LOMO exists to save, and "
            "its all-reduce would average what this optimizer has already applied. Pass the "
            "plain module and process_group=<the group> instead: each gradient is then averaged "
            "from its hook and applied at once")
    if process_group is None:
        return
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group was given but torch.distributed is not initialized "
                           "(call torch.distributed.init_process_group first)")


def group_size(process_group) -> Optional[int]:
    """The number of ranks of ``process_group`` (None: no group)."""
    if process_group is None:
        return None
    import torch.distributed as dist

    return dist.get_world_size(process_group)


def average(g: torch.Tensor, process_group, size: int) -> torch.Tensor:
    """``g`` averaged over ``process_group`` (in place: SUM all-reduce, then ``/ size``)."""
    import torch.distributed as dist

    dist.all_reduce(g, op=dist.ReduceOp.SUM, group=process_group)
    if size != 1:
        g.div_(size)
    return g
