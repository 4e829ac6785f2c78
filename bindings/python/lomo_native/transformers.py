"""Hugging Face ``transformers`` integration: :class:`LomoTrainer`, a ``transformers.Trainer``
that updates each parameter inside the backward pass (LOMO/AdaLomo's fused path), and
:func:`lomo_optimizer_cls_and_kwargs` for the stock ``Trainer`` (non-fused path).

::

    from lomo_native.transformers import LomoTrainer
    args = TrainingArguments("out", optim="adalomo", learning_rate=1e-3, max_grad_norm=1.0,
                             weight_decay=0.01, lr_scheduler_type="cosine", warmup_steps=10)
    LomoTrainer(model=model, args=args, train_dataset=ds).train()

What ``LomoTrainer`` honours (tested with transformers 5.x against hand-written loops):

* the optimizer: ``optimizers=(Lomo(...) or AdaLomo(...), scheduler or None)`` as with any
  Trainer, or built from ``TrainingArguments`` when none is given: ``optim="lomo"`` or
  ``"adalomo"`` (always lomo_native's classes here, whether lomo-optim is installed or not),
  ``learning_rate``, ``weight_decay`` (not for the parameters ``Trainer.get_decay_parameter_names``
  leaves out: biases and norms), ``max_grad_norm``; extra constructor arguments through
  ``LomoTrainer(..., lomo_kwargs={...})``;
* the lr scheduler: each step's lr is read from the optimizer's ``param_groups`` (where
  the scheduler writes it) at the step's backward;
* ``max_grad_norm > 0``: global norm clipping with the two-pass protocol (a norm backward,
  then the update backward); the grad norm is logged (``grad_norm``), as the Trainer does;
* fp16 parameters (e.g. ``torch_dtype=torch.float16``): the library's dynamic loss scaling;
  the scale is logged (``loss_scale``, with ``skipped_steps``), a skipped step does not advance
  the lr scheduler (as with torch's GradScaler). bf16 parameters and ``bf16=True`` (autocast) need
  no scaling. ``fp16=True`` (autocast with torch's GradScaler) is refused: load the model in fp16;
* checkpoints: the optimizer's ``state_dict`` (AdaLomo's statistics, step counter, loss scaler) is
  saved and restored with the Trainer's checkpoints; resuming continues bit-identically;
* ``gradient_accumulation_steps > 1``: in the library, on the fused path
  (``lomo_native._torch_accum``): the first micro-batches of a step add their gradients to the
  optimizer's accumulation buffers inside the backward, the step's last one applies the update
  (with the clipping norm of the accumulated gradients): equal to one step on the concatenated
  micro-batches. The buffers cost 4 bytes per parameter element (``f32``), or 2 for bf16/fp16
  models with ``lomo_kwargs={"accumulation_buffer": "param"}``.

Not supported (refused at construction): DeepSpeed, FSDP, several GPUs in one process
(``DataParallel``), optimizers that are not lomo_native's.
"""

from __future__ import annotations

import math

import torch
import transformers

from . import _native as N
from .torch import AdaLomo, Lomo, _FusedOptimizer

__all__ = ["LomoTrainer", "lomo_optimizer_cls_and_kwargs", "ALGORITHMS"]

#: ``TrainingArguments.optim`` names and the classes they select.
ALGORITHMS = {"lomo": Lomo, "adalomo": AdaLomo}


def _optim_name(args) -> str:
    return getattr(args.optim, "value", args.optim)


def lomo_optimizer_cls_and_kwargs(args, model, fused: bool = False, **extra):
    """``(class, kwargs)`` of the lomo_native optimizer ``args`` describe, in the form
    ``Trainer(optimizer_cls_and_kwargs=...)`` takes (the model is passed as ``kwargs["model"]``,
    which ``Trainer.create_optimizer`` hands to the class).

    The class is ``args.optim``'s (``"lomo"`` or ``"adalomo"``); with another ``optim`` pass
    ``algorithm="lomo"``/``"adalomo"`` in ``extra``. ``lr = args.learning_rate``,
    ``weight_decay = args.weight_decay`` for the parameters that ``Trainer`` decays (none for
    biases and norms). The stock Trainer clips ``.grad`` itself, so ``clip_grad_norm`` is only
    set from ``args.max_grad_norm`` when ``fused`` (``LomoTrainer``). ``extra`` overrides
    constructor arguments (``clip_grad_value``, ``loss_scale``, ``rounding``...)."""
    algorithm = extra.pop("algorithm", None) or _optim_name(args)
    if algorithm not in ALGORITHMS:
        raise ValueError(
            f"optim={algorithm!r}: lomo_native provides 'lomo' and 'adalomo' "
            "(TrainingArguments(optim='adalomo'), or algorithm='adalomo')")
    decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
    kwargs = dict(model=model, lr=args.learning_rate, weight_decay=args.weight_decay)
    if args.weight_decay:
        kwargs["no_decay"] = lambda name, p, module: name not in decay
    if fused and args.max_grad_norm and args.max_grad_norm > 0:
        kwargs["clip_grad_norm"] = float(args.max_grad_norm)
    if fused and args.gradient_accumulation_steps > 1:
        kwargs["accumulation_steps"] = int(args.gradient_accumulation_steps)
    kwargs.update(extra)
    return ALGORITHMS[algorithm], kwargs


class LomoTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose optimizer step happens inside the backward pass.

    Takes the Trainer's arguments, plus ``lomo_kwargs`` (extra constructor arguments of the
    optimizer built from ``TrainingArguments``). See the module docstring for what is honoured.
    """

    def __init__(self, *args, lomo_kwargs: dict | None = None, **kwargs):
        self.lomo_kwargs = dict(lomo_kwargs or {})
        super().__init__(*args, **kwargs)
        a = self.args
        if self.optimizer is not None:
            if not isinstance(self.optimizer, _FusedOptimizer):
                raise TypeError("LomoTrainer needs a lomo_native.torch.Lomo or AdaLomo optimizer "
                                f"(got {type(self.optimizer).__name__}); use transformers.Trainer "
                                "for others")
            clip = self.optimizer.clip_grad_norm or 0.0
            if clip != (a.max_grad_norm or 0.0):
                raise ValueError(
                    f"max_grad_norm={a.max_grad_norm} but the optimizer has clip_grad_norm="
                    f"{self.optimizer.clip_grad_norm}: the library clips (two-pass), so build "
                    "the optimizer with clip_grad_norm=args.max_grad_norm, or set "
                    "max_grad_norm=0 in TrainingArguments to train without clipping")
        elif self.optimizer_cls_and_kwargs is None and _optim_name(a) not in ALGORITHMS \
                and "algorithm" not in self.lomo_kwargs:
            raise ValueError(f"LomoTrainer: optim={_optim_name(a)!r}; set "
                             "TrainingArguments(optim='lomo' or 'adalomo'), or pass "
                             "optimizers=(lomo_native.torch.AdaLomo(model, ...), None)")
        if a.fp16:
            raise ValueError("LomoTrainer: fp16=True (autocast and torch's GradScaler) is not "
                             "supported; load the model in torch.float16 instead: lomo scales "
                             "the loss dynamically for fp16 parameters")
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or a.n_gpu > 1:
            raise ValueError("LomoTrainer supports one device per process, without DeepSpeed "
                             "or FSDP")

    # ---------------------------------------------------------------------------- optimizer
    def create_optimizer(self, model=None):
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None:
            opt_model = self.model if model is None else model
            cls, kw = lomo_optimizer_cls_and_kwargs(self.args, opt_model, fused=True,
                                                    **self.lomo_kwargs)
            self.optimizer = cls(**kw)
            return self.optimizer
        return super().create_optimizer(model)

    @property
    def lomo_optimizer(self) -> _FusedOptimizer:
        """The lomo_native optimizer (unwrapped from accelerate's ``AcceleratedOptimizer``)."""
        opt = self.optimizer
        while not isinstance(opt, _FusedOptimizer):
            opt = opt.optimizer
        return opt

    # -------------------------------------------------------------------------- the step
    def training_step(self, model, inputs, num_items_in_batch=None):
        """Forward and the fused backward of one micro-batch (the update happens here; the
        Trainer's later ``optimizer.step()`` finds no gradient and does nothing)."""
        opt = self.lomo_optimizer
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        del inputs
        if self.loss_is_scaled_for_ga is not None:
            scaled_for_ga = self.loss_is_scaled_for_ga
        else:
            scaled_for_ga = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) \
                or self.compute_loss_func is not None
        if not scaled_for_ga:
            loss = loss / self.current_gradient_accumulation_steps
        ga = self.args.gradient_accumulation_steps
        if ga > 1 and opt.accumulation_steps == 1:
            opt.set_accumulation(ga)  # an optimizer passed in: buffers in the library
        # with accumulation the Trainer says which micro-batch ends the step (an epoch's last
        # step may have fewer)
        accumulate = not self.accelerator.gradient_state.sync_gradients
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            opt.grad_norm(loss, accumulate=accumulate)
        opt.fused_backward(loss, accumulate=accumulate)  # lr: param_groups (the scheduler's)
        if not accumulate:
            self._after_update(opt)
        return loss.detach()

    def _after_update(self, opt):
        info = opt.step_info()
        self._lomo_grad_norm = info.grad_norm
        # an overflow-skipped step does not advance the lr scheduler (as with GradScaler)
        if hasattr(self.optimizer, "_is_overflow"):
            self.optimizer._is_overflow = bool(info.skipped)

    def _clip_grad_norm(self, model):
        return None  # clipped by the library inside the step; the norm comes from _get_grad_norm

    def _get_grad_norm(self, model, grad_norm=None):
        norm = getattr(self, "_lomo_grad_norm", math.nan)
        self._lomo_grad_norm = math.nan
        return None if math.isnan(norm) else norm

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self.optimizer is not None:
            opt = self.lomo_optimizer
            if opt.native.config["loss_scale_mode"] != N.LOSS_SCALE_NONE:
                logs["loss_scale"] = opt.loss_scale
                logs["skipped_steps"] = opt.step_info().skipped_total
        return super().log(logs, *args, **kwargs)
