"""FSDP2 models (``torch.distributed.fsdp.fully_shard``) in :class:`lomo_native.torch.Lomo` /
``AdaLomo``, with no extra argument.

After ``fully_shard`` every parameter of the model is a ``DTensor`` sharded on dim 0 over its
device mesh by ``torch.chunk``'s rule (each rank holds ``ceil(dim0 / world)`` rows, trailing
ranks fewer or none). The optimizer registers each rank's local shard — the tensor FSDP2 keeps
in the DTensor, updated in place — as a ``LOMO_LAYOUT_ROWS`` piece of the global tensor
(``lomo_param_set_shard``), with the mesh dimension's process group as the piece group: a
``lomo_comm`` whose all-reduce is ``torch.distributed.all_reduce`` on that group. The same group
agrees on the step's scalars (``lomo_dist_set`` with ``LOMO_DIST_CHECK``), so the global norm,
the clip coefficient, the overflow skip and the loss scale are identical on every rank, and a
rank that disagrees (another lr, a missing gradient) raises instead of hanging.

Gradients: FSDP2 reduce-scatters each parameter group's gradients (averaged over the mesh) and
then calls the sharded parameters' post-accumulate-grad hooks itself, inside backward; the
optimizer's hook hands the local gradient shard to the library and drops it, so
``fused_backward`` is an optimizer in backward on FSDP2 shards, and ``step()`` applies the
sharded ``.grad`` that a plain ``backward()`` left. AdaLomo's statistics on a row piece cost one
all-reduce of ``2C + 3`` doubles per tensor (``C`` columns), and the result equals one process
holding the whole tensors within f32 rounding; LOMO is elementwise and only agrees on each
piece's non-finite flag. Empty shards are registered and submitted like the others (every rank
must take part in every collective).

HSDP meshes ``(Replicate(), Shard(0))`` use the shard dimension's group (FSDP2 has averaged the
replicas already; not tested yet). Other placements (tensor parallel, ``Shard(1)``, strided shards) and a mix of
DTensor and plain parameters raise with the reason."""

from __future__ import annotations

import ctypes
import math
import weakref
from typing import Optional

import torch

from . import _native as N


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # torch without distributed
        return None
    return DTensor


def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (FSDP2 parameter or gradient)."""
    d = _dtensor_type()
    return d is not None and isinstance(t, d)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose memory holds this rank's values: the local shard of a DTensor (the one
    FSDP2 updates and all-gathers from), else ``t`` itself."""
    return t._local_tensor if is_dtensor(t) else t


class TorchComm:
    """A ``lomo_comm`` backed by ``torch.distributed`` on one process group: the library's
    in-place all-reduces (f64 records, SUM or MAX) become ``dist.all_reduce`` on CPU tensors
    viewing its buffers. Keep the object alive as long as the optimizer (it owns the callback).
    The group is held weakly (torch.distributed owns it until ``destroy_process_group``), so an
    optimizer that outlives the group cannot keep a gloo group alive into interpreter shutdown,
    where destroying it aborts the process."""

    def __init__(self, group):
        import torch.distributed as dist

        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.id = None
        self.fn = N.ALL_REDUCE_FN(_all_reduce(weakref.ref(group)))


_DTYPES = {N.DTYPE_F64: torch.float64, N.DTYPE_F32: torch.float32,
           N.DTYPE_F16: torch.float16, N.DTYPE_BF16: torch.bfloat16}


def _all_reduce(group_ref):
    """The ``lomo_all_reduce_fn`` of a group: 0 on success, 1 on any error (never unwinds
    through C; the library then fails the call with LOMO_STATUS_COMM_ERROR)."""
    import torch.distributed as dist

    ops = {N.REDUCE_SUM: dist.ReduceOp.SUM, N.REDUCE_MAX: dist.ReduceOp.MAX}

    def all_reduce(user, buf, count, dtype, op, stream):
        try:
            group = group_ref()
            if group is None or dtype not in _DTYPES or op not in ops:
                return 1
            if count == 0:
                return 0
            tdtype = _DTYPES[dtype]
            nbytes = count * torch.empty(0, dtype=tdtype).element_size()
            t = torch.frombuffer((ctypes.c_char * nbytes).from_address(buf), dtype=tdtype)
            dist.all_reduce(t, op=ops[op], group=group)
            return 0
        except BaseException:
            return 1

    return all_reduce


class Piece:
    """Where one rank's shard lies: the global shape, the first row of the
    ``[prod(shape[:-1]), shape[-1]]`` view (rank 1: first element), the piece group."""

    __slots__ = ("global_shape", "offset", "key", "group")

    def __init__(self, global_shape, offset, group):
        self.global_shape = global_shape
        self.offset = offset
        self.key = _ranks(group)  # the ranks of the piece group
        self.group = weakref.ref(group)


