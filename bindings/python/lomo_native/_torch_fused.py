"""The machinery shared by :class:`lomo_native.torch.Lomo` and :class:`lomo_native.torch.AdaLomo`:
construction (parameter groups, registration), the fused steps (``grad_norm``,
``fused_backward`` and their backward passes), the non-fused ``step()``, diagnostics, the
``lomo_native.torch/1`` state format and removal. The public classes and their documentation are
in :mod:`lomo_native.torch`; the per-parameter hooks in ``_torch_params``, the model and group
synchronization in ``_torch_sync``, accumulation in ``_torch_accum``, the torch-layout state in
``_torch_state``."""

from __future__ import annotations

import weakref
from typing import Optional

import torch

from . import _native as N
from . import _torch_dist as TD
from . import _torch_fsdp as TF
from . import _torch_state as TS
from . import _torch_params as TP
from ._torch_accum import Accumulation
from ._torch_sync import ModelSync
from ._torch_sync import check_lr
from . import _torch_step
from .core import Optimizer as _NativeOptimizer
from .core import StepInfo

_DTYPES = TP._DTYPES
_STATE_FORMAT = "lomo_native.torch/1"
_DONATED_BUFFERS = (
    "the norm backward (grad_norm, needed by clip_grad_norm, and the two-pass step of fp16 "
    "models) keeps the graph for the update backward (retain_graph=True), which the backward of "
    "a torch.compile'd model refuses while it donates its buffers: set "
    "torch._functorch.config.donated_buffer = False before the model's first forward (or use "
    "two_pass=False and no clip_grad_norm). Nothing was changed")


def is_no_decay(name: str, param: torch.Tensor, module: torch.nn.Module) -> bool:
    """The default rule of ``no_decay=True``: biases and the weights of normalization layers
    (any module whose class name contains "Norm": LayerNorm, RMSNorm, GroupNorm, BatchNorm...)."""
    return name.rsplit(".", 1)[-1] == "bias" or "norm" in type(module).__name__.lower()


def _check_loss(loss) -> None:
    """Raises, before any phase begins (so the micro-batches of an accumulated step are kept),
    for a loss that ``backward()`` would refuse: not a tensor, not a single element, or without
    a graph (detached, computed under ``torch.no_grad()``)."""
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"the loss must be a torch.Tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise RuntimeError(f"the loss must have one element (got shape {tuple(loss.shape)}): "
                           "reduce it (e.g. .mean()) first; nothing was changed")
    if not loss.requires_grad:
        raise RuntimeError("the loss does not require a gradient (detached, or computed under "
                           "torch.no_grad()/inference_mode); nothing was changed")


class _LossScalerView:
    """Read-only stand-in for lomo-optim's ``DynamicLossScaler`` (``opt.loss_scaler``), so that
    lomo-optim loops that test ``opt.loss_scaler.has_overflow_serial`` keep working."""

    def __init__(self, opt: "_FusedOptimizer"):
        self._opt = weakref.ref(opt)

    @property
    def cur_scale(self) -> float:
        return self._opt().loss_scale

    loss_scale = cur_scale

    @property
    def has_overflow_serial(self) -> bool:
        """Whether the last ``grad_norm`` (or step) saw a non-finite gradient."""
        opt = self._opt()
        info = opt.step_info()
        return bool(info.grads_nonfinite > 0 or (not opt._norm_pending and info.overflow))


