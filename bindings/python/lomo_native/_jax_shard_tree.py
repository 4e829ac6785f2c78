"""The sharded pytree step of :mod:`lomo_native.jax` (``Optimizer.sharded_step``): the C API's
step semantics on parameters split over named mesh axes inside ``jax.shard_map``, with the
statistics reduced by ``jax.lax.psum`` (``_jax_shard.py``). Results equal ``Optimizer.step`` on
the whole parameters (``notes/distributed.md`` §3, §5)."""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from . import _jax_shard as _s
from .jax import adalomo_update, lomo_update


class Piece(NamedTuple):
    """How a parameter leaf is split: ``layout`` "rows" (over its first dimension) or "cols"
    (over its last, rank ≥ 2), over the mesh ``axes`` (major first)."""

    layout: str
    dim: int
    axes: Tuple[str, ...]


def _is_spec(x) -> bool:
    return x is None or isinstance(x, PartitionSpec)


def flatten_specs(treedef, specs):
    """The PartitionSpec (or None: replicated) of every leaf, in leaf order."""
    if isinstance(specs, PartitionSpec) or specs is None:
        return [specs] * treedef.num_leaves
    leaves = jax.tree_util.tree_leaves(specs, is_leaf=_is_spec)
    if len(leaves) != treedef.num_leaves:
        raise ValueError(
            "specs must give one PartitionSpec per parameter (%d), got %d"
            % (treedef.num_leaves, len(leaves))
        )
    return leaves


def _drop_unit_axes(spec: PartitionSpec, sizes) -> PartitionSpec:
    """``spec`` without the mesh axes of size 1 (they split nothing)."""
    out = []
    for e in tuple(spec):
        axes = tuple(a for a in ((e,) if isinstance(e, str) else tuple(e or ()))
                     if sizes.get(a, 2) > 1)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def piece_of(spec: Optional[PartitionSpec], ndim: int, what: str, sizes=None) -> Optional[Piece]:
    """The :class:`Piece` a PartitionSpec makes of a rank-``ndim`` leaf (None: replicated);
    ``sizes`` ({mesh axis: size}, when known) drops the axes of size 1."""
    if spec is None:
        return None
    if sizes:
        spec = _drop_unit_axes(spec, sizes)
    entries = tuple(spec) + (None,) * (ndim - len(tuple(spec)))
    if len(entries) > ndim:
        raise ValueError("%s: PartitionSpec %s has more entries than rank %d" % (what, spec, ndim))
    split = [(d, e) for d, e in enumerate(entries) if e is not None and e != ()]
    if not split:
        return None
    if len(split) > 1:
        raise NotImplementedError(
            "%s: split over dimensions %s (%s): a 2-D block is not supported yet; split it "
            "over one dimension (the first or the last), several mesh axes may share it, e.g. "
            "P(('x', 'y'), None)" % (what, [d for d, _ in split], spec)
        )
    d, e = split[0]
    axes = (e,) if isinstance(e, str) else tuple(e)
    if d == 0:
        return Piece("rows", d, axes)
    if d == ndim - 1:
        return Piece("cols", d, axes)
    raise NotImplementedError(
        "%s: split over dimension %d of a rank-%d parameter (%s): only the first dimension "
        "(rows of the [prod(shape[:-1]), shape[-1]] view) or the last (its columns) can be "
        "split" % (what, d, ndim, spec)
    )


def _axis_size(axes) -> int:
    n = 1
    for a in axes:
        n *= jax.lax.axis_size(a)
    return n


def state_specs(opt, params, specs, mesh=None):
    """PartitionSpecs of ``opt.init(params)`` for the parameters' ``specs`` (for ``shard_map``'s
    ``in_specs``/``out_specs`` and ``jax.device_put``): AdaLomo's row state follows a row split,
    the column state a column split, the other vector is replicated. With ``mesh``, its axes of
    size 1 split nothing (``P("data", "model")`` on a ``(1, N)`` mesh is a column split)."""
    from ._jax_pytree import OptState, ScalerState

    sizes = dict(mesh.shape) if mesh is not None else None

    leaves, treedef = jax.tree_util.tree_flatten(params)
    sl = flatten_specs(treedef, specs)
    ada = []
    for i, (p, spec) in enumerate(zip(leaves, sl)):
        if opt.algorithm != "adalomo":
            ada.append(())
            continue
        pc = piece_of(spec, p.ndim, "parameter %d" % i, sizes)
        if p.ndim < 2:
            ada.append((PartitionSpec(pc.axes) if pc else PartitionSpec(),))
        elif pc is None:
            ada.append((PartitionSpec(), PartitionSpec()))
        elif pc.layout == "rows":
            ada.append((PartitionSpec(pc.axes), PartitionSpec()))
        else:
            ada.append((PartitionSpec(), PartitionSpec(pc.axes)))
    r = PartitionSpec()
    return OptState(
        step=r,
        loss_scale=r,
        scaler=ScalerState(r, r, r),
        ada=tuple(ada),
        grad_norm=r,
        overflow=r,
        skipped=r,
    )


