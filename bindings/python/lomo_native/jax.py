"""LOMO and AdaLomo for JAX: the kernels of liblomo.so as XLA custom calls.

Two layers:

* Functional, ``jax.jit``-compatible operations over explicit arrays —
  :func:`grad_sum_sq`, :func:`lomo_update`, :func:`adalomo_update` (plus
  :func:`adalomo_state` to create zero state). The per-step scalars (``lr``, ``step``,
  ``loss_scale``, ``clip_coef``) are operands, so they may be traced values; every option is a
  compile-time attribute.
* A pytree helper, :func:`lomo` / :func:`adalomo` → :class:`Optimizer`, with
  ``state = opt.init(params)`` and ``params, state = opt.step(params, grads, state, lr)``:
  global-norm clipping, value clipping, weight decay (with an optional mask), static or dynamic
  loss scaling and stochastic rounding, with the same semantics as the C API's
  ``lomo_step_begin`` / ``lomo_grad_submit`` / ``lomo_step_end``. Loss scaling is off by
  default (it only exists for fp16); ``opt.value_and_grad(loss_fn)`` scales the loss and
  unscales the reported value when it is on.
* ``lomo_native.jax.optax`` (imported on first use; needs optax): the same optimizers as optax
  ``GradientTransformation`` objects, for ``optax.chain``, schedules and ``optax.MultiSteps``.

Sharded arrays: inside ``jax.shard_map`` use ``Optimizer.sharded_step`` (or the split-phase
operations ``norm_partials``/``norm_finish``, ``lomo_piece_*``, ``adalomo_piece_*``: local
statistics, the caller's ``jax.lax.psum``, apply; ``_jax_shard.py``). Under plain ``jax.jit``
the operations are ``custom_partitioning`` rules (``_jax_partition.py``) that keep the
parameters' sharding and lower to the same split-phase path: results equal the unsharded step
on every layout but a 2-D block (refused with :class:`ShardedOperandError`). CPU only so far.

Parameters (and AdaLomo state) are updated in place when the caller donates them, e.g.
``jax.jit(train_step, donate_argnums=(0, 1))``; otherwise XLA copies them first. Parameters and
gradients may be f32, f16 or bf16; state is f32.

Platforms: the CPU handlers run the library's CPU backend; the CUDA handlers run its CUDA kernels
on XLA's stream, reading ``lr``, ``step``, ``loss_scale`` and ``clip_coef`` on the device (no host
synchronization), with the same results as the CPU handlers up to reduction order. On CUDA,
invalid per-step values (``lr < 0``, ``step < 1``, ``loss_scale <= 0``, ``clip_coef < 0``) cannot
be raised as errors without a synchronization: the step is skipped and ``finite`` is False
(``grad_sum_sq`` returns NaN, NaN, False). The CUDA path has been verified by host emulation of
the kernels only, not yet on a GPU.
"""

from __future__ import annotations

import math
import threading
from typing import Sequence, Tuple

import numpy as np

import jax
import jax.numpy as jnp

from . import _jax_partition
from ._jax_partition import ShardedOperandError
from ._native import load

__all__ = [
    "grad_sum_sq",
    "lomo_update",
    "adalomo_update",
    "adalomo_state",
    "Optimizer",
    "OptState",
    "ScalerState",
    "lomo",
    "adalomo",
    "register",
    "norm_partials",
    "norm_finish",
    "lomo_piece_stats",
    "lomo_piece_apply",
    "adalomo_piece_stats",
    "adalomo_piece_apply",
    "piece_rounds",
    "ShardedOperandError",
]

_OPS = (
    "grad_sum_sq",
    "lomo_update",
    "adalomo_update",
    # split phase (shard_map), _jax_shard.py; CPU only (the CUDA targets refuse)
    "norm_partials",
    "norm_finish",
    "lomo_piece_stats",
    "lomo_piece_apply",
    "adalomo_piece_stats",
    "adalomo_piece_apply",
)
_FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))
_ROUNDING = ("nearest", "stochastic")

_registered = False
_register_lock = threading.Lock()


def register() -> None:
    """Registers the ``lomo_*`` FFI targets with XLA (done automatically on first use).

    The CPU handlers are always registered; the CUDA ones only where this jaxlib has a CUDA
    platform (registering them elsewhere is skipped).
    """
    global _registered
    if _registered:
        return
    with _register_lock:
        if _registered:
            return
        lib = load()
        for op in _OPS:
            jax.ffi.register_ffi_target(
                "lomo_" + op, jax.ffi.pycapsule(getattr(lib, "lomo_xla_" + op)), platform="cpu"
            )
            try:
                jax.ffi.register_ffi_target(
                    "lomo_" + op,
                    jax.ffi.pycapsule(getattr(lib, "lomo_xla_" + op + "_cuda")),
                    platform="CUDA",
                )
            except Exception:  # noqa: BLE001 - no CUDA platform in this jaxlib
                pass
        _registered = True


