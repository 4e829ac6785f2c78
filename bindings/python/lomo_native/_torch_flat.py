"""DeepSpeed-ZeRO-3-style flat partitions through ``LOMO_LAYOUT_FLAT`` +
``LOMO_GRAD_REDUCE_SCATTER``, on a ``torch.distributed`` group (gloo or NCCL-less CPU runs).

:class:`ProcessGroupComm` is a ``lomo_comm`` whose callbacks run ``torch.distributed``
collectives on the buffers the library hands over (host memory: CPU parameters only): an in-place
``all_reduce`` (the f64 statistics and phase records; SUM or MAX) and ``reduce_scatter_tensor``
(the gradients, in their dtype). A callback that raises returns -1, which the library reports as
``LOMO_STATUS_COMM_ERROR`` with nothing changed.

:class:`FlatPartition` reproduces DeepSpeed ZeRO-3's partition rule without DeepSpeed: every
parameter of ``numel`` elements is split into ``P = ceil(numel / world)`` elements per rank,
rank r owning the flat range ``[r·P, min((r+1)·P, numel))`` (the last ranges short or empty: the
padding of ``_aligned_size``/``_padding_size`` in ``deepspeed/runtime/zero/partition_parameters.py``
is not part of the parameter). The optimizer (one ``lomo_optimizer`` per rank) owns those flat
pieces; each rank submits its whole local gradient of every parameter from its
post-accumulate-grad hook and the library reduce-scatters it to the piece, averages it, and
applies LOMO / AdaLomo exactly as one rank holding the whole tensor on the averaged gradient
(AdaLomo's factored statistics over pieces that cut rows: two small all-reduces per tensor).
The module itself stays whole on every rank for forward and backward (ZeRO-3 gathers it before
each use); after each update the pieces are all-gathered back into it (:meth:`FlatPartition.gather`,
called by :meth:`FlatPartition.fused_backward`). This is a harness for tests and for trainers that
hold flat partitions themselves — it does not save memory on its own.

Every rank must call the same methods in the same order (the collectives are issued in hook
order, the same on every rank for the same model)."""

from __future__ import annotations

import ctypes
import weakref
from typing import Optional

import torch

from . import _native as N
from .core import Optimizer

_DTYPES = {torch.float32: N.DTYPE_F32, torch.float16: N.DTYPE_F16, torch.bfloat16: N.DTYPE_BF16}
_TORCH = {N.DTYPE_F32: torch.float32, N.DTYPE_F16: torch.float16, N.DTYPE_BF16: torch.bfloat16,
          N.DTYPE_F64: torch.float64}
_SIZE = {N.DTYPE_F32: 4, N.DTYPE_F16: 2, N.DTYPE_BF16: 2, N.DTYPE_F64: 8}


def _view(addr: int, count: int, dtype: int) -> torch.Tensor:
    """A tensor over ``count`` elements of library ``dtype`` at host address ``addr`` (no copy)."""
    if count == 0:
        return torch.empty(0, dtype=_TORCH[dtype])
    raw = (ctypes.c_uint8 * (count * _SIZE[dtype])).from_address(addr)
    return torch.frombuffer(raw, dtype=_TORCH[dtype])


