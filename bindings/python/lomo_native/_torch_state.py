"""The optimizer state of :class:`lomo_native.torch.Lomo` / ``AdaLomo`` in torch's usual layout,
so that ``state_dict()`` / ``load_state_dict()`` and ``torch.distributed.checkpoint``
(``get_optimizer_state_dict`` / ``set_optimizer_state_dict``, ``get_state_dict`` /
``set_state_dict``, ``dcp.save`` / ``dcp.load``) work per rank, on plain and FSDP2 models.

Layout (``"state"`` keyed by the parameter's index in ``param_groups`` order, as torch does; DCP
re-keys it by name). For every trainable parameter::

    "step":            int64 0-d tensor, the applied update steps (AdaLomo's t)
    AdaLomo, rank >= 2 (factored over the [prod(shape[:-1]), shape[-1]] view):
    "exp_avg_sq_row":  float32, shape[:-1]   (the row statistics, Adafactor's names)
    "exp_avg_sq_col":  float32, shape[-1:]
    AdaLomo, rank <= 1:
    "exp_avg_sq":      float32, the parameter's shape

For an FSDP2 parameter the row (or rank <= 1) statistics are DTensors with the parameter's mesh
and placements and the global shape, so DCP saves each rank's rows once and can reshard them; the
column statistics are the same on every rank (plain tensors, saved once). Each entry of
``"param_groups"`` holds, besides ``params``, ``lr``, ``lr_scale``, ``weight_decay`` and
``lomo_group``, the step's counters (``lomo_skipped_total``, ``lomo_loss_scale`` and the dynamic
scaler's ``lomo_scaler_cur_hysteresis``, ``lomo_scaler_cur_iter``,
``lomo_scaler_last_overflow_iter``), identical on every rank, and ``lomo_algorithm``.

The library's state travels as a safetensors blob (docs/CHECKPOINTS.md): ``state_dict`` reads
it, ``load_state_dict`` writes the loaded values into the loading optimizer's own blob (its
configuration entries stay), recomputes the documented checksum and hands it to
``lomo_state_deserialize``, which checks everything before it changes anything. The values pass
through unchanged, so a fresh optimizer loaded from a state dict continues bit for bit."""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping

import numpy as np
import torch

from . import _torch_fsdp as TF
from . import _torch_params as TP

FORMAT = "lomo_native.torch/2"
_COUNTERS = {  # param-group key: library metadata key
    "lomo_skipped_total": "skipped_total",
    "lomo_loss_scale": "scaler.scale",
    "lomo_scaler_cur_hysteresis": "scaler.cur_hysteresis",
    "lomo_scaler_cur_iter": "scaler.cur_iter",
    "lomo_scaler_last_overflow_iter": "scaler.last_overflow_iter",
}


# ------------------------------------------------------------------------------ the blob
def _parse(blob: bytes):
    """(metadata dict, {name: (begin, end)} byte ranges in the data section, data bytes)."""
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    meta = header.pop("__metadata__", {})
    ranges = {k: tuple(v["data_offsets"]) for k, v in header.items()}
    return meta, ranges, bytearray(blob[8 + n:])