def state_shardings(opt, mesh, params, specs):
    """:func:`state_specs` as ``NamedSharding``s on ``mesh`` (for ``jax.device_put``)."""
    return jax.tree_util.tree_map(
        lambda s: NamedSharding(mesh, s), state_specs(opt, params, specs, mesh), is_leaf=_is_spec
    )


def _check_specs_match(params, leaves, specs, pieces, sizes):
    """Where JAX tracks which values differ between devices (``shard_map``'s default
    ``check_vma=True``), every parameter must differ over exactly the axes its spec splits it
    over: a piece declared replicated would get per-piece statistics, a replicated array
    declared split would have its statistics summed once per device — wrong numbers either
    way, so refused before anything runs."""
    from ._jax_partition import varying_axes

    manual = tuple(jax.sharding.get_abstract_mesh().manual_axes)
    if not manual or not varying_axes(jax.lax.axis_index(manual)):
        return  # outside shard_map, or check_vma=False: nothing to compare with
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = [jax.tree_util.keystr(k) for k, _ in flat]
    for i, (p, spec, pc) in enumerate(zip(leaves, specs, pieces)):
        got = frozenset(a for a in varying_axes(p) if sizes.get(a, 2) > 1)
        want = frozenset(pc.axes) if pc else frozenset()
        if got != want:
            raise ValueError(
                "parameter %d (%s): its PartitionSpec %s splits it over the mesh axes %s, but "
                "inside shard_map it differs between devices over %s: pass the specs the parameters "
                "were given in shard_map's in_specs" % (i, paths[i], spec, tuple(sorted(want)),
                                                          tuple(sorted(got)))
            )


def sharded_step(opt, params, grads, state, lr, specs):
    """``Optimizer.sharded_step``: see its docstring."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    gleaves = treedef.flatten_up_to(grads)
    sl = flatten_specs(treedef, specs)
    if len(state.ada) != len(leaves):
        raise ValueError("state was made for %d parameters, got %d" % (len(state.ada), len(leaves)))
    manual = tuple(jax.sharding.get_abstract_mesh().manual_axes)
    sizes = {a: jax.lax.axis_size(a) for a in manual}
    pieces = [piece_of(s, p.ndim, "parameter %d" % i, sizes)
              for i, (p, s) in enumerate(zip(leaves, sl))]
    _check_specs_match(params, leaves, sl, pieces, sizes)
    union = []
    for pc in pieces:
        for a in pc.axes if pc else ():
            if a not in union:
                union.append(a)
    scale = state.loss_scale
    if opt.clip_grad_norm > 0:
        rec = _s.norm_partials(gleaves, loss_scale=scale)
        groups = {}
        for i, pc in enumerate(pieces):
            if pc is not None:
                groups.setdefault(pc.axes, []).append(i)
        for axes, idx in groups.items():
            idx = jnp.asarray(idx)
            rec = rec.at[idx].set(jax.lax.psum(rec[idx], axes))
        sum_sq, coef, finite = _s.norm_finish(rec, clip_grad_norm=opt.clip_grad_norm)
        skipped = jnp.logical_not(finite)
        grad_norm = jnp.sqrt(sum_sq)
    else:
        coef = jnp.ones((), jnp.float32)
        skipped = jnp.zeros((), jnp.bool_)
        grad_norm = jnp.asarray(jnp.nan, jnp.float32)
    t = state.step + 1
    decays = opt._decay_per_leaf(params, treedef, len(leaves))
    new_leaves, new_ada, oks = [], [], []
    for i, (p, g, s, wd, pc) in enumerate(zip(leaves, gleaves, state.ada, decays, pieces)):
        common = opt._leaf_options(i, lr, t, scale, coef, wd)
        ada = opt.algorithm == "adalomo"
        if pc is None:
            if ada:
                p2, s2, ok = adalomo_update(p, g, s, **common, **opt.ada_options)
            else:
                (p2, ok), s2 = lomo_update(p, g, **common), ()
        else:
            shape = list(p.shape)
            shape[pc.dim] *= _axis_size(pc.axes)
            piece = dict(
                piece=jax.lax.axis_index(pc.axes), layout=pc.layout, global_shape=tuple(shape)
            )
            if ada:
                reduced = []
                for _ in range(_s.piece_rounds("adalomo", pc.layout)):
                    r = _s.adalomo_piece_stats(
                        p, g, s, reduced, **piece, **common, **opt.ada_options
                    )
                    reduced.append(jax.lax.psum(r, pc.axes))
                p2, s2, ok = _s.adalomo_piece_apply(
                    p, g, s, reduced, **piece, **common, **opt.ada_options
                )
            else:
                r = jax.lax.psum(_s.lomo_piece_stats(p, g, **piece, **common), pc.axes)
                (p2, ok), s2 = _s.lomo_piece_apply(p, g, r, **piece, **common), ()
        new_leaves.append(p2)
        new_ada.append(s2)
        oks.append(ok)
    all_ok = jnp.all(jnp.stack(oks)) if oks else jnp.ones((), jnp.bool_)
    if union:
        # An element that would overflow its dtype is reported by its own piece only: every
        # device must take the same scaler decision.
        all_ok = jax.lax.pmin(all_ok.astype(jnp.int32), tuple(union)) > 0
    return opt._finish_step(state, scale, skipped, grad_norm, all_ok, treedef, new_leaves, new_ada)
