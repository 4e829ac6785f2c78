"""``jax.jit`` on sharded arrays for :mod:`lomo_native.jax`'s whole-tensor operations.

An XLA custom call is opaque to the SPMD partitioner: left alone, XLA all-gathers its operands
and runs it replicated (memory × devices, donation lost). Each operation is therefore wrapped in
``jax.experimental.custom_partitioning``: when XLA partitions the program, the rule keeps the
parameter's sharding (AdaLomo's row state follows a split of the rows, the column state a split
of the columns) and lowers each device's part to the split-phase path of ``shard_map``
(``_jax_shard.py``: local statistics → ``jax.lax.psum`` over the axes the tensor is split over →
apply), so the results equal the unsharded step and keep the inputs' sharding, and donated
buffers are updated in place. Unpartitioned programs (one device) call the custom call directly.

A parameter split over two dimensions at once (a 2-D block) is refused when XLA partitions the
program (:class:`ShardedOperandError`); the gradient norm accepts any sharding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from . import _jax_shard as _s


class ShardedOperandError(ValueError):
    """A sharding the operations cannot keep (a parameter split over two dimensions)."""


def varying_axes(x) -> frozenset:
    """The ``shard_map`` mesh axes over which ``x`` differs between devices (its varying manual
    axes; empty outside ``shard_map``, or inside one with ``check_vma=False``, where JAX does not
    track them)."""
    try:
        aval = jax.typeof(x)
    except Exception:  # noqa: BLE001 - not a JAX value (a NumPy array, a Python scalar)
        return frozenset()
    mat = getattr(aval, "manual_axis_type", None)
    if mat is not None:
        return frozenset(getattr(mat, "varying", ()))
    return frozenset(getattr(aval, "vma", ()))


def check_whole(x, what):
    """Refuses a device's piece inside ``jax.shard_map`` where a whole tensor is needed: a
    whole-tensor operation there would take the gradient norm and AdaLomo's statistics over the
    piece alone — silently different numbers from the unsharded step."""
    axes = varying_axes(x)
    if axes:
        raise ShardedOperandError(
            "lomo_native.jax: %s differs between devices over the shard_map axes %s: inside "
            "jax.shard_map it is a device's piece (or a gradient not yet reduced over the "
            "data-parallel axes), and Optimizer.step / the optax form / the whole-tensor "
            "operations would compute the gradient norm and AdaLomo's statistics per piece. Use "
            "Optimizer.sharded_step(params, grads, state, lr, specs) with the parameters' "
            "PartitionSpecs (or the split-phase operations norm_partials/norm_finish, "
            "lomo_piece_*, adalomo_piece_*); reduce gradients with jax.lax.psum/pmean first"
            % (what, tuple(sorted(axes)))
        )


def known_spec(x):
    """The PartitionSpec of ``x`` when it is known before XLA partitions the program: a
    committed array's sharding, or a traced value's on a mesh with ``Explicit`` axes (JAX's
    sharding in types). Mesh axes of size 1 are dropped (they split nothing). None if
    unknown."""
    try:
        sh = jax.typeof(x).sharding if isinstance(x, jax.core.Tracer) else x.sharding
        spec, mesh = sh.spec, sh.mesh
        sizes = dict(mesh.shape)
    except Exception:  # noqa: BLE001 - no named sharding to read
        return None
    entries = []
    for e in tuple(spec):
        axes = tuple(a for a in ((e,) if isinstance(e, str) else tuple(e or ()))
                     if sizes.get(a, 1) > 1)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*entries)


def batchable(f):
    """``f`` (a ``custom_partitioning`` function, which has no batching rule) under ``jax.vmap``:
    one call per batch element in a ``jax.lax.map`` (what the custom calls' ``vmap_method=
    "sequential"`` does), each element a whole, independent tensor; nested vmaps recurse."""
    g = custom_vmap(lambda *args: f(*args))

    @g.def_vmap
    def rule(axis_size, in_batched, *args):
        idx = [i for i, b in enumerate(in_batched) if b]

        def one(xs):
            full = list(args)
            for i, x in zip(idx, xs):
                full[i] = x
            return g(*full)

        out = jax.lax.map(one, [args[i] for i in idx])
        return out, jax.tree_util.tree_map(lambda _: True, out)

    return g


def _names(prefix, ndim):
    return ["%s%d" % (prefix, d) for d in range(ndim)]


def _spec_of(sharding, ndim):
    spec = getattr(sharding, "spec", None)
    if spec is None:
        if sharding is None or sharding.is_fully_replicated:
            return PartitionSpec()
        raise ShardedOperandError(
            "lomo_native.jax: cannot read the partition spec of %s; use NamedSharding" % sharding
        )
    return spec


def _axes_of(spec):
    axes = []
    for e in tuple(spec):
        for a in (e,) if isinstance(e, str) else tuple(e or ()):
            if a not in axes:
                axes.append(a)
    return tuple(axes)


def _piece(spec, ndim):
    from ._jax_shard_tree import piece_of

    try:
        return piece_of(spec, ndim, "the parameter")
    except NotImplementedError as e:
        raise ShardedOperandError(
            "lomo_native.jax under jax.jit: %s. Reshard it, or run the step inside "
            "jax.shard_map with Optimizer.sharded_step" % e
        ) from None


def grad_sum_sq(call, loss_scale, leaves, attrs):
    """``call(loss_scale, *leaves, **attrs)``, partitioned: per-leaf partials, psum over each
    leaf's sharded axes, the NORM decision; results replicated."""
    ndims = [g.ndim for g in leaves]
    for i, g in enumerate(leaves):
        check_whole(g, "grad %d" % i)

    def impl(scale, *gs):
        return call(scale, *gs, **attrs)

    f = custom_partitioning(impl)

    def partition(mesh, arg_shapes, result_shape):
        specs = [_spec_of(a.sharding, a.ndim) for a in arg_shapes[1:]]
        repl = NamedSharding(mesh, PartitionSpec())
        arg_sh = (repl,) + tuple(NamedSharding(mesh, s) for s in specs)

        def lower(scale, *gs):
            rec = _s.norm_partials(gs, loss_scale=scale)
            groups = {}
            for i, s in enumerate(specs):
                if _axes_of(s):
                    groups.setdefault(_axes_of(s), []).append(i)
            for axes, idx in groups.items():
                idx = jnp.asarray(idx)
                rec = rec.at[idx].set(jax.lax.psum(rec[idx], axes))
            return _s.norm_finish(rec, clip_grad_norm=float(attrs["clip_grad_norm"]))

        return mesh, lower, (repl, repl, repl), arg_sh

    def infer(mesh, arg_shapes, result_shape):
        repl = NamedSharding(mesh, PartitionSpec())
        return (repl, repl, repl)

    rule = ", ".join([""] + [" ".join(_names("g%d_" % i, n)) for i, n in enumerate(ndims)])
    f.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer,
        sharding_rule=rule + " -> , , ",
    )
    return batchable(f)(loss_scale, *leaves)