def partition(numel: int, world: int, rank: int) -> tuple[int, int]:
    """DeepSpeed ZeRO-3's flat range ``[start, end)`` of rank ``rank`` (padding excluded)."""
    per = -(-numel // world)
    return min(rank * per, numel), min((rank + 1) * per, numel)


class ProcessGroupComm:
    """A ``lomo_comm`` over a ``torch.distributed`` group, for CPU parameters. Keep it alive as
    long as the optimizer it was added to (it owns the callback objects)."""

    def __init__(self, process_group=None):
        import torch.distributed as dist

        self._dist = dist
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.size = dist.get_world_size(process_group)
        self.errors: list[BaseException] = []  # what a failing callback raised, for the caller
        # The callbacks reach this object through a weak reference: no reference cycle keeps
        # the process group alive after the caller dropped it (a ProcessGroupGloo destroyed at
        # interpreter exit instead aborts the process).
        me = weakref.ref(self)

        def on_all_reduce(user, buf, count, dtype, op, stream):
            obj = me()
            return -1 if obj is None else obj._on_all_reduce(buf, count, dtype, op)

        def on_reduce_scatter(user, send, recv, count, dtype, op, stream):
            obj = me()
            return -1 if obj is None else obj._on_reduce_scatter(send, recv, count, dtype)

        self._all_reduce = N.ALL_REDUCE_FN(on_all_reduce)
        self._reduce_scatter = N.REDUCE_SCATTER_FN(on_reduce_scatter)
        self.struct = N.Comm(struct_size=ctypes.sizeof(N.Comm), rank=self.rank, size=self.size,
                             all_reduce=self._all_reduce, reduce_scatter=self._reduce_scatter)

    def add_to(self, opt: Optimizer) -> int:
        """``lomo_comm_add``: returns the communicator id in ``opt``."""
        cid = ctypes.c_uint32()
        opt._lib.lomo_comm_add(opt.handle, ctypes.byref(self.struct), ctypes.byref(cid))
        return cid.value

    def release(self) -> None:
        """Drops the process group (after the optimizer using this communicator was closed)."""
        self.group = None

    def _on_all_reduce(self, buf, count, dtype, op):
        try:
            t = _view(buf, count, dtype)
            red = self._dist.ReduceOp.SUM if op == N.REDUCE_SUM else self._dist.ReduceOp.MAX
            self._dist.all_reduce(t, op=red, group=self.group)
            return 0
        except BaseException as e:  # noqa: BLE001 - nothing may unwind into C
            self.errors.append(e)
            return -1

    def _on_reduce_scatter(self, send, recv, count, dtype):
        try:
            out = _view(recv, count, dtype)
            inp = _view(send, count * self.size, dtype)
            self._dist.reduce_scatter_tensor(out, inp, op=self._dist.ReduceOp.SUM,
                                             group=self.group)
            return 0
        except BaseException as e:  # noqa: BLE001 - nothing may unwind into C
            self.errors.append(e)
            return -1


class FlatPartition:
    """LOMO / AdaLomo on DeepSpeed-ZeRO-3-style flat partitions of ``model``'s parameters over
    ``process_group`` (see the module docstring). ``algorithm`` is ``"lomo"`` or ``"adalomo"``;
    keyword arguments are ``lomo_config`` fields (as :class:`lomo_native.core.Optimizer`).
    Parameters must be CPU tensors of float32, float16 or bfloat16."""

    def __init__(self, model: torch.nn.Module, process_group=None, algorithm: str = "adalomo",
                 **config):
        self.model = model
        self.comm = ProcessGroupComm(process_group)
        self.opt = Optimizer(algorithm, **config)
        cid = self.comm.add_to(self.opt)
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.pieces: list[torch.Tensor] = []
        self.ranges: list[tuple[int, int]] = []
        for name, p in self.params:
            if p.device.type != "cpu" or p.dtype not in _DTYPES:
                raise ValueError(f"{name}: CPU float32/float16/bfloat16 parameters only")
            start, end = partition(p.numel(), self.comm.size, self.comm.rank)
            piece = p.detach().reshape(-1)[start:end].clone()
            pid = self.opt.register_pointer(name, piece.data_ptr(), _DTYPES[p.dtype],
                                            [end - start])
            shape = (ctypes.c_int64 * max(p.dim(), 1))(*p.shape)
            desc = N.ShardDesc(struct_size=ctypes.sizeof(N.ShardDesc), layout=N.LAYOUT_FLAT,
                               global_ndim=p.dim(), global_shape=shape, offset=start,
                               piece_comm=cid, grad_mode=N.GRAD_REDUCE_SCATTER, grad_comm=cid,
                               flags=0)
            self.opt._lib.lomo_param_set_shard(self.opt.handle, pid, ctypes.byref(desc))
            self.pieces.append(piece)
            self.ranges.append((start, end))
        self.opt._lib.lomo_dist_set(self.opt.handle, cid, N.DIST_CHECK)
        self._ids = {id(p): k for k, (_, p) in enumerate(self.params)}
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook) for _, p in self.params]
        self._active = False

    def _hook(self, p: torch.Tensor) -> None:
        if not self._active:
            return
        k = self._ids[id(p)]
        g = p.grad.detach().contiguous()
        self.opt.submit_pointer(k, g.data_ptr(), _DTYPES[g.dtype], numel=g.numel())
        p.grad = None

    def _backward(self, loss: torch.Tensor, phase: int, lr: float, retain: bool) -> None:
        self.opt.begin(phase, lr)
        self._active = True
        try:
            (loss * self.opt.loss_scale).backward(retain_graph=retain)
        except BaseException:
            self._active = False
            self.opt.cancel()
            raise
        self._active = False
        self.opt.end()

    def accumulate(self, loss: torch.Tensor) -> None:
        """One micro-batch of an accumulated step (an ACCUMULATE phase; needs
        ``self.opt.accum_enable(buffer, reduction)``): every whole local gradient is added to
        the parameter's buffer (one per parameter, of the WHOLE tensor's size for
        ``LOMO_GRAD_REDUCE_SCATTER``); nothing is reduced or updated. The step's last
        micro-batch is :meth:`fused_backward`: the library reduce-scatters the accumulated sum
        (mean) once per tensor and phase."""
        self._backward(loss, N.PHASE_ACCUMULATE, 0.0, retain=False)

    def fused_backward(self, loss: torch.Tensor, lr: float) -> None:
        """One step: with ``clip_grad_norm`` set, a NORM pass first (backward with the graph
        retained), then the UPDATE pass; then :meth:`gather`."""
        if self.opt.config["clip_grad_norm"] > 0:
            self._backward(loss, N.PHASE_NORM, 0.0, retain=True)
        self._backward(loss, N.PHASE_UPDATE, lr, retain=False)
        self.gather()

    def step_info(self):
        return self.opt.step_info()

    def gather(self) -> None:
        """All-gathers every parameter's pieces into ``model``'s parameters (padded to equal
        partitions for the collective)."""
        dist, size = self.comm._dist, self.comm.size
        for (name, p), piece, (start, end) in zip(self.params, self.pieces, self.ranges):
            per = -(-p.numel() // size)
            mine = torch.zeros(per, dtype=p.dtype)
            mine[: end - start] = piece
            out = torch.empty(per * size, dtype=p.dtype)
            dist.all_gather_into_tensor(out, mine, group=self.comm.group)
            with torch.no_grad():
                p.copy_(out[: p.numel()].view_as(p))

    def close(self) -> None:
        """Removes the hooks, frees the optimizer and lets go of the process group (call it
        before ``torch.distributed.destroy_process_group``)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.opt.close()
        self.comm.release()


def flat_partition(model: torch.nn.Module, process_group: Optional[object] = None,
                   algorithm: str = "adalomo", **config) -> FlatPartition:
    """:class:`FlatPartition` of ``model`` over ``process_group``."""
    return FlatPartition(model, process_group, algorithm, **config)
