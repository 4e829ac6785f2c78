"""The PyTorch binding's per-parameter machinery: how a parameter's memory is described to the
library (layouts other than contiguous), the checks every gradient passes before its pointer
crosses, and the post-accumulate-grad hook (with gradients of reentrant checkpoint segments
deferred to the end of backward). Used by :mod:`lomo_native.torch`."""

from __future__ import annotations

import weakref
from typing import Optional

import torch

from . import _native as N
from . import _torch_dist as TD
from . import _torch_fsdp as TF

_DTYPES = {torch.float32: N.DTYPE_F32, torch.float16: N.DTYPE_F16, torch.bfloat16: N.DTYPE_BF16}

# The graph task of the running backward (-1 outside one); a hook that runs in another task than
# the outer backward runs inside a reentrant checkpoint's recomputation.
_graph_task_id = getattr(torch._C, "_current_graph_task_id", None)


def memory_order(p: torch.Tensor) -> Optional[list]:
    """None for a contiguous tensor; for a dense non-overlapping one (every element at its own
    address, no gaps: channels_last, transposed views), the permutation ``perm`` such that
    ``p.permute(perm)`` is contiguous, with size-1 dimensions first except a size-1 last
    dimension, which stays last; raises ValueError for anything else (overlapping views, views
    with gaps)."""
    if p.is_contiguous():
        return None
    n = p.dim()
    real = sorted((d for d in range(n) if p.size(d) != 1), key=lambda d: (-p.stride(d), d))
    ones = [d for d in range(n) if p.size(d) == 1 and d != n - 1]
    perm = ones + real + ([n - 1] if p.size(n - 1) == 1 else [])
    if not p.permute(perm).is_contiguous():
        raise ValueError("the parameter is neither contiguous nor dense and non-overlapping "
                         f"(shape {tuple(p.shape)}, strides {p.stride()})")
    return perm


def registered_layout(name: str, p: torch.Tensor, algorithm: str):
    """``(perm, shape)``: the memory-order permutation (None when contiguous) and the shape the
    library is given for ``p``, whose buffer it updates in place.

    LOMO is elementwise, so any dense non-overlapping parameter is registered in memory order and
    gives the contiguous result. AdaLomo's statistics are defined on the logical view
    ``[prod(shape[:-1]), shape[-1]]``; a memory order that keeps the last dimension innermost
    only permutes its rows, and a transposed matrix swaps rows and columns (the factored
    estimate is symmetric in them), so both give the contiguous result up to the order of f32
    sums. Other orders (channels_last convolution weights) are refused: AdaLomo would factor
    other dimensions."""
    perm = memory_order(p)
    if perm is None:
        return None, tuple(p.shape)
    shape = tuple(p.shape[d] for d in perm)
    if algorithm == "adalomo":
        n = p.dim()
        real = [d for d in perm if p.size(d) != 1]
        transposed = len(real) == 2 and real[0] == n - 1
        if not (perm[-1] == n - 1 or transposed):
            raise ValueError(
                f"{name}: AdaLomo factors the last dimension of a parameter, but in this "
                f"layout (shape {tuple(p.shape)}, strides {p.stride()}) it is not innermost, "
                "so the library cannot update it in place with AdaLomo's statistics; make it "
                "contiguous before building the optimizer (e.g. "
                "module.to(memory_format=torch.contiguous_format)), or use Lomo")
    return perm, shape


class Entry:
    """One registered parameter: its library id, name, a weak reference to the tensor (the
    optimizer must not keep replaced parameters alive), its data address and layout (of the
    local shard for an FSDP2 DTensor)."""

    __slots__ = ("pid", "name", "ref", "ptr", "perm", "shape", "strides", "dtype", "device",
                 "handle")

    def __init__(self, pid: int, name: str, p: torch.Tensor, perm, handle=None):
        self.pid = pid
        self.name = name
        self.ref = weakref.ref(p)
        lp = TF.local(p)
        self.ptr = lp.data_ptr()
        self.perm = perm
        self.shape = tuple(lp.shape)
        self.strides = lp.stride()
        self.dtype = p.dtype
        self.device = p.device
        self.handle = handle

    def param(self) -> Optional[torch.Tensor]:
        return self.ref()

    def holds(self, p: torch.Tensor) -> bool:
        """Whether the registration still describes ``p`` (same object, same memory, same
        shape and strides)."""
        lp = TF.local(p)
        return (self.ref() is p and lp.data_ptr() == self.ptr and lp.stride() == self.strides
                and tuple(lp.shape) == self.shape)