def _encode(meta: dict, ranges: dict, data: bytes) -> bytes:
    """A safetensors blob with lomo's checksum (docs/CHECKPOINTS.md): CRC-32 of every other
    metadata entry in key order as length-prefixed key and value, then each tensor in file order
    as length-prefixed name and dtype, rank, dims and offsets (u64 little-endian), then the
    data."""
    meta = {k: v for k, v in meta.items() if k != "checksum"}
    order = sorted(ranges, key=lambda k: (ranges[k], k))  # ties (empty tensors) by name

    def entry(crc, key, value):
        for s in (key.encode(), value.encode()):
            crc = zlib.crc32(struct.pack("<Q", len(s)), crc)
            crc = zlib.crc32(s, crc)
        return crc

    crc = 0
    for k in sorted(meta):
        crc = entry(crc, k, meta[k])
    for name in order:
        a, b = ranges[name]
        crc = entry(crc, name, "F32")
        crc = zlib.crc32(struct.pack("<QQQQ", 1, (b - a) // 4, a, b), crc)
    crc = zlib.crc32(bytes(data), crc)
    meta["checksum"] = f"{crc:08x}"
    header = {"__metadata__": meta}
    for name in order:
        a, b = ranges[name]
        header[name] = {"dtype": "F32", "shape": [(b - a) // 4], "data_offsets": [a, b]}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + bytes(data)


def with_param_shapes(blob: bytes, shapes: dict) -> bytes:
    """A LOMO state blob whose recorded parameter shapes are ``shapes`` (name -> registered
    shape): LOMO keeps no per-element state, so a parameter registered anew in another memory
    order (a model moved to channels_last after the optimizer was built, whose memory-order
    shape is then permuted) keeps its state; the checksum is recomputed."""
    meta, ranges, data = _parse(blob)
    params = [[name, list(shapes.get(name, shape))] for name, shape in json.loads(meta["params"])]
    meta["params"] = json.dumps(params, separators=(",", ":"))
    return _encode(meta, ranges, data)


def _values(data, ranges, name) -> np.ndarray:
    a, b = ranges[name]
    return np.frombuffer(bytes(data[a:b]), dtype="<f4").astype(np.float32)


# ---------------------------------------------------------------------------- the layout
def _ordered(opt):
    """(parameter, Entry) in ``param_groups`` order (torch's state indices)."""
    by_id = {id(e.param()): e for e in opt._entries.values() if e.param() is not None}
    return [(p, by_id[id(p)]) for g in opt.param_groups for p in g["params"]]


def _wrap(t: torch.Tensor, p, shape) -> torch.Tensor:
    """``t`` (this rank's rows) as a DTensor laid out like the FSDP2 parameter ``p``."""
    from torch.distributed.tensor import DTensor

    stride = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
    return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False,
                              shape=torch.Size(shape), stride=stride)


def _param_state(opt, p, e, steps, data, ranges) -> dict:
    st = {"step": torch.tensor(steps, dtype=torch.int64)}
    if opt._ALGORITHM != "adalomo":
        return st
    dist = TF.is_dtensor(p)
    order = TP.state_order(e.perm)
    if order is not None:  # statistics kept in memory order (a permuted CUDA parameter)
        st["lomo_state_order"] = torch.tensor(order, dtype=torch.int64)
    if e.name + ".row" in ranges:
        row = torch.from_numpy(_values(data, ranges, e.name + ".row"))
        if row.numel() == 0:
            # A parameter without elements has no statistics; a [R, 0] one still reports its
            # rows (zeros: nothing was ever averaged into them) in the documented shape.
            row = torch.zeros(e.shape[:-1], dtype=torch.float32)
        row = row.reshape(e.shape[:-1])
        st["exp_avg_sq_row"] = _wrap(row, p, tuple(p.shape[:-1])) if dist else row
        st["exp_avg_sq_col"] = torch.from_numpy(_values(data, ranges, e.name + ".col"))
    else:
        v = torch.from_numpy(_values(data, ranges, e.name + ".v")).reshape(e.shape)
        st["exp_avg_sq"] = _wrap(v, p, tuple(p.shape)) if dist else v
    return st


def state_dict(opt) -> dict:
    """``opt``'s complete state in torch's layout (see the module docstring)."""
    meta, ranges, data = _parse(opt._native.state_bytes())
    steps = int(meta["steps"])
    ordered = _ordered(opt)
    index = {id(p): i for i, (p, _) in enumerate(ordered)}
    state = {i: _param_state(opt, p, e, steps, data, ranges) for i, (p, e) in enumerate(ordered)}
    counters = {k: _number(meta[v]) for k, v in _COUNTERS.items()}
    groups = []
    for g in opt.param_groups:
        groups.append({"params": [index[id(p)] for p in g["params"]], "lr": g["lr"],
                       "lr_scale": g["lr_scale"], "weight_decay": g["weight_decay"],
                       "lomo_group": g["lomo_group"], "lomo_algorithm": opt._ALGORITHM,
                       **counters})
    return {"state": state, "param_groups": groups, "format": FORMAT,
            "algorithm": opt._ALGORITHM, "param_names": [e.name for _, e in ordered],
            "lr": opt.lr, "settings": opt._settings()}


def _number(s: str):
    return float(s) if any(c in s for c in ".eEn") else int(s)


def _local_values(t, name, key, want: int) -> bytes:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"'{name}': state '{key}' is not a tensor")
    t = TF.local(t).detach().to("cpu", torch.float32).contiguous().reshape(-1)
    if t.numel() != want:
        raise ValueError(f"'{name}': state '{key}' has {t.numel()} elements on this rank, the "
                         f"parameter's statistics {want}")
    return t.numpy().astype("<f4").tobytes()


def load_state_dict(opt, sd: dict) -> None:
    """Loads a state dict in the layout of :func:`state_dict` (keyed by index or, from DCP,
    by name); everything is checked before the optimizer changes."""
    if sd.get("format", FORMAT) != FORMAT:
        raise ValueError(f"not a {FORMAT} state dict (format {sd.get('format')!r})")
    if "state" not in sd or "param_groups" not in sd:
        raise ValueError("a state dict needs 'state' and 'param_groups'")
    groups = sd["param_groups"]
    algos = {g.get("lomo_algorithm", sd.get("algorithm")) for g in groups} - {None}
    if algos and algos != {opt._ALGORITHM}:
        raise ValueError(f"state of {sorted(algos)} loaded into {opt._ALGORITHM}")
    if len(groups) != len(opt.param_groups):
        raise ValueError(f"the state dict has {len(groups)} parameter groups, the optimizer "
                         f"{len(opt.param_groups)}")
    by_id = {id(e.param()): e for e in opt._entries.values() if e.param() is not None}
    meta, ranges, data = _parse(opt._native.state_bytes())
    steps = set()
    for gi, (mine, saved) in enumerate(zip(opt.param_groups, groups)):
        if len(mine["params"]) != len(saved["params"]):
            raise ValueError(f"param_groups[{gi}] has {len(saved['params'])} parameters in the "
                             f"state dict, {len(mine['params'])} in the optimizer")
        for p, key in zip(mine["params"], saved["params"]):
            e = by_id[id(p)]
            st = sd["state"].get(key)
            if st is None:
                raise ValueError(f"the state dict has no state for '{e.name}' ({key!r})")
            if "step" not in st:
                raise ValueError(f"'{e.name}': the state has no 'step'")
            steps.add(int(st["step"]))
            saved_order = st.get("lomo_state_order")
            if saved_order is not None:
                saved_order = tuple(int(v) for v in saved_order)
            if opt._ALGORITHM == "adalomo" and saved_order != TP.state_order(e.perm):
                raise ValueError(
                    f"'{e.name}': the state dict keeps its AdaLomo state in another memory order "
                    "than this optimizer (a permuted CUDA parameter on one side): give the "
                    "parameter the same layout on both sides")
            parts = {".row": "exp_avg_sq_row", ".col": "exp_avg_sq_col", ".v": "exp_avg_sq"}
            for suffix, k in parts.items():
                if e.name + suffix not in ranges:
                    continue
                if k not in st:
                    raise ValueError(f"'{e.name}': the state has no '{k}'")
                a, b = ranges[e.name + suffix]
                if a == b and TF.local(p).numel() == 0:
                    continue  # no elements, no statistics: nothing to load (see _param_state)
                data[a:b] = _local_values(st[k], e.name, k, (b - a) // 4)
    if len(steps) > 1:
        raise ValueError(f"the parameters' step counters differ: {sorted(steps)}")
    meta["steps"] = str(steps.pop() if steps else int(meta["steps"]))
    for k, v in _COUNTERS.items():
        values = {g[k] for g in groups if k in g}
        if len(values) > 1:
            raise ValueError(f"param_groups disagree on {k}: {sorted(values)}")
        if values:
            meta[v] = repr(values.pop())
    opt._native.load_state_bytes(_encode(meta, ranges, data))
    for g, saved in zip(opt.param_groups, groups):
        for k in ("lr", "lr_scale", "weight_decay"):
            if k in saved:
                g[k] = saved[k]
    opt._group_sent = {}  # the next step sends every group's lr and decay
    opt.lr = sd.get("lr", opt.param_groups[0]["lr"])


class StateView(Mapping):
    """``opt.state``: parameter -> its state in the layout above, read from the library on
    access (torch's optimizers keep this dict; DCP tests it to know the state exists)."""

    def __init__(self, opt):
        import weakref

        self._opt = weakref.ref(opt)

    def _params(self):
        opt = self._opt()
        return [] if opt is None or not opt._handles else [p for p, _ in _ordered(opt)]

    def __len__(self):
        return len(self._params())

    def __iter__(self):
        return iter(self._params())

    def __getitem__(self, p):
        opt = self._opt()
        for i, (q, _) in enumerate(_ordered(opt) if opt is not None else []):
            if q is p:
                return state_dict(opt)["state"][i]
        raise KeyError("not a parameter of this optimizer")
