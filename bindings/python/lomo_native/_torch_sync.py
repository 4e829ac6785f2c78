"""Keeping the PyTorch binding's registrations in step with the model and the parameter groups:
parameters the model replaced are re-registered with their optimizer state, parameters added
with ``add_param_group`` are registered, and each group's current ``lr`` and ``weight_decay``
reach the library before every step. A mixin of :class:`lomo_native._torch_fused._FusedOptimizer`."""

from __future__ import annotations

import weakref
from typing import Optional

import numpy as np
import torch

from . import _native as N
from . import _torch_fsdp as TF
from . import _torch_params as TP
from . import _torch_state as TS
from .core import Optimizer as _NativeOptimizer


_F32_MAX = float(np.finfo(np.float32).max)


def check_lr(lr, where: str = "") -> float:
    """``lr`` as a float; ValueError unless it is finite, >= 0 and within float32's range (the
    library takes the lr as a float32: 1e39 would become infinity)."""
    value = float(lr.item() if isinstance(lr, torch.Tensor) else lr)
    if not (np.isfinite(value) and 0 <= value <= _F32_MAX):
        raise ValueError(f"{where}lr must be finite, >= 0 and at most {_F32_MAX:.4g} (float32), "
                         f"got {value}")
    return value


class _Registrations:
    """Counts parameter (re)registrations on any module of the process (a torch global hook,
    installed once): ``load_state_dict(assign=True)``, ``module.weight = Parameter(...)`` and
    ``register_parameter`` all pass through it, so the model is scanned only after one."""

    count = 0
    installed = False

    @classmethod
    def install(cls) -> None:
        if cls.installed:
            return
        hook = getattr(torch.nn.modules.module, "register_module_parameter_registration_hook",
                       None)
        if hook is not None:
            hook(cls._bump)
        cls.installed = True

    @classmethod
    def _bump(cls, module, name, param):
        cls.count += 1


