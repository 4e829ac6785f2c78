"""PyTorch drop-ins for ``lomo_optim.Lomo`` and ``lomo_optim.AdaLomo`` on the C library.

Replace the import and nothing else::

    # from lomo_optim import AdaLomo
    from lomo_native.torch import AdaLomo

    opt = AdaLomo(model, lr=1e-3)
    for batch in loader:
        loss = model(**batch).loss
        opt.fused_backward(loss, lr)          # backward + update, no gradients kept

Same constructor arguments and defaults (the model first), the same ``fused_backward(loss, lr)``
and ``grad_norm(loss)``. Each parameter that requires a gradient gets one
``register_post_accumulate_grad_hook`` that hands its gradient to the library the moment it is
complete (O(1) per parameter, no scan, no one-hook lag) and then drops it. Differences from
lomo-optim 0.1.1 (bug numbers of ``reference/semantics.md`` §7) are listed in the README section
"Python and PyTorch"; the main ones:

* ``clip_grad_norm`` set → ``grad_norm(loss)`` must precede every ``fused_backward`` for *both*
  classes (lomo-optim: Lomo raises, AdaLomo silently skips clipping — B17). A missing call raises.
* fp16 models get dynamic loss scaling starting at 2**16 that grows back, single-process (B6-B8);
  an overflowing step is skipped with every parameter untouched: models with fp16 parameters run a
  norm pass before the update even without clipping (``two_pass``), as lomo-optim needed anyway (B3).
* ``state_dict()`` holds the complete optimizer state (B15); hooks are removable (B16).
* ``step()`` applies what a plain ``loss.backward()`` left in ``.grad`` (any trainer, accelerate,
  gradient accumulation), with the fused path's numerics but the gradients' memory; see
  ``lomo_native._torch_step``.

What trains, or raises before anything changes (issue 13): ``fused_backward(loss)`` uses each
group's own ``lr`` (schedulers per group); ``add_param_group`` registers its parameters;
parameters the model replaced (``load_state_dict(assign=True)``) are re-registered with their
state; sparse gradients are densified; parameters used in several reentrant checkpoint segments
get one update with the summed gradient at the end of backward; channels_last and transposed
parameters are updated in place (AdaLomo refuses layouts whose last dimension is not innermost).
"""

from __future__ import annotations

import torch

from . import _native as N
from ._torch_fused import _DTYPES, _STATE_FORMAT  # noqa: F401 - re-exported
from ._torch_fused import _FusedOptimizer, _LossScalerView, is_no_decay
from .core import StepInfo

__all__ = ["Lomo", "AdaLomo", "StepInfo", "is_no_decay"]


class Lomo(_FusedOptimizer):
    """Drop-in for ``lomo_optim.Lomo`` (fused SGD with decoupled weight decay).

    ``Lomo(model, lr=1e-3, clip_grad_norm=None, clip_grad_value=None, weight_decay=0.0,
    loss_scale_args={})`` as in lomo-optim. Models with fp16 parameters get dynamic loss scaling
    (``loss_scale_args``: ``init_scale`` (default 2**16), ``scale_factor`` (2), ``scale_window``
    (1000), ``min_scale`` (1), ``delayed_shift`` (1)); bf16 and f32 need none.

    Beyond lomo-optim (keyword-only): ``groups`` — a list of ``{"params": [parameters or names],
    "weight_decay": wd, "lr_scale": m}``; ``no_decay`` — True (biases and norm weights, see
    :func:`is_no_decay`) or a callable ``(name, param, module) -> bool`` selecting parameters
    without weight decay; ``two_pass`` — run a norm backward before every update so an
    overflowing step leaves every parameter untouched (default: models with fp16 parameters);
    ``rounding`` (``"nearest"`` or ``"stochastic"``) and ``seed`` for f16/bf16 write-back;
    ``process_group`` — a ``torch.distributed`` group over which the (replicated, not
    DDP-wrapped) model trains as data parallel: each gradient is averaged across it before it is
    applied, equal to one process on the whole batch (``lomo_native._torch_dist``). FSDP2 models
    (``fully_shard``) need no argument: each rank's DTensor shards are registered as row pieces
    of the global tensors, AdaLomo's statistics and the step's scalars agreed over the mesh
    (``lomo_native._torch_fsdp``).
    ``nonfinite_policy`` — without a norm backward, a gradient with ±inf/NaN leaves its whole
    tensor untouched (``"per_tensor"``, default, two reads of the gradient) or only those
    elements (``"per_element"``, one pass; the step still reports the overflow). CPU only.
    ``accumulation_steps`` (k), ``accumulation_buffer`` (``"f32"`` or ``"param"``),
    ``accumulation_reduction`` (``"sum"`` or ``"mean"``) — gradient accumulation in the library:
    ``fused_backward`` on k micro-batches makes one update on their summed gradient
    (``lomo_native._torch_accum``; CPU parameters).
    """

    _ALGORITHM = "lomo"

    def __init__(self, model, lr=1e-3, clip_grad_norm=None, clip_grad_value=None,
                 weight_decay=0.0, loss_scale_args={}, *, groups=None, no_decay=None,
                 two_pass=None, rounding="nearest", seed=0,
                 process_group=None, nonfinite_policy="per_tensor",  # noqa: B006 - lomo-optim's
                 accumulation_steps=1, accumulation_buffer="f32", accumulation_reduction="sum"):
        args = dict(loss_scale_args or {})
        fp16 = any(p.dtype == torch.float16 for p in model.parameters() if p.requires_grad)
        config = dict(rounding=rounding, seed=seed, nonfinite_policy=nonfinite_policy)
        if fp16:
            config.update(_dynamic_scale_config(args))
        elif args:
            _dynamic_scale_config(args)  # validate the keys even when unused
        self.loss_scale_args = args
        super().__init__(model, lr, config, clip_grad_norm, clip_grad_value, weight_decay,
                         groups, no_decay, two_pass, process_group,
                         (accumulation_steps, accumulation_buffer, accumulation_reduction))

    @property
    def loss_scaler(self):
        """lomo-optim compatibility: an object with ``cur_scale``/``loss_scale`` and
        ``has_overflow_serial`` when dynamic loss scaling is on (fp16), else None."""
        if self._native.config["loss_scale_mode"] != N.LOSS_SCALE_DYNAMIC:
            return None
        return _LossScalerView(self)