def _state_rule(ndim, n_state):
    p = _names("d", ndim)
    if n_state == 0:
        return []
    if n_state == 1:
        return [" ".join(p)]
    rows = p[0] if ndim == 2 else "(%s)" % " ".join(p[:-1])
    return [rows, p[-1]]


def update(algorithm, call, param, grad, state, scalars, attrs, options):
    """``call(param, grad, *state, *scalars, **attrs)`` (a whole-tensor update), partitioned:
    results keep the parameter's sharding; a split parameter runs the split-phase path."""
    ndim, n_state = param.ndim, len(state)
    ada = algorithm == "adalomo"
    check_whole(param, "the parameter")
    known = known_spec(param)
    if known is not None:
        _piece(known, ndim)  # a 2-D block whose sharding is known now: refused before XLA

    def impl(p, g, *rest):
        return call(p, g, *rest, **attrs)

    f = custom_partitioning(impl)

    def shardings(mesh, pc, spec):
        repl = NamedSharding(mesh, PartitionSpec())
        ps = NamedSharding(mesh, spec if pc else PartitionSpec())
        if n_state == 1:
            st = [ps]
        elif n_state == 2:
            if pc is None:
                st = [repl, repl]
            elif pc.layout == "rows":
                st = [NamedSharding(mesh, PartitionSpec(pc.axes)), repl]
            else:
                st = [repl, NamedSharding(mesh, PartitionSpec(pc.axes))]
        else:
            st = []
        return ps, st, repl

    def infer(mesh, arg_shapes, result_shape):
        # Never raise here: under the GSPMD partitioner an exception in this callback is a
        # failed CHECK in XLA (the process aborts); `partition` raises the refusal instead.
        try:
            spec = _spec_of(arg_shapes[0].sharding, ndim)
            pc = _piece(spec, ndim)
        except ShardedOperandError:
            spec, pc = PartitionSpec(), None
        ps, st, repl = shardings(mesh, pc, spec)
        return (ps, *st, repl)

    def partition(mesh, arg_shapes, result_shape):
        spec = _spec_of(arg_shapes[0].sharding, ndim)
        pc = _piece(spec, ndim)
        ps, st, repl = shardings(mesh, pc, spec)
        global_shape = tuple(arg_shapes[0].shape)
        arg_sh = (ps, ps, *st, repl, repl, repl, repl)

        def lower(p, g, *rest):
            if pc is None:
                return call(p, g, *rest, **attrs)
            s, (lr, scale, coef, step) = tuple(rest[:n_state]), rest[n_state:]
            kw = dict(
                piece=jax.lax.axis_index(pc.axes),
                layout=pc.layout,
                global_shape=global_shape,
                lr=lr,
                step=step,
                loss_scale=scale,
                clip_coef=coef,
                **options,
            )
            if ada:
                reduced = []
                for _ in range(_s.piece_rounds("adalomo", pc.layout)):
                    r = _s.adalomo_piece_stats(p, g, s, reduced, **kw)
                    reduced.append(jax.lax.psum(r, pc.axes))
                p2, s2, ok = _s.adalomo_piece_apply(p, g, s, reduced, **kw)
            else:
                r = jax.lax.psum(_s.lomo_piece_stats(p, g, **kw), pc.axes)
                (p2, ok), s2 = _s.lomo_piece_apply(p, g, r, **kw), ()
            # A piece reports its own elements that would overflow: one answer for the tensor.
            ok = jax.lax.pmin(ok.astype(jnp.int32), pc.axes) > 0
            return (p2, *s2, ok)

        return mesh, lower, (ps, *st, repl), arg_sh

    # Only the parameter decides the results' sharding: the gradient and the state operands
    # get factors of their own (the partition reshards them to the parameter's layout), else
    # Shardy would propagate e.g. a gradient split over other axes into the parameter and make
    # it a 2-D block (the step after refused, donation lost).
    p_rule = " ".join(_names("d", ndim))
    g_rule = " ".join(_names("g", ndim))
    s_rule = [" ".join(_names("s%d_" % k, len(st.shape))) for k, st in enumerate(state)]
    ops = [p_rule, g_rule] + s_rule + ["", "", "", ""]
    res = [p_rule] + _state_rule(ndim, n_state) + [""]
    f.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer,
        sharding_rule=", ".join(ops) + " -> " + ", ".join(res),
    )
    return batchable(f)(param, grad, *state, *scalars)
