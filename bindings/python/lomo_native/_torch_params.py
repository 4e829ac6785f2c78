"""The PyTorch binding's per-parameter machinery: how a parameter's memory is described to the
library (layouts other than contiguous), the checks every gradient passes before its pointer
crosses, and the post-accumulate-grad hook (with gradients of reentrant checkpoint segments
deferred to the end of backward). Used by :mod:`lomo_native.torch`."""

from __future__ import annotations

import ctypes
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


# The ``perm`` of a parameter whose strides are given to the library
# (``lomo_param_set_strides``): registered with its logical shape, gradients in its layout.
STRIDES = "strides"


def registered_layout(name: str, p: torch.Tensor, algorithm: str):
    """``(perm, shape)``: how ``p``, whose buffer the library updates in place, is described to
    it. ``perm`` is None for a contiguous tensor; a permutation when ``p`` is registered in
    memory order with the permuted ``shape``; :data:`STRIDES` when it is registered with its
    own shape and its strides (``lomo_param_set_strides``).

    LOMO is elementwise, so any dense non-overlapping parameter is registered in memory order and
    gives the contiguous result. AdaLomo's statistics are defined on the logical view
    ``[prod(shape[:-1]), shape[-1]]``: on the CPU every non-contiguous parameter is given to the
    library with its strides, which steps on logical-order copies and writes the parameter back
    in place — bit for bit the contiguous result, with the state (and checkpoints) of the
    contiguous parameter. On CUDA (strides not supported there yet) a memory order that keeps
    the last dimension innermost only permutes the rows, and a transposed matrix swaps rows and
    columns (the factored estimate is symmetric in them): both are registered in memory order
    (the contiguous result up to the order of f32 sums; the state is kept in that order, see
    :func:`state_order`); other orders (channels_last convolution weights) are refused."""
    perm = memory_order(p)
    if perm is None:
        return None, tuple(p.shape)
    shape = tuple(p.shape[d] for d in perm)
    if algorithm == "adalomo":
        if p.device.type == "cpu":
            return STRIDES, tuple(p.shape)
        n = p.dim()
        real = [d for d in perm if p.size(d) != 1]
        transposed = len(real) == 2 and real[0] == n - 1
        if not (perm[-1] == n - 1 or transposed):
            raise ValueError(
                f"{name}: AdaLomo factors the last dimension of a parameter, but in this "
                f"layout (shape {tuple(p.shape)}, strides {p.stride()}) it is not "
                "innermost; the library steps such layouts on the CPU only so far; make it "
                "contiguous before building the optimizer (e.g. "
                "module.to(memory_format=torch.contiguous_format)), or use Lomo")
    return perm, shape


def state_order(perm):
    """The order the library keeps a parameter's AdaLomo state in: None for the logical order
    (contiguous and :data:`STRIDES` registrations), else the memory-order permutation (CUDA
    registrations of permuted parameters), whose state is not interchangeable with the
    logical one even when the shapes agree (a square transposed matrix swaps rows and
    columns)."""
    return None if perm is None or perm is STRIDES else tuple(perm)


class Entry:
    """One registered parameter: its library id, name, a weak reference to the tensor (the
    optimizer must not keep replaced parameters alive), its data address and layout (of the
    local shard for an FSDP2 DTensor).

    ``fast`` (a contiguous CPU parameter of a supported dtype) marks the entries whose gradients
    the hook may hand over on its short path (:func:`make_hook`); ``size`` (a ``torch.Size``),
    ``c_pid``, ``c_code`` and ``c_numel`` (ctypes values of the id, dtype code and element
    count) are computed once here so that the hook compares and passes them as they are."""

    __slots__ = ("pid", "name", "ref", "ptr", "perm", "shape", "strides", "dtype", "device",
                 "handle", "fast", "size", "c_pid", "c_code", "c_numel")

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
        code = _DTYPES.get(p.dtype)
        self.fast = perm is None and p.device.type == "cpu" and code is not None
        self.size = p.shape
        self.c_pid = ctypes.c_uint32(pid)
        self.c_code = ctypes.c_uint32(code if code is not None else 0)
        self.c_numel = ctypes.c_uint64(p.numel())

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
    if e.perm is STRIDES:
        return in_layout(e, g)
    if e.perm is not None:
        g = g.permute(e.perm)
    return g.contiguous()