def _f32(x) -> jax.Array:
    return jnp.asarray(x, dtype=jnp.float32)


def _i32(x) -> jax.Array:
    return jnp.asarray(x, dtype=jnp.int32)


def _check_float(x, what: str) -> None:
    if jnp.dtype(x.dtype) not in _FLOAT_DTYPES:
        raise TypeError("%s must be float32, float16 or bfloat16, got %s" % (what, x.dtype))


def _check_grad(param, grad) -> None:
    """The gradient must be a float array of the parameter's shape (checked at trace time,
    before anything is handed to XLA)."""
    _check_float(param, "param")
    _check_float(grad, "grad")
    if tuple(grad.shape) != tuple(param.shape):
        raise ValueError(
            "grad shape must equal the parameter's: param %s, grad %s"
            % (tuple(param.shape), tuple(grad.shape))
        )


def _rounding(r: str) -> str:
    if r not in _ROUNDING:
        raise ValueError("rounding must be 'nearest' or 'stochastic', got %r" % (r,))
    return r


def _options(weight_decay, clip_grad_value, lr_multiplier, rounding, seed, param_id):
    """The compile-time options shared by both updates, by name (as ``_update_attrs`` and the
    sharded lowering take them)."""
    return dict(
        weight_decay=weight_decay,
        clip_grad_value=clip_grad_value,
        lr_multiplier=lr_multiplier,
        rounding=rounding,
        seed=seed,
        param_id=param_id,
    )


def _update_attrs(weight_decay, clip_grad_value, lr_multiplier, rounding, seed, param_id):
    return dict(
        weight_decay=np.float64(weight_decay),
        clip_grad_value=np.float64(clip_grad_value),
        lr_multiplier=np.float64(lr_multiplier),
        rounding=_rounding(rounding),
        seed=np.uint64(seed),
        param_id=np.int64(param_id),
    )


_BOOL = jax.ShapeDtypeStruct((), jnp.bool_)
_F32 = jax.ShapeDtypeStruct((), jnp.float32)


def grad_sum_sq(grads, *, loss_scale=1.0, clip_grad_norm: float = 0.0):
    """Σ (g / loss_scale)² over every leaf of ``grads`` (summed in f64, in leaf order).

    Returns ``(sum_sq, clip_coef, finite)``: ``sum_sq`` as f32 (NaN if some element is not
    finite), the global clip coefficient ``min(1, clip_grad_norm / (‖g‖ + 1e-6))`` (1 when
    ``clip_grad_norm`` is 0; NaN when a gradient is not finite, which makes the update
    operations skip the step), and ``finite`` (bool). This is the C API's NORM phase.
    """
    register()
    leaves = jax.tree_util.tree_leaves(grads)
    for i, g in enumerate(leaves):
        _check_float(g, "grad %d" % i)
    call = jax.ffi.ffi_call("lomo_grad_sum_sq", (_F32, _F32, _BOOL), vmap_method="sequential")
    attrs = dict(clip_grad_norm=np.float64(clip_grad_norm))
    return _jax_partition.grad_sum_sq(call, _f32(loss_scale), leaves, attrs)


def lomo_update(
    param,
    grad,
    *,
    lr,
    step=1,
    loss_scale=1.0,
    clip_coef=1.0,
    weight_decay: float = 0.0,
    clip_grad_value: float = 0.0,
    lr_multiplier: float = 1.0,
    rounding: str = "nearest",
    seed: int = 0,
    param_id: int = 0,
):
    """One LOMO step of one tensor: ``p ← p·(1 − lr·wd) − lr · clip_coef · clamp(g/S, ±v)``.

    ``lr``, ``step`` (≥ 1; the stochastic-rounding stream), ``loss_scale`` (S) and
    ``clip_coef`` may be traced. A non-finite ``clip_coef`` skips the update. Returns
    ``(new_param, finite)``; ``finite`` is False when the gradient had a non-finite element (the
    parameter is then unchanged), the step was skipped, or a new value would overflow the
    parameter's dtype (that element keeps its value; never inf). ``param`` is updated in place
    when donated to the enclosing ``jax.jit``.
    """
    register()
    _check_grad(param, grad)
    call = jax.ffi.ffi_call(
        "lomo_lomo_update",
        (jax.ShapeDtypeStruct(param.shape, param.dtype), _BOOL),
        input_output_aliases={0: 0},
        vmap_method="sequential",
    )
    options = _options(weight_decay, clip_grad_value, lr_multiplier, rounding, seed, param_id)
    scalars = (_f32(lr), _f32(loss_scale), _f32(clip_coef), _i32(step))
    return _jax_partition.update(
        "lomo", call, param, grad, (), scalars, _update_attrs(**options), options
    )


