"""Split-phase operations of :mod:`lomo_native.jax` for ``shard_map`` (``src/xla/split.rs``).

Inside ``shard_map`` a device holds a *piece* of each sharded parameter, and the statistics of
a step (the global gradient norm, AdaLomo's row/column means, RMS(update), RMS(param), the
non-finite count) span every piece. A custom call cannot reach the other devices, so each
update is split into local statistics → ``jax.lax.psum`` over the mesh axes the tensor is split
over (by the caller) → apply, with the exact sharded algebra of the C API
(``notes/distributed.md`` §3; ``lomo_param_set_shard`` with ``LOMO_LAYOUT_ROWS`` / ``COLS``):

* :func:`norm_partials` → psum per tensor → :func:`norm_finish`: the NORM phase (global norm,
  clip coefficient, skip decision), the same on every device.
* ``lomo_piece_stats`` → psum → ``lomo_piece_apply``; ``adalomo_piece_stats(round=1)`` → psum
  [→ ``adalomo_piece_stats(round=2)`` → psum, for column pieces] → ``adalomo_piece_apply``;
  :func:`piece_rounds` says how many rounds a piece takes.

``layout="rows"``: the piece is a range of rows of the ``[prod(shape[:-1]), shape[-1]]`` view
(the parameter is split over its first dimension; rank 1: a range of elements); ``"cols"``: a
range of its columns (split over the last dimension). ``piece`` is the device's index along
those mesh axes (``jax.lax.axis_index(axes)``); it places the piece in the whole tensor, so
stochastic rounding draws the same bits for an element as an unsharded step. AdaLomo state of
a row piece is ``(row piece, whole col)``; of a column piece ``(whole row, col piece)``.

Records are float64 when ``jax_enable_x64`` is on (the C API's precision: results equal the
unsharded step bit for bit on dyadic inputs) and float32 otherwise (sums of the partial
statistics then round to f32 first: results agree to f32 rounding). CPU only: on CUDA these
operations fail with ``UNIMPLEMENTED``.
"""

from __future__ import annotations

import math

import numpy as np

import jax
import jax.numpy as jnp

from . import jax as _j

SPLIT_OPS = (
    "norm_partials",
    "norm_finish",
    "lomo_piece_stats",
    "lomo_piece_apply",
    "adalomo_piece_stats",
    "adalomo_piece_apply",
)
_LAYOUTS = ("rows", "cols")


def record_dtype():
    """float64 with ``jax_enable_x64``, else float32."""
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def norm_partials(grads, *, loss_scale=1.0):
    """Per gradient leaf ``[Σ(g/loss_scale)², 1 if not finite else 0]`` (``Σ`` is 0 for a
    non-finite gradient): a ``[n, 2]`` record. ``psum`` row ``i`` over the mesh axes leaf ``i``
    is split over (not over axes it is replicated on), then hand the rows to :func:`norm_finish`.
    """
    _j.register()
    leaves = jax.tree_util.tree_leaves(grads)
    for i, g in enumerate(leaves):
        _j._check_float(g, "grad %d" % i)
    out = jax.ShapeDtypeStruct((len(leaves), 2), record_dtype())
    call = jax.ffi.ffi_call("lomo_norm_partials", out, vmap_method="sequential")
    return call(_j._f32(loss_scale), *leaves)


def norm_finish(record, *, clip_grad_norm: float = 0.0):
    """The NORM decision from the reduced ``[n, 2]`` record (rows summed in order, in f64):
    ``(sum_sq, clip_coef, finite)`` exactly as :func:`lomo_native.jax.grad_sum_sq` returns them
    for the whole tensors."""
    _j.register()
    record = jnp.asarray(record)
    if record.ndim != 2 or record.shape[1] != 2:
        raise ValueError("the record must be [n, 2], got %s" % (record.shape,))
    call = jax.ffi.ffi_call(
        "lomo_norm_finish", (_j._F32, _j._F32, _j._BOOL), vmap_method="sequential"
    )
    return call(record, clip_grad_norm=np.float64(clip_grad_norm))


def piece_rounds(algorithm: str, layout: str) -> int:
    """Statistics rounds (stats → psum) of a piece before its apply: 2 for AdaLomo column
    pieces, else 1."""
    return 2 if (algorithm == "adalomo" and layout == "cols") else 1