class _FusedOptimizer(Accumulation, ModelSync, TP.DeferredGrads, torch.optim.Optimizer):
    """Shared machinery of :class:`Lomo` and :class:`AdaLomo` (not used directly)."""

    _ALGORITHM = "lomo"

    def __init__(self, model: torch.nn.Module, lr: float, native_config: dict,
                 clip_grad_norm: Optional[float], clip_grad_value: Optional[float],
                 weight_decay: float, groups: Optional[list], no_decay, two_pass: Optional[bool],
                 process_group=None, accumulation=(1, "f32", "sum")):
        if not isinstance(model, torch.nn.Module):
            raise TypeError("the first argument is the model (a torch.nn.Module), as in lomo_optim")
        TD.check_model(model, process_group)
        self.process_group = process_group
        self._pg_size = TD.group_size(process_group)
        if clip_grad_norm is not None and clip_grad_norm <= 0:
            raise ValueError(f"clip_grad_norm should be positive, got {clip_grad_norm}.")
        self.model = model
        check_lr(lr)
        self.lr = lr
        self.clip_grad_norm = clip_grad_norm
        self.clip_grad_value = clip_grad_value
        self.weight_decay = weight_decay
        wd = float(weight_decay) if weight_decay and weight_decay > 0 else 0.0
        config = dict(native_config)
        config.update(
            weight_decay=wd,
            clip_grad_norm=float(clip_grad_norm or 0.0),
            clip_grad_value=float(clip_grad_value) if clip_grad_value and clip_grad_value > 0 else 0.0,
        )
        named = self._trainable(model)
        self._group_of, group_settings = self._assign_groups(model, named, groups, no_decay, wd)

        self._native = _NativeOptimizer(self._ALGORITHM, **config)
        for gid, (lr_scale, gwd) in enumerate(group_settings):
            if gid > 0 or gwd != wd or lr_scale != 1.0:
                self._native.group_set(gid, lr_scale, gwd)

        torch_groups = [
            {"params": [], "lomo_group": gid, "lr": lr, "lr_scale": s, "weight_decay": gwd}
            for gid, (s, gwd) in enumerate(group_settings)
        ]
        for name, p in named:
            torch_groups[self._group_of[name]]["params"].append(p)
        defaults = dict(lr=lr, clip_grad_norm=clip_grad_norm, clip_grad_value=clip_grad_value)
        if not named:
            raise ValueError("no parameter of the model requires a gradient")
        super().__init__(torch_groups, defaults)

        self._phase: Optional[int] = None
        self._norm_pending = False
        self._stray: Optional[str] = None
        self._entries: dict = {}  # name -> TP.Entry, in registration order
        self._removed = False
        self._grad_scale = 1.0  # the factor .grad carries (scale_loss), for step()
        self._cuda_devices = set()
        self._has_fp16 = False
        # Reentrant checkpointing: the outer backward's graph task, the parameters whose
        # gradients wait for its end, the ones submitted in this phase, and the parameters seen
        # receiving a gradient inside a checkpoint's recomputation (deferred from then on).
        self._outer_task = -1
        self._pending: dict = {}
        self._submitted: set = set()
        self._deferred_names: set = set()
        self._conflicts: list = []  # names of the backward's conflicts (TP.conflict_error)
        self._group_sent: dict = {}
        self._dist = TF.Distribution(process_group)
        self._register([(n, p, self._group_of[n]) for n, p in named])
        self._start_sync()
        self.two_pass = self._has_fp16 if two_pass is None else bool(two_pass)
        self.set_accumulation(*accumulation)
        self.state = TS.StateView(self)  # torch's per-parameter view, read from the library
        self._built = True

    # ---------------------------------------------------------------------------- construction
    @staticmethod
    def _trainable(model):
        """(name, parameter) of every distinct parameter that requires a gradient; a tied
        parameter appears once, under its first name."""
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    @staticmethod
    def _assign_groups(model, named, groups, no_decay, wd):
        """Maps parameter names to native group ids; returns (map, [(lr_scale, wd) per id])."""
        by_id = {id(p): n for n, p in named}
        group_of = {n: 0 for n, _ in named}
        settings = [(1.0, wd)]
        for spec in groups or []:
            spec = dict(spec)
            members = spec.pop("params")
            s = float(spec.pop("lr_scale", 1.0))
            g_wd = spec.pop("weight_decay", wd)
            g_wd = float(g_wd) if g_wd and g_wd > 0 else 0.0
            if spec:
                raise TypeError(f"unknown parameter-group keys {sorted(spec)} "
                                "(accepted: params, lr_scale, weight_decay)")
            gid = len(settings)
            settings.append((s, g_wd))
            for m in [members] if isinstance(members, (torch.Tensor, str)) else members:
                name = m if isinstance(m, str) else by_id.get(id(m))
                if name not in group_of:
                    raise ValueError(f"group {gid}: {m if isinstance(m, str) else 'a parameter'} "
                                     "is not a trainable parameter of the model")
                group_of[name] = gid
        if no_decay:
            rule = is_no_decay if no_decay is True else no_decay
            modules = dict(model.named_modules())
            gid = len(settings)
            settings.append((1.0, 0.0))
            for name, p in named:
                owner = modules.get(name.rsplit(".", 1)[0] if "." in name else "", model)
                if group_of[name] == 0 and rule(name, p, owner):
                    group_of[name] = gid
        return group_of, settings

    @property
    def _param_names(self):
        return list(self._entries)

    @property
    def _handles(self):
        return [] if self._removed else [e.handle for e in self._entries.values()]

    # ------------------------------------------------------------------------------ the steps
    def fused_backward(self, loss: torch.Tensor, lr: Optional[float] = None, *,
                       accumulate: Optional[bool] = None) -> None:
        """Backward pass with each parameter updated (and its gradient dropped) as soon as its
        gradient is complete. ``lr`` is this step's learning rate for every group (times the
        group's ``lr_scale``); None uses each group's own ``param_groups[g]["lr"]``, so torch LR
        schedulers work, per group too. With ``clip_grad_norm`` set, ``grad_norm(loss)`` must
        have been called first in this step.

        Before the backward, parameters the model replaced (``load_state_dict(assign=True)``,
        ``.data =``, ``.to()``) are re-registered with their state, and a parameter that
        requires a gradient but is not trained by this optimizer raises.

        With ``accumulation_steps=k`` the first k - 1 calls of a step only accumulate the
        gradients in the library and the k-th applies them (``lomo_native._torch_accum``);
        ``accumulate=True``/``False`` overrides the count for this call (False: the step's
        last micro-batch, e.g. a short last step of an epoch)."""
        self._check_usable()
        _check_loss(loss)
        if self._accumulating(accumulate):
            self._accumulate_backward(loss)
            return
        self._micro = 0
        if not self._norm_pending:
            if self.clip_grad_norm is not None:
                raise ValueError(
                    "clip_grad_norm is set, so every step needs grad_norm(loss) before "
                    "fused_backward(loss, lr) (lomo_native requires this for Lomo and AdaLomo)")
            self._sync_model()
            if self.two_pass:
                self._norm_backward(loss)
        base = self._sync_groups(lr)
        stream = self._stream()
        self._native.begin(N.PHASE_UPDATE, base, stream)
        self._norm_pending = False
        self._backward(loss, N.PHASE_UPDATE, retain_graph=False)
        self._native.end(stream)
        self.lr = self.param_groups[0]["lr"] if lr is None else lr
        self._opt_called = True  # torch's LR schedulers check that the optimizer stepped

    def grad_norm(self, loss: torch.Tensor, *, accumulate: Optional[bool] = None) -> None:
        """First backward of a step: computes the global gradient norm (for ``clip_grad_norm``)
        and checks for overflow, without updating anything. The graph is retained for
        ``fused_backward``. The norm is in ``step_info().grad_norm``. With accumulation, a
        no-op on the micro-batches that only accumulate (``accumulate`` as for
        ``fused_backward``); on the last one the norm is that of the accumulated gradients."""
        self._check_usable()
        _check_loss(loss)
        if self._accumulating(accumulate):
            return
        if self._norm_pending:
            self._finish_pending()
        self._sync_model()
        self._norm_backward(loss)

    def _norm_backward(self, loss):
        if self._norm_pending:
            self._finish_pending()
        stream = self._stream()
        self._native.begin(N.PHASE_NORM, 0.0, stream)
        self._backward(loss, N.PHASE_NORM, retain_graph=True)
        self._native.end(stream)
        self._norm_pending = True

    def _finish_pending(self):
        """A NORM phase was not followed by fused_backward (lomo-optim loops skip the update
        after an overflow): record an overflowing step as skipped, abandon a clean one."""
        if self._native.step_info().grads_nonfinite > 0:
            stream = self._stream()
            self._native.begin(N.PHASE_UPDATE, 0.0, stream)
            self._native.end(stream)
        else:
            self._native.cancel()
        self._norm_pending = False

    def _backward(self, loss, phase, retain_graph):
        scale = self._native.loss_scale
        if scale != 1.0:
            # lomo-optim scales in the loss dtype; an fp16 loss is scaled in f32 instead so
            # that the scaled loss itself cannot saturate (the gradients are checked anyway).
            loss = (loss.float() if loss.dtype == torch.float16 else loss) * scale
        self._phase = phase
        self._pending, self._submitted, self._outer_task = {}, set(), -1
        self._conflicts = []
        root = loss.grad_fn.register_prehook(self._enter_backward) if loss.grad_fn else None
        try:
            loss.backward(retain_graph=retain_graph)
            if self._conflicts:
                raise TP.conflict_error(phase, self._conflicts)
            self._flush_pending()
        except BaseException as exc:
            self._phase = None
            self._norm_pending = False
            self._native.cancel()
            # Gradients of the abandoned backward not handed over (deferred partial sums, or a
            # parameter whose hook never ran: another hook failed before it) are dropped: a
            # fused step leaves no .grad, and the next backward would add to them.
            for e in self._entries.values():
                p = e.param()
                if p is not None and p.grad is not None:
                    p.grad = None
            if retain_graph and isinstance(exc, RuntimeError) and "donated buffer" in str(exc):
                raise RuntimeError(_DONATED_BUFFERS) from exc
            raise
        finally:
            if root is not None:
                root.remove()
            self._pending = {}
        self._phase = None

    def _stream(self):
        if not self._cuda_devices:
            return None
        return torch.cuda.current_stream(min(self._cuda_devices)).cuda_stream

    def _check_usable(self):
        self._check_not_removed()
        if self._stray is not None:
            # a plain backward ran; what matters is whether its gradients are still there
            # (model.zero_grad(), as the HF Trainer calls, clears them without telling us)
            left = [e.name for e in self._entries.values()
                    if e.param() is not None and e.param().grad is not None]
            if not left:
                self._stray = None
                return
            name = left[0]
            raise RuntimeError(
                f"'{name}' received a gradient from a backward() outside fused_backward/grad_norm; "
                "it is left in .grad and would be applied on top of the next step's gradient. "
                "Call zero_grad(set_to_none=True) first (or use fused_backward for every backward)")

    def step(self, closure=None):
        """The non-fused path (trainers that call ``loss.backward()`` then ``step()``): applies
        ``.grad`` with the fused path's numerics at each group's own ``lr``, leaving it there
        until ``zero_grad()`` (backwards accumulate); no gradient: no-op. The gradients are the
        plain loss's or ``scale_loss(loss)``'s. Memory and details: ``lomo_native._torch_step``."""
        self._check_not_removed()
        if self._micro:
            raise RuntimeError("step() in the middle of an accumulated fused step (finish it "
                               "with fused_backward, or zero_grad())")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_model()  # replaced parameters re-registered before anything changes
        if _torch_step.apply_grads(self, self._sync_groups(None)):
            self.lr = self.param_groups[0]["lr"]
            self._opt_called = True
        self._grad_scale = 1.0
        return loss

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` multiplied by the current loss scale, for a plain ``backward()`` followed by
        ``step()`` (as ``GradScaler.scale``): fp16 gradients then keep the range the scaler
        protects, and ``step()`` submits them unchanged. The scale is constant within a step, so
        every micro-batch of an accumulated step is scaled alike."""
        self._grad_scale = self._native.loss_scale
        if self._grad_scale == 1.0:
            return loss
        return (loss.float() if loss.dtype == torch.float16 else loss) * self._grad_scale

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch's: sets (or zeroes) every ``.grad`` of the optimizer's parameters. With
        accumulation, it also discards the micro-batches of a step not yet applied (their
        gradients live in the library's buffers instead of ``.grad``), as torch's discards
        gradients accumulated in ``.grad``; the next ``fused_backward`` starts a new step."""
        super().zero_grad(set_to_none=set_to_none)
        if self._micro and self._phase is None:
            self._native.cancel()  # empties the accumulation buffers (and a pending norm pass)
            self._micro = 0
            self._norm_pending = False
        self._stray = None
        self._grad_scale = 1.0

    def _check_not_removed(self):
        if not self._handles:
            raise RuntimeError("this optimizer was removed (remove() or the end of its with block)")

    # ---------------------------------------------------------------------------- diagnostics
    def step_info(self) -> StepInfo:
        """Diagnostics of the last step: grad norm, clip coefficient, loss scale, skipped..."""
        return self._native.step_info()

    @property
    def loss_scale(self) -> float:
        """The factor the next backward multiplies the loss by (1 when scaling is off)."""
        return self._native.loss_scale

    def memory_stats(self) -> dict:
        """The library's memory accounting (state, workspace, parameters, and what AdamW would
        need), see :meth:`lomo_native.Optimizer.memory_stats`."""
        return self._native.memory_stats()

    @property
    def native(self) -> _NativeOptimizer:
        """The underlying :class:`lomo_native.Optimizer`."""
        return self._native

    # ---------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """The complete optimizer state in torch's layout: ``"state"`` per parameter index
        (``step``; AdaLomo's ``exp_avg_sq_row``/``exp_avg_sq_col``, or ``exp_avg_sq`` for rank
        ≤ 1; DTensors for FSDP2 shards) and ``"param_groups"`` (lr, lr_scale, weight_decay and
        the step's counters), plus ``format``, ``algorithm``, ``param_names``, ``lr`` and
        ``settings``; see ``lomo_native._torch_state``. ``torch.save`` it, or save it with
        ``torch.distributed.checkpoint`` (``get_optimizer_state_dict`` calls this);
        ``load_state_dict`` on an optimizer built the same way resumes bit for bit."""
        self._check_between_steps("state_dict")
        return TS.state_dict(self)

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores a ``state_dict()`` of an optimizer over the same parameters (also as
        ``set_optimizer_state_dict`` hands it over, keyed by name; and the
        ``lomo_native.torch/1`` format with the library's blob). Checked whole first: a
        mismatch raises with the optimizer unchanged."""
        self._check_between_steps("load_state_dict")
        if state_dict.get("format") != _STATE_FORMAT:
            return TS.load_state_dict(self, state_dict)
        if state_dict["algorithm"] != self._ALGORITHM:
            raise ValueError(f"state of {state_dict['algorithm']} loaded into {self._ALGORITHM}")
        if list(state_dict["param_names"]) != self._param_names:
            raise ValueError("the state dict was saved for different parameters")
        if len(state_dict["groups"]) != len(self.param_groups):
            raise ValueError("the state dict has a different number of parameter groups")
        orders = state_dict.get("state_orders")
        if orders is not None and self._ALGORITHM == "adalomo":
            for e in self._entries.values():
                if orders.get(e.name) != TP.state_order(e.perm):
                    raise ValueError(
                        f"'{e.name}': the state dict keeps its AdaLomo state in another memory "
                        "order than this optimizer (a permuted CUDA parameter on one side): "
                        "give the parameter the same layout on both sides")
        blob = state_dict["native"]
        if isinstance(blob, torch.Tensor):
            blob = blob.cpu().contiguous().numpy().tobytes()
        if self._ALGORITHM == "lomo":  # no per-element state: a layout saved otherwise loads
            blob = TS.with_param_shapes(blob, {e.name: self._native_shape(e)
                                               for e in self._entries.values()})
        self._native.load_state_bytes(blob)
        for gid, (g, saved) in enumerate(zip(self.param_groups, state_dict["groups"])):
            g.update(lr_scale=saved["lr_scale"], weight_decay=saved["weight_decay"], lr=saved["lr"])
        self._group_sent = {}  # the next step sends every group's lr and decay
        self.lr = state_dict["lr"]

    def _check_between_steps(self, what: str) -> None:
        self._check_not_removed()  # gradients left in .grad do not matter here
        if self._phase is not None or self._norm_pending:
            raise RuntimeError(f"{what}() must be called between steps")
        if self._micro:
            raise RuntimeError(
                f"{what}() must be called between steps: {self._micro} accumulated "
                "micro-batch(es) of this step are pending (the buffers are not part of the "
                "state); finish the step with fused_backward(loss) (accumulate=False for a "
                "short step), or discard them with zero_grad()")
        if not self._native.supports_state():
            raise RuntimeError(
                f"the loaded liblomo ({N.library_path()}) has no lomo_state_serialize/"
                f"lomo_state_deserialize; {what} needs a newer library")

    @staticmethod
    def _native_shape(e) -> tuple:
        """The shape ``e`` is registered with (memory order for a permuted LOMO parameter)."""
        if e.perm is None or e.perm is TP.STRIDES:
            return e.shape
        return tuple(e.shape[d] for d in e.perm)

    def _settings(self) -> dict:
        return {"clip_grad_norm": self.clip_grad_norm, "clip_grad_value": self.clip_grad_value,
                "weight_decay": self.weight_decay, "two_pass": self.two_pass,
                "config": dict(self._native.config)}

    # ------------------------------------------------------------------------------- removal
    def remove(self) -> None:
        """Removes every hook and frees the native optimizer; the model trains normally again.
        Idempotent. Also done at the end of ``with opt:`` and when the optimizer is collected."""
        for e in getattr(self, "_entries", {}).values():
            if e.handle is not None:
                e.handle.remove()
                e.handle = None
        self._removed = True
        if getattr(self, "_native", None) is not None:
            self._native.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __del__(self):
        try:
            self.remove()
        except Exception:
            pass