def piece_of(name: str, p: torch.Tensor) -> Piece:
    """The piece of a DTensor parameter sharded on dim 0 (FSDP2), checked against its local
    shard; ValueError for placements the binding does not map."""
    from torch.distributed.tensor import Shard

    mesh, placements = p.device_mesh, tuple(p.placements)
    sharded = [i for i, pl in enumerate(placements) if not pl.is_replicate()]
    if len(sharded) != 1 or type(placements[sharded[0]]) is not Shard \
            or placements[sharded[0]].dim != 0 or p.dim() == 0:
        raise ValueError(
            f"'{name}' is a DTensor with placements {placements}: lomo_native.torch maps FSDP2 "
            "parameters (Shard(0) on one mesh dimension, optionally Replicate() on others, as "
            "fully_shard makes them); tensor-parallel and other shardings are not supported yet")
    dim = sharded[0]
    world, rank = mesh.size(dim), mesh.get_local_rank(dim)
    shape = tuple(int(s) for s in p.shape)
    chunk = -(-shape[0] // world)
    begin = min(rank * chunk, shape[0])
    rows = min(begin + chunk, shape[0]) - begin
    lt = local(p)
    if tuple(lt.shape) != (rows,) + shape[1:]:
        raise ValueError(
            f"'{name}': local shard of shape {tuple(lt.shape)} on rank {rank} of {world}, where "
            f"torch.chunk's rule gives {(rows,) + shape[1:]} for the global shape {shape}")
    inner = math.prod(shape[1:-1]) if len(shape) >= 2 else 1
    return Piece(shape, begin * inner, mesh.get_group(dim))


class Distribution:
    """The distributed setup of one optimizer: the pieces of its DTensor parameters and a
    communicator per process group. ``plan`` checks parameters before they are registered;
    ``apply`` declares them to a native optimizer (again after a re-registration)."""

    def __init__(self, process_group):
        self.process_group = process_group
        self.pieces: dict = {}  # name -> Piece
        self.plain: Optional[str] = None  # a registered non-DTensor parameter
        self.comms: dict = {}  # ranks of the group -> TorchComm
        self.norm_key = None

    def plan(self, items) -> dict:
        """Pieces of the ``(name, parameter)`` items that are DTensors, checked together with
        the parameters registered so far; raises before anything is registered."""
        new, plain = {}, self.plain
        for name, p in items:
            if is_dtensor(p):
                new[name] = piece_of(name, p)
            elif plain is None:
                plain = name
        if (new or self.pieces) and plain is not None:
            some = next(iter(new or self.pieces))
            raise ValueError(
                f"'{plain}' is a plain tensor but '{some}' is an FSDP2 (DTensor) shard: its "
                "gradient would differ between ranks. Apply fully_shard to the module that "
                "holds it (or to the root module), or freeze it")
        if new and self.process_group is not None:
            raise ValueError(
                "process_group is for replicated models; this model is sharded with FSDP2 "
                "(fully_shard), which reduces the gradients itself: drop process_group")
        keys = {pc.key for pc in new.values()}
        if self.norm_key is not None:
            keys.add(self.norm_key)
        if len(keys) > 1:
            raise ValueError("the FSDP2 parameters are sharded over different process groups "
                             f"{sorted(keys)}; lomo_native.torch supports one FSDP mesh")
        return new

    def add(self, native, entries, new: dict) -> None:
        """Records the planned pieces and declares them (``entries``: (name, Entry) pairs)."""
        for name, e in entries:
            if name in new:
                self.pieces[name] = new[name]
            elif self.plain is None:
                self.plain = name
        first = self.norm_key is None
        for name, e in entries:
            pc = new.get(name)
            if pc is None:
                continue
            key = pc.key
            if key not in self.comms:
                self.comms[key] = TorchComm(pc.group())
                self.comms[key].id = native.comm_add(self.comms[key].rank, self.comms[key].size,
                                                     self.comms[key].fn)
            if self.norm_key is None:
                self.norm_key = key
            native.set_shard(e.pid, N.LAYOUT_ROWS, pc.global_shape, pc.offset,
                             self.comms[key].id)
        if first and self.norm_key is not None:
            native.dist_set(self.comms[self.norm_key].id, N.DIST_CHECK)

    def apply(self, native, entries) -> None:
        """Declares every recorded piece to ``native`` (a fresh optimizer with the same
        registrations), before its state is loaded."""
        if not self.pieces:
            return
        for c in self.comms.values():
            c.id = native.comm_add(c.rank, c.size, c.fn)
        for name, e in entries:
            pc = self.pieces.get(name)
            if pc is not None:
                key = pc.key
                native.set_shard(e.pid, N.LAYOUT_ROWS, pc.global_shape, pc.offset,
                                 self.comms[key].id)
        native.dist_set(self.comms[self.norm_key].id, N.DIST_CHECK)


def _ranks(group) -> tuple:
    import torch.distributed as dist

    return tuple(dist.get_process_group_ranks(group))