def in_layout(e: Entry, g: torch.Tensor) -> torch.Tensor:
    """``g`` with the strides of a parameter registered with :data:`STRIDES` (a copy when they
    differ, e.g. a contiguous gradient of a channels_last weight); other gradients as they are."""
    if e.perm is not STRIDES or g.stride() == e.strides:
        return g
    out = torch.empty_strided(e.shape, e.strides, dtype=g.dtype, device=g.device)
    return out.copy_(g)


# The hook's short path calls lomo_grad_submit_checked through a function object of its own,
# without the errcheck wrapper (the status is tested inline; a failure raises the same LomoError
# through the library's errcheck). Built once per loaded library.
_RAW_SUBMIT: list = [None, None]  # [library, function object]


def _raw_submit(lib):
    if _RAW_SUBMIT[0] is not lib:
        fn = lib._FuncPtr(("lomo_grad_submit_checked", lib))
        fn.argtypes = lib.lomo_grad_submit_checked.argtypes
        fn.restype = ctypes.c_uint32
        _RAW_SUBMIT[:] = [lib, fn]
    return _RAW_SUBMIT[1]


def make_hook(opt_ref, e: Entry):
    """The post-accumulate-grad hook of one parameter: O(1), holds the optimizer weakly.

    The usual case — a fused phase, a contiguous CPU parameter without a process group, a dense
    contiguous gradient (a plain ``torch.Tensor``, no subclass such as DTensor) of the
    parameter's shape, dtype and device, outside reentrant checkpoint segments — takes a short
    path: the same checks as :func:`prepared_grad` made on values cached
    in the entry, then one ctypes call with prebuilt arguments. Anything else (CUDA, layouts,
    sparse or mismatched gradients, process groups, deferred gradients) goes through
    ``opt._submit`` (``prepared_grad``'s checks and messages). A change to what ``_submit`` does
    for some parameters must also keep them off the short path (``Entry.fast`` or the condition
    below)."""
    strided, plain = torch.strided, torch.Tensor
    task_id = _graph_task_id
    check_status = N.check

    def hook(p: torch.Tensor) -> None:
        opt = opt_ref()
        if opt is None:
            return
        if opt._phase is None:
            opt._stray = e.name  # a plain backward(): leave .grad as PyTorch would
            return
        g = p.grad
        if g is None:
            return
        if TF.local(p).data_ptr() != e.ptr:
            raise RuntimeError(f"'{e.name}' was moved or reallocated during the step (e.g. .to() "
                               "or .data = inside forward/backward)")
        if opt._pending or opt._deferred_names:
            if opt._defers(e):
                return  # .grad stays; later partial gradients accumulate into it
        else:
            outer = opt._outer_task
            if outer != -1 and task_id is not None:
                task = task_id()
                if task != -1 and task != outer and opt._defers(e):
                    return
        native = opt._native
        if (e.fast and opt._pg_size is None and native._checked and type(g) is plain
                and g.layout is strided
                and g.dtype is e.dtype and g.shape == e.size and g.is_cpu
                and g.is_contiguous()):
            status = _raw_submit(native._lib)(native._handle, e.c_pid, g.data_ptr(), e.c_code,
                                              e.c_numel, None)
            if status:
                check_status(status, "lomo_grad_submit_checked")
            opt._submitted.add(e.name)
            p.grad = None
            return
        opt._submit(e, p)

    return hook


def current_task() -> int:
    """The running backward's graph task id (-1 when unknown)."""
    return _graph_task_id() if _graph_task_id is not None else -1


def conflict_error(phase, names) -> RuntimeError:
    """The error of a backward in which parameters received gradients inside a reentrant
    checkpoint segment after their gradient was handed over (they are also used outside it)."""
    listed = ", ".join(f"'{n}'" for n in names)
    if phase == N.PHASE_UPDATE:
        what, outcome = "updated", ("This step was abandoned part-way (the other parameters "
                                    "were updated): restore the model from a checkpoint, or "
                                    "use use_reentrant=False")
    else:  # a NORM or ACCUMULATE backward: nothing is updated there
        what, outcome = "handed over", ("Nothing was updated; the step (with any micro-batches "
                                        "accumulated in it) was discarded: run it again")
    return RuntimeError(
        f"{listed} received gradients inside a reentrant checkpoint segment after being "
        f"{what} in this backward (used outside the segment too); from the next step on their "
        f"gradients are summed and applied at the end of backward. {outcome}")


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
                # Also used outside the segment, and already handed over: the backward runs on
                # (its remaining partial gradients collect in .grad and are dropped), and
                # raises at its end naming every such parameter (conflict_error).
                self._deferred_names.add(e.name)
                self._conflicts.append(e.name)
                self._pending[e.name] = e
                return True
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