def _dynamic_scale_config(args: dict) -> dict:
    known = {"init_scale", "scale_factor", "scale_window", "min_scale", "delayed_shift",
             "consecutive_hysteresis", "raise_error_at_min_scale", "dtype"}
    unknown = set(args) - known
    if unknown:
        raise TypeError(f"unknown loss_scale_args {sorted(unknown)} (DynamicLossScaler's: {sorted(known)})")
    if args.get("consecutive_hysteresis"):
        raise NotImplementedError("consecutive_hysteresis=True is not supported")
    return dict(
        loss_scale_mode=N.LOSS_SCALE_DYNAMIC,
        loss_scale=float(args.get("init_scale", 2.0 ** 16)),
        scale_factor=float(args.get("scale_factor", 2.0)),
        scale_window=int(args.get("scale_window", 1000)),
        min_loss_scale=float(args.get("min_scale", 1.0)),
        hysteresis=int(args.get("delayed_shift", 1)),
    )


class AdaLomo(_FusedOptimizer):
    """Drop-in for ``lomo_optim.AdaLomo`` (factored second moment, grouped update
    normalization, relative step size).

    ``AdaLomo(model, lr=1e-3, loss_scale=2**10, eps=(1e-30, 1e-3), clip_threshold=1.0,
    decay_rate=-0.8, clip_grad_norm=None, clip_grad_value=None, weight_decay=0.0)`` as in
    lomo-optim: a static loss scale (None or 0 disables it). State lives in the library (any
    rank, on the parameter's device), created only for trainable parameters. The keyword-only
    extras are those of :class:`Lomo`.
    """

    _ALGORITHM = "adalomo"

    def __init__(self, model, lr=1e-3, loss_scale=2 ** 10, eps=(1e-30, 1e-3), clip_threshold=1.0,
                 decay_rate=-0.8, clip_grad_norm=None, clip_grad_value=None, weight_decay=0.0,
                 *, groups=None, no_decay=None, two_pass=None, rounding="nearest", seed=0,
                 process_group=None, accumulation_steps=1, accumulation_buffer="f32",
                 accumulation_reduction="sum"):
        eps1, eps2 = eps
        config = dict(eps1=float(eps1), eps2=float(eps2), clip_threshold=float(clip_threshold),
                      decay_rate=float(decay_rate), rounding=rounding, seed=seed)
        if loss_scale:
            config.update(loss_scale_mode=N.LOSS_SCALE_STATIC, loss_scale=float(loss_scale))
        else:
            config.update(loss_scale_mode=N.LOSS_SCALE_NONE)
        self.loss_scale_value = loss_scale
        self.eps, self.clip_threshold, self.decay_rate = eps, clip_threshold, decay_rate
        super().__init__(model, lr, config, clip_grad_norm, clip_grad_value, weight_decay,
                         groups, no_decay, two_pass, process_group,
                         (accumulation_steps, accumulation_buffer, accumulation_reduction))

    @property
    def step_num(self) -> int:
        """lomo-optim compatibility: the number of applied update steps (AdaLomo's t)."""
        return self._native.step_info().step