class ModelSync:
    """Methods of the fused optimizers that follow the model and the groups."""

    # ------------------------------------------------------------------------- registration
    def _check_param(self, name, p):
        """(device ordinal, perm, registered shape) of a parameter, or an error before anything
        is registered."""
        if p.dtype not in TP._DTYPES:
            raise TypeError(f"{name}: dtype {p.dtype} is not supported (float32, float16, bfloat16)")
        if p.layout != torch.strided:
            raise ValueError(f"{name}: the parameter must be a dense (strided) tensor")
        try:
            perm, shape = TP.registered_layout(name, TF.local(p), self._ALGORITHM)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        if p.device.type == "cpu":
            device = N.DEVICE_CPU
        elif p.device.type == "cuda":
            device = p.device.index if p.device.index is not None else torch.cuda.current_device()
        else:
            raise ValueError(f"{name}: device {p.device} is not supported (cpu, cuda)")
        return device, perm, shape

    def _register(self, items):
        """Registers ``(name, parameter, native group)`` items, all checked first; FSDP2
        (DTensor) parameters as row pieces of their global tensors (``_torch_fsdp``)."""
        checked = [(name, p, gid, self._check_param(name, p)) for name, p, gid in items]
        pieces = self._dist.plan([(name, p) for name, p, _ in items])
        ref = weakref.ref(self)
        added = []
        for name, p, gid, (device, perm, shape) in checked:
            if device != N.DEVICE_CPU:
                self._cuda_devices.add(device)
            self._has_fp16 |= p.dtype == torch.float16
            pid = self._native.register_pointer(name, TF.local(p).data_ptr(),
                                                TP._DTYPES[p.dtype], shape, device, gid)
            if perm is TP.STRIDES:
                self._native.set_strides(pid, p.stride())
            e = TP.Entry(pid, name, p, perm)
            e.handle = p.register_post_accumulate_grad_hook(TP.make_hook(ref, e))
            self._entries[name] = e
            added.append((name, e))
        self._dist.add(self._native, added, pieces)

    # ------------------------------------------------------------------ the model's parameters
    def _start_sync(self) -> None:
        """At construction: the model as it is now is the one registered."""
        _Registrations.install()
        self._seen_registrations = _Registrations.count
        self._frozen = self._frozen_params()

    def _frozen_params(self) -> list:
        """(name, weak reference) of the model's parameters that do not require a gradient now
        (frozen): the only ones a plain ``requires_grad_(True)`` can turn into untrained ones."""
        return [(n, weakref.ref(p)) for n, p in self.model.named_parameters()
                if not p.requires_grad]

    def _check_frozen(self) -> None:
        """Raises, before anything changes, when a parameter frozen at construction (or at the
        last scan) now requires a gradient but was not added with ``add_param_group``: it would
        silently never train (no hook) while its ``.grad`` grows. O(frozen parameters)."""
        for name, ref in self._frozen:
            p = ref()
            if p is not None and p.requires_grad:
                raise ValueError(
                    f"'{name}' requires a gradient but is not trained by this optimizer (it was "
                    "frozen when the optimizer was built): pass it to "
                    f"add_param_group({{'params': [...]}}) or set requires_grad_(False)")

    def _sync_model(self) -> None:
        """Before a step (nothing has changed yet): registrations whose parameter memory moved
        (``.data =``, ``.to()``) or whose parameter object the model replaced
        (``load_state_dict(assign=True)``) are moved to the new tensors, keeping the optimizer
        state; after a replacement, a parameter of the model that requires a gradient but is not
        trained by this optimizer raises. The registrations are checked every step (O(1) per
        parameter); the model is scanned only after a parameter was (re)registered on a module."""
        self._check_frozen()
        moved = {}
        for e in self._entries.values():
            p = e.param()
            if p is not None and not e.holds(p):
                moved[e.name] = (e, p)
        if _Registrations.count != self._seen_registrations or not _Registrations.installed:
            self._scan_model(moved)
            self._seen_registrations = _Registrations.count
            self._frozen = self._frozen_params()
        if moved:
            self._rehome(list(moved.values()))

    def _scan_model(self, moved: dict) -> None:
        by_id = {id(e.param()): e for e in self._entries.values() if e.param() is not None}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            e = self._entries.get(name)
            if e is not None and e.holds(p):
                continue
            if e is None and id(p) in by_id and by_id[id(p)].holds(p):
                continue  # registered under another name (tied, or added by add_param_group)
            if e is None:
                raise ValueError(
                    f"'{name}' requires a gradient but is not trained by this optimizer (it was "
                    "frozen when the optimizer was built, or added to the model later): pass it "
                    f"to add_param_group({{'params': [...]}}) or set requires_grad_(False)")
            moved[name] = (e, p)

    def _rehome(self, moved) -> None:
        """Registers the parameters anew (same names, ids and groups; new addresses) in a fresh
        native optimizer, restores the state into it, and moves the hooks. Checked whole before
        anything changes."""
        for e, p in moved:
            if (tuple(p.shape), p.dtype, p.device) != (e.shape, e.dtype, e.device):
                raise ValueError(
                    f"'{e.name}' was replaced by a tensor of shape {tuple(p.shape)}, {p.dtype} on "
                    f"{p.device}; it was registered as {e.shape}, {e.dtype} on {e.device}: "
                    "build a new optimizer for a model of other shapes")
            if p.grad is not None:
                raise RuntimeError(
                    f"'{e.name}' was replaced and its new tensor holds a .grad from a backward() "
                    "outside fused_backward/grad_norm; call zero_grad(set_to_none=True) first")
        new_of = {id(e): p for e, p in moved}
        layouts = {}
        for e in self._entries.values():
            p = new_of.get(id(e), e.param())
            if p is None:
                raise RuntimeError(f"'{e.name}' no longer exists and was not replaced")
            layouts[e.name] = (p, self._check_param(e.name, p))
            order = TP.state_order(layouts[e.name][1][1])
            if self._ALGORITHM == "adalomo" and order != TP.state_order(e.perm):
                raise ValueError(
                    f"'{e.name}' changed its memory layout (strides {p.stride()}) on a device "
                    "where the library keeps its AdaLomo state in memory order: the state "
                    "cannot follow; restore the layout, or build a new optimizer")
        state = self._native.state_bytes() if self._native.supports_state() else None
        if state is not None and self._ALGORITHM == "lomo":
            # LOMO registers a permuted parameter in memory order: a new layout is a new shape
            state = TS.with_param_shapes(state, {n: lay[1][2] for n, lay in layouts.items()})
        cfg = {k: v for k, v in self._native.config.items() if k not in ("struct_size",
                                                                         "algorithm")}
        native = _NativeOptimizer(self._ALGORITHM, **cfg)
        try:
            for gid in range(1, len(self.param_groups)):
                native.group_set(gid, *self._native.group_get(gid))
            native.group_set(0, *self._native.group_get(0))
            for e in self._entries.values():
                p, (device, perm, shape) = layouts[e.name]
                gid = self._group_of.get(e.name, 0)
                pid = native.register_pointer(e.name, TF.local(p).data_ptr(),
                                              TP._DTYPES[p.dtype], shape, device, gid)
                if perm is TP.STRIDES:
                    native.set_strides(pid, p.stride())
                assert pid == e.pid
            self._dist.apply(native, list(self._entries.items()))
            if state is not None:
                native.load_state_bytes(state)
        except BaseException:
            native.close()
            raise
        old, self._native = self._native, native
        old.close()
        self._group_sent = {}
        replaced = {}
        for e, p in moved:
            if e.param() is not None:
                replaced[id(e.param())] = p
            e.handle.remove()
            fresh = TP.Entry(e.pid, e.name, p, layouts[e.name][1][1])
            fresh.handle = p.register_post_accumulate_grad_hook(
                TP.make_hook(weakref.ref(self), fresh))
            self._entries[e.name] = fresh
        # torch.optim's groups hold the parameters: the replaced ones are released here.
        for g in self.param_groups:
            g["params"] = [replaced.get(id(q), q) for q in g["params"]]

    # ------------------------------------------------------------------------------- groups
    def _sync_groups(self, lr: Optional[float]) -> float:
        """Sends each group's current lr (``lr`` for every group when given, else the group's
        own ``"lr"``, as set by schedulers) times its ``lr_scale``, and its ``weight_decay``, as
        the library group's multiplier and decay; returns the base lr for ``lomo_step_begin``
        (1: the multipliers carry the whole lr). The lr is rounded to f32 first, as the C API
        rounds ``lr``, so a single group gives exactly what ``begin(lr)`` alone gave. Invalid
        values raise before anything changes."""
        settings = []
        for gid, g in enumerate(self.param_groups):
            base = check_lr(g["lr"] if lr is None else lr, f"param_groups[{gid}]: ")
            mult = float(np.float32(base)) * float(g.get("lr_scale", 1.0))
            wd = g.get("weight_decay", 0.0) or 0.0
            wd = float(wd) if wd > 0 else 0.0
            if not (np.isfinite(mult) and mult >= 0):
                raise ValueError(f"param_groups[{gid}]: lr {base} times lr_scale "
                                 f"{g.get('lr_scale', 1.0)} must be finite and >= 0 in float32")
            settings.append((gid, mult, wd))
        for gid, mult, wd in settings:
            if self._group_sent.get(gid) != (mult, wd):
                self._native.group_set(gid, mult, wd)
                self._group_sent[gid] = (mult, wd)
        return 1.0

    def add_param_group(self, param_group: dict) -> None:
        """Adds a group of parameters that the optimizer trains from the next step on (they get
        hooks and, for AdaLomo, state), with keys ``params``, and optionally ``lr`` (default:
        the constructor's), ``lr_scale`` (1) and ``weight_decay`` (the constructor's). Called
        between steps; every parameter is checked (requires a gradient, supported dtype, layout
        and device, not already trained) before any is registered."""
        if not getattr(self, "_built", False):
            return super().add_param_group(param_group)  # torch's constructor
        self._check_usable()
        if self._phase is not None or self._norm_pending:
            raise RuntimeError("add_param_group() must be called between steps")
        group = dict(param_group)
        params = group.pop("params")
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        unknown = set(group) - {"lr", "lr_scale", "weight_decay"}
        if unknown:
            raise TypeError(f"unknown parameter-group keys {sorted(unknown)} "
                            "(accepted: params, lr, lr_scale, weight_decay)")
        registered = {id(e.param()) for e in self._entries.values()}
        names = {id(p): n for n, p in self.model.named_parameters()}
        gid = len(self.param_groups)
        items = []
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"add_param_group: params[{i}] is not a tensor")
            if not p.requires_grad:
                raise ValueError(f"add_param_group: params[{i}] does not require a gradient "
                                 "(call requires_grad_(True) first)")
            if id(p) in registered or any(id(p) == id(q) for _, q, _ in items):
                raise ValueError(f"add_param_group: params[{i}] is already trained by this "
                                 "optimizer")
            name = names.get(id(p), f"param_groups.{gid}.{i}")
            if name in self._entries:
                raise ValueError(f"add_param_group: a parameter named {name!r} is registered")
            self._check_param(name, p)
            items.append((name, p, gid))
        lr = check_lr(group.get("lr", self.defaults["lr"]), "add_param_group: ")
        lr_scale = float(group.get("lr_scale", 1.0))
        wd = group.get("weight_decay", self.weight_decay) or 0.0
        wd = float(wd) if wd > 0 else 0.0
        self._native.group_set(gid, float(np.float32(lr)) * lr_scale, wd)
        self._register(items)
        added = {id(p) for _, p, _ in items}
        self._frozen = [(n, r) for n, r in self._frozen if id(r()) not in added]
        for name, _, _ in items:
            self._group_of[name] = gid
        super().add_param_group({"params": params, "lomo_group": gid, "lr": lr,
                                 "lr_scale": lr_scale, "weight_decay": wd})