def prepared_grad(e: Entry, g: torch.Tensor) -> torch.Tensor:
    """The gradient as the library reads it: dense, of the parameter's shape, a supported dtype,
    on the parameter's device, in the parameter's memory order. Raises RuntimeError (before the
    pointer crosses) when it cannot be. An FSDP2 gradient (a DTensor) gives its local shard."""
    g = TF.local(g)
    if g.layout != torch.strided:
        # Sparse gradients (nn.Embedding(sparse=True)) are densified: duplicate indices summed,
        # the update is that of the same dense gradient.
        g = g.to_dense()
    if tuple(g.shape) != e.shape:
        raise RuntimeError(f"'{e.name}': gradient of shape {tuple(g.shape)} for a parameter of "
                           f"shape {e.shape}")
    if g.dtype not in _DTYPES:
        raise RuntimeError(f"'{e.name}': gradient dtype {g.dtype} is not supported "
                           "(float32, float16, bfloat16)")
    if g.device != e.device:
        raise RuntimeError(f"'{e.name}': gradient on {g.device} for a parameter on {e.device}")
    if e.perm is not None:
        g = g.permute(e.perm)
    return g.contiguous()


def make_hook(opt_ref, e: Entry):
    """The post-accumulate-grad hook of one parameter: O(1), holds the optimizer weakly."""

    def hook(p: torch.Tensor) -> None:
        opt = opt_ref()
        if opt is None:
            return
        if opt._phase is None:
            opt._stray = e.name  # a plain backward(): leave .grad as PyTorch would
            return
        if p.grad is None:
            return
        if TF.local(p).data_ptr() != e.ptr:
            raise RuntimeError(f"'{e.name}' was moved or reallocated during the step (e.g. .to() "
                               "or .data = inside forward/backward)")
        if opt._defers(e):
            return  # .grad stays; later partial gradients accumulate into it
        opt._submit(e, p)

    return hook


def current_task() -> int:
    """The running backward's graph task id (-1 when unknown)."""
    return _graph_task_id() if _graph_task_id is not None else -1


class DeferredGrads:
    """Methods of the fused optimizers that hand gradients over, deferring those of reentrant
    checkpoint segments to the end of backward."""

    def _enter_backward(self, grad_outputs):
        """Pre-hook of the loss's node: the first node of the outer backward."""
        self._outer_task = current_task()

    def _defers(self, e) -> bool:
        """Whether a gradient of ``e`` that just arrived waits for the end of backward: it came
        from inside a reentrant checkpoint's recomputation (another graph task than the outer
        backward), where the same parameter may receive further partial gradients, and the
        segments recomputed later must see the parameter unchanged; or the parameter is known
        to receive such gradients. Its .grad then accumulates them all, and one update with the
        sum is applied at the end of backward (the result of the model without checkpointing)."""
        if e.name in self._pending:
            return True
        task = current_task()
        nested = task != -1 and self._outer_task != -1 and task != self._outer_task
        if nested:
            if e.name in self._submitted:
                self._deferred_names.add(e.name)
                raise RuntimeError(
                    f"'{e.name}' received a gradient inside a reentrant checkpoint segment after "
                    "it was already updated in this backward (it is also used outside the "
                    "segment); from the next step on its gradients are summed and applied at "
                    "the end of backward. This step was abandoned part-way: restore the model "
                    "from a checkpoint, or use use_reentrant=False")
            self._deferred_names.add(e.name)
        if nested or e.name in self._deferred_names:
            self._pending[e.name] = e
            return True
        return False

    def _submit(self, e, p):
        """Hands ``p.grad`` to the library (checked and in the parameter's memory order first)
        and drops it."""
        g = prepared_grad(e, p.grad)
        if self._pg_size is not None:
            g = TD.average(g, self.process_group, self._pg_size)
        stream = None
        if g.is_cuda:
            s = torch.cuda.current_stream(g.device)
            g.record_stream(s)
            stream = s.cuda_stream
        self._native.submit_pointer(e.pid, g.data_ptr(), _DTYPES[g.dtype], stream,
                                    numel=g.numel())
        self._submitted.add(e.name)
        p.grad = None

    def _flush_pending(self):
        """Applies the gradients deferred to the end of backward, in registration order."""
        pending = [e for e in self._entries.values() if e.name in self._pending]
        for e in pending:
            p = e.param()
            if p is not None and p.grad is not None:
                self._submit(e, p)

