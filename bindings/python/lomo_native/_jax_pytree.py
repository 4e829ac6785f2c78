"""The pytree layer of :mod:`lomo_native.jax`: :class:`Optimizer` (``lomo()`` /
``adalomo()``) with ``init`` and ``step`` over parameter pytrees, on the functional operations
of :mod:`lomo_native.jax`, with the C API's step semantics (``lomo_step_begin`` /
``lomo_grad_submit`` / ``lomo_step_end``). Import it from :mod:`lomo_native.jax`."""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from .jax import _check_float, _rounding, adalomo_state, adalomo_update, grad_sum_sq, lomo_update

# --------------------------------------------------------------------------------------------
# Pytree helper


class ScalerState(NamedTuple):
    """Dynamic loss-scaler bookkeeping (DeepSpeed's rule, as the C API's ``LossScaler``)."""

    cur_hysteresis: jax.Array  # int32
    cur_iter: jax.Array  # int32: scaler updates so far
    last_overflow_iter: jax.Array  # int32, -1 = never


class OptState(NamedTuple):
    """Optimizer state: a pytree of arrays (donate it together with the parameters)."""

    step: jax.Array  # int32: applied update steps so far (AdaLomo's t of the last update)
    loss_scale: jax.Array  # f32: multiply the loss by this before differentiating
    scaler: ScalerState
    ada: Tuple[Tuple[jax.Array, ...], ...]  # per leaf: (row, col), (v,), or () for LOMO
    grad_norm: jax.Array  # f32: norm of the unscaled gradients of the last step (NaN: none)
    overflow: jax.Array  # bool: a non-finite gradient was seen in the last step
    skipped: jax.Array  # bool: the last step was skipped (overflow found by the norm pass)


_MODES = {"none": 0, "static": 1, "dynamic": 2}