def record_len(algorithm, layout, global_shape, round_=1) -> int:
    """Length of a piece's statistics record of round ``round_`` (``src/xla/split.rs``)."""
    rows, cols = _view(global_shape)
    if algorithm == "lomo":
        return 1
    if layout == "rows":
        return 2 * cols + 3 if len(global_shape) >= 2 else 3
    return rows + 2 if round_ == 1 else 1


def _view(shape):
    shape = tuple(int(d) for d in shape)
    if len(shape) >= 2:
        return math.prod(shape[:-1]), shape[-1]
    return math.prod(shape), 1


def _piece_attrs(layout, global_shape):
    if layout not in _LAYOUTS:
        raise ValueError("layout must be 'rows' or 'cols', got %r" % (layout,))
    rows, cols = _view(global_shape)
    return dict(layout=layout, global_rows=np.int64(rows), global_cols=np.int64(cols))


def _check_piece(param, layout, global_shape):
    g = tuple(int(d) for d in global_shape)
    p = tuple(param.shape)
    if len(g) != len(p):
        raise ValueError("piece %s and whole tensor %s differ in rank" % (p, g))
    if layout == "rows":
        ok = len(p) == 0 or (p[1:] == g[1:] and g[0] % max(p[0], 1) == 0)
    else:
        ok = len(p) >= 2 and p[:-1] == g[:-1] and g[-1] % max(p[-1], 1) == 0
    if not ok:
        raise ValueError(
            "a %s piece of %s cannot have shape %s (rows: split over the first dimension; "
            "cols: over the last, rank >= 2)" % (layout, g, p)
        )


def _piece_state_shapes(param_shape, layout, global_shape):
    if len(param_shape) < 2:
        return [tuple(param_shape)]
    rows, cols = _view(global_shape)
    lrows, lcols = _view(param_shape)
    return [(lrows,), (cols,)] if layout == "rows" else [(rows,), (lcols,)]


def _scalar_operands(lr, step, loss_scale, clip_coef, piece):
    return [_j._f32(lr), _j._f32(loss_scale), _j._f32(clip_coef), _j._i32(step), _j._i32(piece)]


def lomo_piece_stats(param, grad, *, piece, layout, global_shape, lr, step=1, loss_scale=1.0,
                     clip_coef=1.0, **options):
    """LOMO statistics of a piece: ``[1 if its gradient is not finite]`` (psum it over the
    piece's axes). Options as :func:`lomo_native.jax.lomo_update`."""
    _j.register()
    _j._check_grad(param, grad)
    _check_piece(param, layout, global_shape)
    out = jax.ShapeDtypeStruct((1,), record_dtype())
    call = jax.ffi.ffi_call("lomo_lomo_piece_stats", out, vmap_method="sequential")
    return call(param, grad, *_scalar_operands(lr, step, loss_scale, clip_coef, piece),
                **_options(options), **_piece_attrs(layout, global_shape))


def lomo_piece_apply(param, grad, reduced, *, piece, layout, global_shape, lr, step=1,
                     loss_scale=1.0, clip_coef=1.0, **options):
    """The LOMO update of a piece given the reduced statistics; ``(new_param, finite)`` as
    :func:`lomo_native.jax.lomo_update` (``param`` in place when donated)."""
    _j.register()
    _j._check_grad(param, grad)
    _check_piece(param, layout, global_shape)
    call = jax.ffi.ffi_call(
        "lomo_lomo_piece_apply",
        (jax.ShapeDtypeStruct(param.shape, param.dtype), _j._BOOL),
        input_output_aliases={0: 0},
        vmap_method="sequential",
    )
    return call(param, grad, *_scalar_operands(lr, step, loss_scale, clip_coef, piece),
                _record(reduced), **_options(options), **_piece_attrs(layout, global_shape))