def adalomo_state(param) -> Tuple[jax.Array, ...]:
    """Zero AdaLomo state for ``param``: ``(row, col)`` of shapes ``[prod(shape[:-1])]`` and
    ``[shape[-1]]`` for rank ≥ 2, or ``(v,)`` of the parameter's shape for rank ≤ 1 (f32)."""
    return tuple(jnp.zeros(s, jnp.float32) for s in _state_shapes(param.shape))


def _state_shapes(shape) -> list:
    shape = tuple(shape)
    if len(shape) >= 2:
        return [(math.prod(shape[:-1]),), (shape[-1],)]
    return [shape]


def adalomo_update(
    param,
    grad,
    state: Sequence[jax.Array],
    *,
    lr,
    step,
    loss_scale=1.0,
    clip_coef=1.0,
    weight_decay: float = 0.0,
    clip_grad_value: float = 0.0,
    eps1: float = 1e-30,
    eps2: float = 1e-3,
    clip_threshold: float = 1.0,
    decay_rate: float = -0.8,
    lr_multiplier: float = 1.0,
    rounding: str = "nearest",
    seed: int = 0,
    param_id: int = 0,
):
    """One AdaLomo step of one tensor (``reference/semantics.md`` §3.3) with explicit state.

    ``state`` is ``adalomo_state(param)`` or a previous result; ``step`` is AdaLomo's t (≥ 1).
    Returns ``(new_param, new_state, finite)``. Nothing changes when the gradient has a
    non-finite element, ``clip_coef`` is not finite, or the f32 statistics or scalars of a
    finite gradient overflow (``finite`` is then False); a new value that would overflow the
    parameter's dtype keeps the old one (``finite`` False too). ``param`` and ``state`` are
    updated in place when donated to the enclosing ``jax.jit``.
    """
    register()
    _check_grad(param, grad)
    state = tuple(state)
    n = len(state)
    if n != (2 if param.ndim >= 2 else 1):
        raise ValueError(
            "AdaLomo state for a rank-%d parameter is %s, got %d arrays"
            % (param.ndim, "(row, col)" if param.ndim >= 2 else "(v,)", n)
        )
    want = _state_shapes(param.shape)
    got = [tuple(s.shape) for s in state]
    if got != want or any(jnp.dtype(s.dtype) != jnp.dtype(jnp.float32) for s in state):
        raise ValueError(
            "AdaLomo state for a parameter of shape %s is float32 arrays of shapes %s, got %s"
            % (tuple(param.shape), want, [(g, str(s.dtype)) for g, s in zip(got, state)])
        )
    results = [jax.ShapeDtypeStruct(param.shape, param.dtype)]
    results += [jax.ShapeDtypeStruct(s.shape, s.dtype) for s in state]
    results.append(_BOOL)
    call = jax.ffi.ffi_call(
        "lomo_adalomo_update",
        tuple(results),
        input_output_aliases={0: 0, **{2 + k: 1 + k for k in range(n)}},
        vmap_method="sequential",
    )
    attrs = _update_attrs(weight_decay, clip_grad_value, lr_multiplier, rounding, seed, param_id)
    attrs.update(
        eps1=np.float64(eps1),
        eps2=np.float64(eps2),
        clip_threshold=np.float64(clip_threshold),
        decay_rate=np.float64(decay_rate),
    )
    options = dict(
        _options(weight_decay, clip_grad_value, lr_multiplier, rounding, seed, param_id),
        eps1=eps1,
        eps2=eps2,
        clip_threshold=clip_threshold,
        decay_rate=decay_rate,
    )
    scalars = (_f32(lr), _f32(loss_scale), _f32(clip_coef), _i32(step))
    out = _jax_partition.update("adalomo", call, param, grad, state, scalars, attrs, options)
    return out[0], tuple(out[1 : 1 + n]), out[-1]


# The pytree helper (Optimizer, OptState, ScalerState, lomo, adalomo) lives in _jax_pytree.py.
from ._jax_pytree import OptState, Optimizer, ScalerState, adalomo, lomo  # noqa: E402

# The split-phase operations for shard_map live in _jax_shard.py.
from ._jax_shard import (  # noqa: E402
    adalomo_piece_apply,
    adalomo_piece_stats,
    lomo_piece_apply,
    lomo_piece_stats,
    norm_finish,
    norm_partials,
    piece_rounds,
)


def __getattr__(name):
    """``lomo_native.jax.optax`` (the optax form, :mod:`lomo_native._optax`) is imported on
    first use, so that plain JAX users need not install optax."""
    if name == "optax":
        from . import _optax

        return _optax
    raise AttributeError("module %r has no attribute %r" % (__name__, name))
