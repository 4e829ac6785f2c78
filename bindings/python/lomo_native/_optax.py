"""LOMO and AdaLomo as optax ``GradientTransformation`` objects: ``lomo_native.jax.optax``.

    from lomo_native.jax import optax as lomo_optax

    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     lomo_optax.adalomo(optax.cosine_decay_schedule(1e-2, 1000)))
    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)

``update`` runs the same fused kernels as :meth:`lomo_native.jax.Optimizer.step` on a copy of
the parameters and returns ``updates = new_params - params``, computed in f32 (``updates`` are
f32 whatever the parameters' dtype). ``optax.apply_updates(params, updates)`` then gives:

* f16 / bf16 parameters: exactly ``opt.step``'s parameters (the f32 difference of two bf16/f16
  values, and its sum with the old value, are exact unless a value shrinks by a factor of
  more than about 2^15 in one step);
* f32 parameters: ``opt.step``'s parameters within one ulp of ``max(|p|, |new|)`` (the fused
  step rounds once; ``p + (new - p)`` rounds the difference and the sum). It is exact whenever
  ``new`` and ``p`` are within a factor of 2 of each other, as for nearly every element; an
  element that crosses or nears zero can differ by more than one ulp of its new value.

Trade-off: this form materializes a second copy of the parameters and a full-size ``updates``
tree per step, as every optax optimizer does. The fused, in-place path — ``opt.step`` inside a
``jax.jit`` that donates the parameters and state — needs neither and stays the memory-lean one.

Requires optax (``pip install "lomo-native[optax]"``); ``lomo_native.jax`` itself does not
import it.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from ._jax_pytree import Optimizer, OptState

__all__ = ["LomoOptaxState", "as_gradient_transformation", "lomo", "adalomo"]

ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], Any]]


class LomoOptaxState(NamedTuple):
    """State of the optax form: ``count`` (int32, ``update`` calls so far: the argument of an
    lr schedule, as in optax's own optimizers) and ``inner``, the :class:`OptState` of the
    underlying :class:`~lomo_native.jax.Optimizer` (``inner.grad_norm``, ``inner.skipped``,
    ``inner.step``: applied steps, which AdaLomo's bias correction counts)."""

    count: jax.Array
    inner: OptState


def _difference(new, old):
    return new.astype(jnp.float32) - old.astype(jnp.float32)


def as_gradient_transformation(
    opt: Optimizer, learning_rate: ScalarOrSchedule
) -> optax.GradientTransformation:
    """``opt`` (from :func:`lomo_native.jax.lomo` / :func:`~lomo_native.jax.adalomo`) as an
    optax ``GradientTransformation``.

    ``learning_rate``: a float, or an optax schedule (a callable of the int32 update count,
    starting at 0). ``update(grads, state, params)`` needs ``params``; ``grads`` are the plain
    (unscaled) gradients, as every optax transform expects, so ``opt`` must not use loss
    scaling (``ValueError`` otherwise: earlier transforms of a chain, e.g.
    ``clip_by_global_norm``, would see scaled gradients; for fp16 with dynamic loss scaling use
    ``opt.step`` with ``opt.value_and_grad``). The step's own options (``clip_grad_norm``,
    ``weight_decay``, ``weight_decay_mask``, ...) apply as in ``opt.step``.
    """
    if not isinstance(opt, Optimizer):
        raise TypeError("opt must be a lomo_native.jax Optimizer, got %r" % (type(opt),))
    if opt.loss_scale_mode != "none":
        raise ValueError(
            "the optax form takes unscaled gradients: create the optimizer with "
            "loss_scale_mode='none' (got %r); loss scaling is for fp16 with opt.step and "
            "opt.value_and_grad" % (opt.loss_scale_mode,)
        )

    def init(params) -> LomoOptaxState:
        return LomoOptaxState(count=jnp.zeros((), jnp.int32), inner=opt.init(params))

    def update(grads, state: LomoOptaxState, params=None):
        if params is None:
            raise ValueError("lomo_native.jax.optax: update(grads, state, params) needs params")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        new_params, inner = opt.step(params, grads, state.inner, lr)
        updates = jax.tree_util.tree_map(_difference, new_params, params)
        # int32 count that saturates instead of wrapping (optax's safe increment)
        count = jnp.where(state.count < jnp.iinfo(jnp.int32).max, state.count + 1, state.count)
        return updates, LomoOptaxState(count=count, inner=inner)

    return optax.GradientTransformation(init, update)


def _make(algorithm, learning_rate, options):
    # Unset options (None: the Optimizer's default) are dropped; a traced option means
    # optax.inject_hyperparams made it a hyperparameter, which it cannot be (compile-time).
    options = {k: v for k, v in options.items() if v is not None}
    traced = sorted(k for k, v in options.items() if isinstance(v, jax.core.Tracer))
    if traced:
        raise TypeError(
            "lomo_native.jax.optax: %s are compile-time options, not hyperparameters that can "
            "change under jit; with optax.inject_hyperparams pass static_args=%r (only "
            "learning_rate can be injected)" % (traced, tuple(traced))
        )
    return as_gradient_transformation(Optimizer(algorithm, **options), learning_rate)


def _signature(doc_name):
    """An explicit keyword-only signature (every option defaulting to None: the Optimizer's
    default) so that ``optax.inject_hyperparams(lomo_optax.adalomo)(learning_rate=...)`` binds
    the options by name and injects only ``learning_rate``."""
    params = [inspect.Parameter("learning_rate", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for name in inspect.signature(Optimizer.__init__).parameters:
        if name not in ("self", "algorithm"):
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None))
    return inspect.Signature(params)


def lomo(learning_rate: ScalarOrSchedule, **options) -> optax.GradientTransformation:
    """LOMO as an optax transformation; ``options`` as :func:`lomo_native.jax.lomo`."""
    return _make("lomo", learning_rate, options)


def adalomo(learning_rate: ScalarOrSchedule, **options) -> optax.GradientTransformation:
    """AdaLomo as an optax transformation; ``options`` as :func:`lomo_native.jax.adalomo`."""
    return _make("adalomo", learning_rate, options)


lomo.__signature__ = _signature("lomo")
adalomo.__signature__ = _signature("adalomo")