class Optimizer:
    """LOMO or AdaLomo over a parameter pytree; create with :func:`lomo` or :func:`adalomo`.

    Options and defaults are those of ``lomo_config`` (C API), except that loss scaling is off
    by default for both algorithms (``loss_scale_mode="none"``; see :meth:`value_and_grad`
    for fp16). ``weight_decay_mask`` is a pytree
    of bools with the parameters' structure, or a function ``params -> that pytree``; leaves
    marked False get no weight decay (use it for biases and norm weights).
    """

    def __init__(
        self,
        algorithm: str,
        *,
        weight_decay: float = 0.0,
        clip_grad_norm: float = 0.0,
        clip_grad_value: float = 0.0,
        loss_scale_mode: Optional[str] = None,
        loss_scale: Optional[float] = None,
        scale_factor: float = 2.0,
        scale_window: int = 1000,
        min_loss_scale: float = 1.0,
        hysteresis: int = 1,
        eps1: float = 1e-30,
        eps2: float = 1e-3,
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        rounding: str = "nearest",
        seed: int = 0,
        weight_decay_mask: Any = None,
    ):
        if algorithm not in ("lomo", "adalomo"):
            raise ValueError("algorithm must be 'lomo' or 'adalomo', got %r" % (algorithm,))
        ada = algorithm == "adalomo"
        if loss_scale_mode is None:
            # Off for every algorithm: in JAX the user differentiates the loss, so a default
            # scale would silently shrink the gradients of a loss that was not multiplied by
            # it (lomo-optim's static 1024 for AdaLomo scales inside its own backward). Loss
            # scaling only exists for fp16 overflow: loss_scale_mode="dynamic" with
            # value_and_grad.
            loss_scale_mode = "none"
        if loss_scale_mode not in _MODES:
            raise ValueError(
                "loss_scale_mode must be 'none', 'static' or 'dynamic', got %r" % (loss_scale_mode,)
            )
        if loss_scale is None:
            loss_scale = 1024.0 if ada else 65536.0
        for name, v in (
            ("weight_decay", weight_decay),
            ("clip_grad_norm", clip_grad_norm),
            ("clip_grad_value", clip_grad_value),
        ):
            if not (math.isfinite(v) and v >= 0):
                raise ValueError("%s must be finite and >= 0, got %r" % (name, v))
        if loss_scale_mode != "none" and not (math.isfinite(loss_scale) and loss_scale > 0):
            raise ValueError("loss_scale must be finite and > 0, got %r" % (loss_scale,))
        if loss_scale_mode == "dynamic":
            if not (math.isfinite(scale_factor) and scale_factor > 1):
                raise ValueError("scale_factor must be > 1, got %r" % (scale_factor,))
            if scale_window < 1 or hysteresis < 1:
                raise ValueError("scale_window and hysteresis must be >= 1")
            if not (0 < min_loss_scale <= loss_scale):
                raise ValueError(
                    "min_loss_scale must be in (0, loss_scale], got %r" % (min_loss_scale,)
                )
        # Every other range (eps1 > 0 and the like, issue 13) is the library's: validate the
        # same configuration through lomo_optimizer_new now rather than at the first step.
        from .core import Optimizer as _NativeOptimizer

        _NativeOptimizer(
            algorithm,
            weight_decay=float(weight_decay),
            clip_grad_norm=float(clip_grad_norm),
            clip_grad_value=float(clip_grad_value),
            loss_scale_mode=loss_scale_mode,
            loss_scale=float(loss_scale),
            scale_factor=float(scale_factor),
            scale_window=int(scale_window),
            min_loss_scale=float(min_loss_scale),
            hysteresis=int(hysteresis),
            eps1=float(eps1),
            eps2=float(eps2),
            clip_threshold=float(clip_threshold),
            decay_rate=float(decay_rate),
            rounding=_rounding(rounding),
            seed=int(seed),
        ).close()
        self.algorithm = algorithm
        self.weight_decay = float(weight_decay)
        self.clip_grad_norm = float(clip_grad_norm)
        self.clip_grad_value = float(clip_grad_value)
        self.loss_scale_mode = loss_scale_mode
        self.initial_loss_scale = 1.0 if loss_scale_mode == "none" else float(loss_scale)
        self.scale_factor = float(scale_factor)
        self.scale_window = int(scale_window)
        self.min_loss_scale = float(min_loss_scale)
        self.hysteresis = int(hysteresis)
        self.ada_options = dict(
            eps1=float(eps1),
            eps2=float(eps2),
            clip_threshold=float(clip_threshold),
            decay_rate=float(decay_rate),
        )
        self.rounding = _rounding(rounding)
        self.seed = int(seed)
        self.weight_decay_mask = weight_decay_mask

    # -- state ---------------------------------------------------------------------------------

    def init(self, params) -> OptState:
        """Fresh state for ``params`` (zero AdaLomo state, the initial loss scale, step 0)."""
        leaves = jax.tree_util.tree_leaves(params)
        for i, p in enumerate(leaves):
            _check_float(p, "parameter %d" % i)
        ada = tuple(adalomo_state(p) if self.algorithm == "adalomo" else () for p in leaves)
        return OptState(
            step=jnp.zeros((), jnp.int32),
            loss_scale=jnp.asarray(self.initial_loss_scale, jnp.float32),
            scaler=ScalerState(
                cur_hysteresis=jnp.asarray(self.hysteresis, jnp.int32),
                cur_iter=jnp.zeros((), jnp.int32),
                last_overflow_iter=jnp.asarray(-1, jnp.int32),
            ),
            ada=ada,
            grad_norm=jnp.asarray(jnp.nan, jnp.float32),
            overflow=jnp.zeros((), jnp.bool_),
            skipped=jnp.zeros((), jnp.bool_),
        )

    @staticmethod
    def loss_scale(state: OptState) -> jax.Array:
        """The factor to multiply the loss by before computing the gradients (f32; 1 when loss
        scaling is off, the default)."""
        return state.loss_scale

    def value_and_grad(self, fun, argnums=0, has_aux: bool = False):
        """``jax.value_and_grad`` with this optimizer's loss scale applied and removed.

        Returns ``f(state, *args, **kwargs) -> (value, grads)`` (``((value, aux), grads)``
        with ``has_aux``): ``value`` is ``fun(*args, **kwargs)`` as the user wrote it
        (unscaled), ``grads`` are the gradients of ``value · opt.loss_scale(state)`` with respect
        to ``args[argnums]`` — what :meth:`step` takes (it divides by the same scale). With loss
        scaling off (the default) the scale is 1 and ``grads`` are the plain gradients. ``fun``
        must return a real scalar.
        """

        def scaled(*args, **kwargs):
            scale = kwargs.pop("_lomo_loss_scale")
            out = fun(*args, **kwargs)
            value = out[0] if has_aux else out
            # Scaled in f32 (an fp16 loss times 65536 would overflow before the backward).
            loss = jnp.asarray(value, jnp.float32) * scale
            return (loss, out) if has_aux else (loss, value)

        vg = jax.value_and_grad(scaled, argnums=argnums, has_aux=True)

        def wrapped(state: OptState, *args, **kwargs):
            (_, value), grads = vg(*args, _lomo_loss_scale=state.loss_scale, **kwargs)
            return value, grads

        return wrapped

    # -- one step ------------------------------------------------------------------------------

    def _leaf_options(self, i, lr, step, scale, coef, weight_decay):
        """The keyword arguments of leaf ``i``'s update call (whole or split phase): the step's
        scalars and this optimizer's per-leaf options."""
        return dict(
            lr=lr,
            step=step,
            loss_scale=scale,
            clip_coef=coef,
            weight_decay=weight_decay,
            clip_grad_value=self.clip_grad_value,
            rounding=self.rounding,
            seed=self.seed,
            param_id=i,
        )

    def _decay_per_leaf(self, params, treedef, n):
        mask = self.weight_decay_mask
        if mask is None:
            return [self.weight_decay] * n
        if callable(mask):
            mask = mask(params)
        flags = treedef.flatten_up_to(mask)
        return [self.weight_decay if bool(m) else 0.0 for m in flags]

    def step(self, params, grads, state: OptState, lr):
        """Applies one step; returns ``(new_params, new_state)``.

        ``grads`` are the gradients of the loss multiplied by ``state.loss_scale`` (same
        structure as ``params``): with loss scaling off (the default) the plain gradients;
        :meth:`value_and_grad` computes them in every mode; ``lr`` may be traced. With ``clip_grad_norm`` the global norm
        is taken first (the C API's NORM phase) and a non-finite gradient skips the whole step;
        otherwise a tensor whose gradient is not finite is left unchanged. Then the loss scaler
        and the step counter advance as in ``lomo_step_end``.
        """
        leaves, treedef = jax.tree_util.tree_flatten(params)
        gleaves = treedef.flatten_up_to(grads)
        if len(state.ada) != len(leaves):
            raise ValueError(
                "state was made for %d parameters, got %d" % (len(state.ada), len(leaves))
            )
        scale = state.loss_scale
        if self.clip_grad_norm > 0:
            sum_sq, coef, finite = grad_sum_sq(
                gleaves, loss_scale=scale, clip_grad_norm=self.clip_grad_norm
            )
            skipped = jnp.logical_not(finite)
            grad_norm = jnp.sqrt(sum_sq)
        else:
            coef = jnp.ones((), jnp.float32)
            skipped = jnp.zeros((), jnp.bool_)
            grad_norm = jnp.asarray(jnp.nan, jnp.float32)
        t = state.step + 1
        decays = self._decay_per_leaf(params, treedef, len(leaves))
        new_leaves, new_ada, oks = [], [], []
        for i, (p, g, s, wd) in enumerate(zip(leaves, gleaves, state.ada, decays)):
            common = self._leaf_options(i, lr, t, scale, coef, wd)
            if self.algorithm == "adalomo":
                p2, s2, ok = adalomo_update(p, g, s, **common, **self.ada_options)
            else:
                (p2, ok), s2 = lomo_update(p, g, **common), ()
            new_leaves.append(p2)
            new_ada.append(s2)
            oks.append(ok)
        all_ok = jnp.all(jnp.stack(oks)) if oks else jnp.ones((), jnp.bool_)
        return self._finish_step(
            state, scale, skipped, grad_norm, all_ok, treedef, new_leaves, new_ada
        )

    def _finish_step(self, state, scale, skipped, grad_norm, all_ok, treedef, new_leaves, new_ada):
        """``lomo_step_end``: the scaler and the step counter from the step's decisions."""
        overflow = jnp.logical_or(skipped, jnp.logical_not(all_ok))
        scale2, scaler2 = self._scaler_update(scale, state.scaler, overflow)
        new_state = OptState(
            step=state.step + jnp.where(skipped, 0, 1).astype(jnp.int32),
            loss_scale=scale2,
            scaler=scaler2,
            ada=tuple(new_ada),
            grad_norm=grad_norm,
            overflow=overflow,
            skipped=skipped,
        )
        return jax.tree_util.tree_unflatten(treedef, new_leaves), new_state

    # -- sharded (shard_map) ---------------------------------------------------------------------

    def sharded_step(self, params, grads, state: OptState, lr, specs):
        """:meth:`step` inside ``jax.shard_map`` on parameters split over named mesh axes.

        ``params``, ``grads`` and ``state`` are the device's pieces (``shard_map``'s view);
        ``specs`` the parameters' ``PartitionSpec``s (a pytree like ``params``, or one spec for
        all). A leaf may be replicated (``P()``), split over its first dimension (rows of the
        ``[prod(shape[:-1]), shape[-1]]`` view; rank 1: elements) or over its last (columns),
        each over one or several mesh axes (``P(('x', 'y'), None)``); not over two dimensions.
        ``grads`` must be the complete gradients of the pieces (already reduced over
        data-parallel axes, e.g. by ``jax.lax.psum``). The global norm, AdaLomo's row/column
        means, RMS(update), RMS(param) and every skip decision are reduced with
        ``jax.lax.psum`` over the axes each tensor is split over, so every device decides the
        same and the result equals :meth:`step` on the whole parameters (bit for bit on dyadic
        inputs with ``jax_enable_x64``; to f32 rounding of the statistics without it).
        Stochastic rounding is keyed by the global element index. The state's specs are
        :meth:`state_specs`. CPU only so far.
        """
        from ._jax_shard_tree import sharded_step

        return sharded_step(self, params, grads, state, lr, specs)

    def state_specs(self, params, specs, mesh=None):
        """The ``PartitionSpec``s of ``init(params)`` for parameters sharded by ``specs`` (an
        :class:`OptState` of specs, for ``shard_map`` and ``jax.device_put``). Pass ``mesh``
        when a spec names an axis of size 1 over a second dimension (it splits nothing)."""
        from ._jax_shard_tree import state_specs

        return state_specs(self, params, specs, mesh)

    def state_shardings(self, mesh, params, specs):
        """:meth:`state_specs` as ``NamedSharding``s on ``mesh``."""
        from ._jax_shard_tree import state_shardings

        return state_shardings(self, mesh, params, specs)

    def _scaler_update(self, scale, sc: ScalerState, overflow):
        """``LossScaler::update`` (src/scaler.rs) in jnp; scales stay exact for power-of-two
        factors."""
        if self.loss_scale_mode != "dynamic":
            return scale, sc
        factor = jnp.float32(self.scale_factor)
        back_off = jnp.logical_or(self.hysteresis == 1, sc.cur_hysteresis == 1)
        o_scale = jnp.where(back_off, jnp.maximum(scale / factor, self.min_loss_scale), scale)
        o_hyst = jnp.where(back_off, sc.cur_hysteresis, sc.cur_hysteresis - 1)
        stable = sc.cur_iter - sc.last_overflow_iter - 1
        grow = jnp.logical_and(stable > 0, stable % self.scale_window == 0)
        # Never past the largest f32 (src/scaler.rs): backing off from inf stays inf.
        fits = jnp.logical_and(grow, jnp.isfinite(scale * factor))
        c_scale = jnp.where(fits, scale * factor, scale)
        c_hyst = jnp.where(grow, jnp.int32(self.hysteresis), sc.cur_hysteresis)
        new_scale = jnp.where(overflow, o_scale, c_scale).astype(jnp.float32)
        new_sc = ScalerState(
            cur_hysteresis=jnp.where(overflow, o_hyst, c_hyst).astype(jnp.int32),
            cur_iter=sc.cur_iter + 1,
            last_overflow_iter=jnp.where(overflow, sc.cur_iter, sc.last_overflow_iter),
        )
        return new_scale, new_sc


def lomo(**options) -> Optimizer:
    """A LOMO optimizer (fused SGD with decoupled weight decay); options as :class:`Optimizer`."""
    return Optimizer("lomo", **options)


def adalomo(**options) -> Optimizer:
    """An AdaLomo optimizer (factored second moment, relative step); options as
    :class:`Optimizer`. Loss scaling is off by default (unlike lomo-optim's static 1024, which
    lomo-optim applies inside its own backward): pass ``loss_scale_mode`` for fp16."""
    return Optimizer("adalomo", **options)