def adalomo_piece_stats(param, grad, state, reduced=(), *, piece, layout, global_shape, lr,
                        step, loss_scale=1.0, clip_coef=1.0, **options):
    """AdaLomo statistics of a piece for round ``len(reduced) + 1`` (``reduced``: the reduced
    records of the earlier rounds). Row pieces: ``[a (C) ‖ d (C) ‖ Σrow ‖ Σp² ‖ nf]``; rank ≤ 1:
    ``[Σu² ‖ Σp² ‖ nf]``; column pieces: round 1 ``[b (R) ‖ Σp² ‖ nf]``, round 2
    ``[Σ_j D_j / col_j]`` (``notes/distributed.md`` §3). Options as
    :func:`lomo_native.jax.adalomo_update`."""
    _j.register()
    _j._check_grad(param, grad)
    _check_piece(param, layout, global_shape)
    state = _check_state(param, state, layout, global_shape)
    reduced = [_record(r) for r in reduced]
    n = record_len("adalomo", layout, global_shape, len(reduced) + 1)
    out = jax.ShapeDtypeStruct((n,), record_dtype())
    call = jax.ffi.ffi_call("lomo_adalomo_piece_stats", out, vmap_method="sequential")
    return call(param, grad, *state, *_scalar_operands(lr, step, loss_scale, clip_coef, piece),
                *reduced, **_options(options, ada=True), **_piece_attrs(layout, global_shape))


def adalomo_piece_apply(param, grad, state, reduced, *, piece, layout, global_shape, lr, step,
                        loss_scale=1.0, clip_coef=1.0, **options):
    """The AdaLomo update of a piece given every round's reduced record; ``(new_param,
    new_state, finite)`` as :func:`lomo_native.jax.adalomo_update` (in place when donated)."""
    _j.register()
    _j._check_grad(param, grad)
    _check_piece(param, layout, global_shape)
    state = _check_state(param, state, layout, global_shape)
    reduced = [_record(r) for r in reduced]
    n = len(state)
    results = [jax.ShapeDtypeStruct(param.shape, param.dtype)]
    results += [jax.ShapeDtypeStruct(s.shape, s.dtype) for s in state]
    results.append(_j._BOOL)
    call = jax.ffi.ffi_call(
        "lomo_adalomo_piece_apply",
        tuple(results),
        input_output_aliases={0: 0, **{2 + k: 1 + k for k in range(n)}},
        vmap_method="sequential",
    )
    out = call(param, grad, *state, *_scalar_operands(lr, step, loss_scale, clip_coef, piece),
               *reduced, **_options(options, ada=True), **_piece_attrs(layout, global_shape))
    return out[0], tuple(out[1 : 1 + n]), out[-1]


def _record(r):
    r = jnp.asarray(r)
    if r.dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        raise TypeError("a reduced record must be float32 or float64, got %s" % r.dtype)
    return r


def _check_state(param, state, layout, global_shape):
    state = tuple(state)
    want = _piece_state_shapes(param.shape, layout, global_shape)
    got = [tuple(s.shape) for s in state]
    if got != want or any(jnp.dtype(s.dtype) != jnp.dtype(jnp.float32) for s in state):
        raise ValueError(
            "AdaLomo state of a %s piece %s of %s is float32 arrays of shapes %s, got %s"
            % (layout, tuple(param.shape), tuple(global_shape), want,
               [(g, str(s.dtype)) for g, s in zip(got, state)])
        )
    return state


_UPDATE_KEYS = ("weight_decay", "clip_grad_value", "lr_multiplier", "rounding", "seed", "param_id")
_ADA_KEYS = ("eps1", "eps2", "clip_threshold", "decay_rate")


def _options(options, ada=False):
    keys = _UPDATE_KEYS + (_ADA_KEYS if ada else ())
    unknown = set(options) - set(keys)
    if unknown:
        raise TypeError("unknown option(s) %s" % sorted(unknown))
    d = dict(weight_decay=0.0, clip_grad_value=0.0, lr_multiplier=1.0, rounding="nearest",
             seed=0, param_id=0)
    d.update({k: v for k, v in options.items() if k in _UPDATE_KEYS})
    attrs = _j._update_attrs(**d)
    if ada:
        a = dict(eps1=1e-30, eps2=1e-3, clip_threshold=1.0, decay_rate=-0.8)
        a.update({k: v for k, v in options.items() if k in _ADA_KEYS})
        attrs.update({k: np.float64(v) for k, v in a.items()})
    return attrs
