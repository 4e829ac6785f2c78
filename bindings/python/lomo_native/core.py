"""Framework-neutral Python API over the C library: an ``Optimizer`` object that owns a
``lomo_optimizer *``, with a raw-pointer level (used by the PyTorch and JAX layers) and a NumPy
level (register arrays, submit gradients) for Python users without a deep-learning framework.

NumPy example (LOMO, one step)::

    import numpy as np
    from lomo_native import Optimizer
    w = np.random.randn(4, 3).astype(np.float32)
    opt = Optimizer("lomo")
    wid = opt.register_array("w", w)            # w is updated in place from now on
    opt.step({wid: grad_of_w}, lr=0.1)          # begin(UPDATE) + submit + end
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Iterable, Mapping

from . import _native as N

__all__ = ["Optimizer", "StepInfo", "ALGORITHMS"]

ALGORITHMS = {"lomo": N.ALGORITHM_LOMO, "adalomo": N.ALGORITHM_ADALOMO}
_LOSS_SCALE_MODES = {
    "none": N.LOSS_SCALE_NONE,
    "static": N.LOSS_SCALE_STATIC,
    "dynamic": N.LOSS_SCALE_DYNAMIC,
}
_ROUNDING = {"nearest": N.ROUNDING_NEAREST, "stochastic": N.ROUNDING_STOCHASTIC}
_NONFINITE = {"per_tensor": N.NONFINITE_PER_TENSOR, "per_element": N.NONFINITE_PER_ELEMENT}


@dataclass(frozen=True)
class StepInfo:
    """Diagnostics of the last phase and step (``lomo_step_info``)."""

    step: int  #: applied update steps so far (AdaLomo's t)
    grad_norm: float  #: global norm of the unscaled gradients (NaN without a NORM phase)
    clip_coef: float  #: clip coefficient used (1 without clipping, 0 when skipped)
    loss_scale: float  #: loss scale of the last step
    next_loss_scale: float  #: loss scale for the next step
    overflow: bool  #: a non-finite gradient was seen in the last step
    skipped: bool  #: the last step was skipped entirely (overflow in its NORM phase)
    skipped_total: int  #: skipped steps so far
    grads_submitted: int  #: gradients submitted in the last phase
    grads_nonfinite: int  #: of those, non-finite ones (never applied)


def _numpy_dtype_code(dtype) -> int:
    name = str(dtype)
    codes = {"float32": N.DTYPE_F32, "float16": N.DTYPE_F16, "bfloat16": N.DTYPE_BF16}
    if name not in codes:
        raise TypeError(f"unsupported dtype {name}: lomo takes float32, float16 or bfloat16")
    return codes[name]


def _dense_strides(name: str, array) -> tuple:
    """Element strides of a dense non-overlapping NumPy array (every element at its own offset
    in ``0..size``); ValueError for any other layout."""
    item = array.itemsize
    if any(st % item or st < 0 for st in array.strides):
        raise ValueError(f"{name}: strides {array.strides} are not a dense non-overlapping layout")
    strides = tuple(st // item for st in array.strides)
    expected = 1
    for d in sorted((d for d in range(array.ndim) if array.shape[d] != 1),
                    key=lambda d: strides[d]):
        if strides[d] != expected:
            raise ValueError(f"{name}: the array (shape {array.shape}, strides "
                             f"{array.strides}) is neither C-contiguous nor dense and "
                             "non-overlapping; copy it first (np.ascontiguousarray)")
        expected *= array.shape[d]
    return strides


def _stream(stream) -> ctypes.c_void_p | None:
    return None if not stream else ctypes.c_void_p(int(stream))


class Optimizer:
    """One ``lomo_optimizer``. Not copyable; freed by ``close()`` or when collected.

    ``algorithm`` is ``"lomo"`` or ``"adalomo"``; keyword arguments set ``lomo_config`` fields
    (``weight_decay``, ``clip_grad_norm``, ``clip_grad_value``, ``loss_scale_mode`` as
    ``"none"|"static"|"dynamic"``, ``loss_scale``, ``scale_factor``, ``scale_window``,
    ``min_loss_scale``, ``hysteresis``, ``eps1``, ``eps2``, ``clip_threshold``, ``decay_rate``,
    ``rounding`` as ``"nearest"|"stochastic"``, ``seed``, ``nonfinite_policy`` as
    ``"per_tensor"|"per_element"`` — LOMO steps without a norm pass: a gradient with a
    non-finite element leaves its whole tensor untouched (default, two reads of the gradient)
    or, per element, only those elements (one pass); see ``lomo_config.nonfinite_policy``);
    the others keep the library defaults
    (lomo-optim's). Every failing call raises :class:`lomo_native.LomoError`.
    """

    def __init__(self, algorithm: str = "lomo", **config):
        self._lib = N.load()
        self._handle = None
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {sorted(ALGORITHMS)}, got {algorithm!r}")
        cfg = N.Config()
        self._lib.lomo_config_init(ctypes.byref(cfg), ALGORITHMS[algorithm])
        for key, value in config.items():
            if key == "loss_scale_mode" and isinstance(value, str):
                value = _LOSS_SCALE_MODES[value]
            if key == "rounding" and isinstance(value, str):
                value = _ROUNDING[value]
            if key == "nonfinite_policy" and isinstance(value, str):
                if value not in _NONFINITE:
                    raise ValueError(f"nonfinite_policy must be one of {sorted(_NONFINITE)}, "
                                     f"got {value!r}")
                value = _NONFINITE[value]
            if key in ("struct_size", "algorithm") or key not in dict(N.Config._fields_):
                raise TypeError(f"unknown config field {key!r}")
            setattr(cfg, key, value)
        handle = ctypes.c_void_p()
        self._lib.lomo_optimizer_new(ctypes.byref(cfg), ctypes.byref(handle))
        self._handle = handle
        self.algorithm = algorithm
        self.config = {name: getattr(cfg, name) for name, _ in N.Config._fields_}
        self._arrays: dict[int, object] = {}  # keeps registered NumPy buffers alive
        self._names: dict[str, int] = {}
        # id -> (name, shape, dtype code, device) of each registration, to check gradients
        self._regs: dict[int, tuple[str, tuple, int, int]] = {}
        self._checked = N.has_symbol("lomo_grad_submit_checked")
        self._strides: dict[int, tuple] = {}  # id -> element strides (set_strides)

    # ------------------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Frees the optimizer (idempotent). Parameter buffers are not touched."""
        if self._handle is not None:
            self._lib.lomo_optimizer_free(self._handle)
            self._handle = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def handle(self) -> ctypes.c_void_p:
        if self._handle is None:
            raise ValueError("the optimizer was closed")
        return self._handle

    # ---------------------------------------------------------------------- groups and params
    def group_set(self, group: int, lr_multiplier: float = 1.0, weight_decay: float = 0.0) -> None:
        """Creates or changes a parameter group (group 0 always exists)."""
        self._lib.lomo_group_set(self.handle, group, lr_multiplier, weight_decay)

    def group_get(self, group: int) -> tuple[float, float]:
        """(lr_multiplier, weight_decay) of a group."""
        m, wd = ctypes.c_double(), ctypes.c_double()
        self._lib.lomo_group_get(self.handle, group, ctypes.byref(m), ctypes.byref(wd))
        return m.value, wd.value

    def register_pointer(self, name: str, data: int, dtype: int, shape: Iterable[int],
                         device: int = N.DEVICE_CPU, group: int = 0, flags: int = 0) -> int:
        """Registers a raw buffer (``data`` is an address; host memory for ``device=-1``, else
        CUDA memory of that ordinal). The buffer must stay valid and in place while the optimizer
        lives. Returns the parameter id."""
        shape = [int(s) for s in shape]
        dims = (ctypes.c_int64 * max(len(shape), 1))(*shape)
        desc = N.ParamDesc(
            struct_size=ctypes.sizeof(N.ParamDesc),
            name=name.encode("utf-8"),
            data=ctypes.c_void_p(int(data) if data else None),
            dtype=dtype,
            ndim=len(shape),
            shape=ctypes.cast(dims, ctypes.POINTER(ctypes.c_int64)),
            device=device,
            group=group,
            flags=flags,
        )
        out = ctypes.c_uint32()
        self._lib.lomo_param_register(self.handle, ctypes.byref(desc), ctypes.byref(out))
        self._names[name] = out.value
        self._regs[out.value] = (name, tuple(shape), int(dtype), int(device))
        return out.value

    def registration(self, param_id: int) -> tuple[str, tuple, int, int]:
        """``(name, shape, dtype code, device)`` of a registered parameter."""
        if param_id not in self._regs:
            raise KeyError(f"no parameter with id {param_id} ({len(self._regs)} registered)")
        return self._regs[param_id]

    def set_strides(self, param_id: int, strides: Iterable[int]) -> None:
        """``lomo_param_set_strides``: the element strides of a registered parameter's buffer
        (and of its gradients), one per dimension of its shape; a dense non-overlapping layout
        (channels_last, a transposed matrix). LOMO updates it in memory order; AdaLomo steps on
        logical-order copies and writes the parameter back in place (CPU), bit for bit the
        contiguous result. Raises LomoError (INVALID_ARGUMENT for other layouts, UNSUPPORTED
        for AdaLomo on CUDA) with the parameter unchanged."""
        strides = [int(s) for s in strides]
        arr = (ctypes.c_int64 * max(len(strides), 1))(*strides)
        self._lib.lomo_param_set_strides(self.handle, int(param_id), len(strides),
                                         ctypes.cast(arr, ctypes.POINTER(ctypes.c_int64)))
        self._strides[int(param_id)] = tuple(strides)

    def register_array(self, name: str, array, group: int = 0, flags: int = 0) -> int:
        """Registers a writeable NumPy array (float32, float16 or ml_dtypes' bfloat16) that the
        optimizer updates in place: C-contiguous, or dense and non-overlapping in another order
        (a transposed or ``np.moveaxis``'d array: its strides are given to the library with
        ``set_strides``; gradients are then copied into its layout when theirs differs). Other
        layouts (views with gaps, overlapping or negative strides) raise ValueError before
        anything is registered. The optimizer keeps a reference to the array."""
        if not array.flags["WRITEABLE"]:
            raise ValueError(f"{name}: the array must be writeable")
        strides = None
        if not array.flags["C_CONTIGUOUS"]:
            strides = _dense_strides(name, array)
        code = _numpy_dtype_code(array.dtype)
        pid = self.register_pointer(name, array.ctypes.data, code, array.shape,
                                    N.DEVICE_CPU, group, flags)
        self._arrays[pid] = array
        if strides is not None:
            self.set_strides(pid, strides)
        return pid

    def param_id(self, name: str) -> int:
        return self._names[name]

    @property
    def param_count(self) -> int:
        out = ctypes.c_uint32()
        self._lib.lomo_param_count(self.handle, ctypes.byref(out))
        return out.value

    # ------------------------------------------------------------------- distributed (ABI 2)
    def comm_add(self, rank: int, size: int, all_reduce) -> int:
        """``lomo_comm_add``: a communicator whose in-place all-reduce is ``all_reduce``, a
        ``_native.ALL_REDUCE_FN`` (the caller keeps it alive as long as this optimizer).
        Returns the communicator id."""
        comm = N.Comm(struct_size=ctypes.sizeof(N.Comm), rank=int(rank), size=int(size),
                      all_reduce=all_reduce)
        out = ctypes.c_uint32()
        self._lib.lomo_comm_add(self.handle, ctypes.byref(comm), ctypes.byref(out))
        return out.value

    def set_shard(self, param_id: int, layout: int, global_shape: Iterable[int], offset: int,
                  piece_comm: int, flags: int = 0) -> None:
        """``lomo_param_set_shard`` with ``LOMO_GRAD_REDUCED``: parameter ``param_id`` is the
        piece at ``offset`` (ROWS: first row of the ``[prod(shape[:-1]), shape[-1]]`` view,
        rank ≤ 1: first element; COLS: first column) of a tensor of ``global_shape`` whose other
        pieces are held by the ranks of communicator ``piece_comm``."""
        shape = [int(s) for s in global_shape]
        dims = (ctypes.c_int64 * max(len(shape), 1))(*shape)
        desc = N.ShardDesc(struct_size=ctypes.sizeof(N.ShardDesc), layout=int(layout),
                           global_ndim=len(shape),
                           global_shape=ctypes.cast(dims, ctypes.POINTER(ctypes.c_int64)),
                           offset=int(offset), piece_comm=int(piece_comm),
                           grad_mode=N.GRAD_REDUCED, grad_comm=N.COMM_NONE, flags=int(flags))
        self._lib.lomo_param_set_shard(self.handle, int(param_id), ctypes.byref(desc))

    def dist_set(self, norm_comm: int, flags: int = 0) -> None:
        """``lomo_dist_set``: the communicator over which the step's scalars are agreed
        (``COMM_NONE``: this rank alone); ``flags`` 0 or ``DIST_CHECK``."""
        self._lib.lomo_dist_set(self.handle, int(norm_comm), int(flags))

    # ---------------------------------------------------------------------------------- steps
    def begin(self, phase: int, lr: float = 0.0, stream=None) -> None:
        """``lomo_step_begin``: ``phase`` is ``PHASE_NORM`` (0), ``PHASE_UPDATE`` (1) or
        ``PHASE_ACCUMULATE`` (2, see :meth:`accum_enable`)."""
        self._lib.lomo_step_begin(self.handle, phase, lr, _stream(stream))

    def submit_pointer(self, param_id: int, grad: int, dtype: int, stream=None,
                       numel: int | None = None) -> None:
        """Hands over a raw gradient address (scaled by ``loss_scale``): ``numel`` elements of
        ``dtype``, contiguous. With ``numel`` (what every binding passes) the library checks it
        against the parameter's element count before reading (``lomo_grad_submit_checked``),
        so a buffer of another extent raises LomoError (INVALID_ARGUMENT) with nothing changed;
        without it, the buffer must hold the parameter's element count (``lomo_grad_submit``)."""
        ptr = ctypes.c_void_p(int(grad) or None)
        if numel is None:
            self._lib.lomo_grad_submit(self.handle, param_id, ptr, dtype, _stream(stream))
            return
        numel = int(numel)
        if self._checked:
            self._lib.lomo_grad_submit_checked(self.handle, param_id, ptr, dtype, numel,
                                               _stream(stream))
            return
        # A library without the checked entry point: check the count here.
        expected = 1
        for d in self.registration(param_id)[1]:
            expected *= d
        if numel != expected:
            name = self.registration(param_id)[0]
            raise ValueError(f"gradient for {name!r} has {numel} elements, the parameter "
                             f"{expected}")
        self._lib.lomo_grad_submit(self.handle, param_id, ptr, dtype, _stream(stream))

    def submit_pointers(self, param_ids, grads, dtypes, numels, stream=None) -> None:
        """``lomo_grad_submit_batch``: several raw gradients at once (sequences of ids,
        addresses, dtype codes and element counts of equal length), the same as
        ``submit_pointer`` on each in order, every entry checked before anything changes. On
        CUDA, small whole tensors share launches (bit for bit as separate submits)."""
        n = len(param_ids)
        if not (len(grads) == len(dtypes) == len(numels) == n):
            raise ValueError("submit_pointers: param_ids, grads, dtypes and numels differ in length")
        ids = (ctypes.c_uint32 * n)(*[int(i) for i in param_ids])
        ptrs = (ctypes.c_void_p * n)(*[int(g) or None for g in grads])
        codes = (ctypes.c_uint32 * n)(*[int(d) for d in dtypes])
        counts = (ctypes.c_uint64 * n)(*[int(c) for c in numels])
        self._lib.lomo_grad_submit_batch(self.handle, n, ids, ptrs, codes, counts,
                                         _stream(stream))

    def cuda_launch_count(self) -> int:
        """``lomo_cuda_launch_count``: kernels this optimizer has launched on its CUDA device
        so far (the difference over a step is the step's launches). LomoError (UNSUPPORTED)
        without CUDA parameters."""
        out = ctypes.c_uint64()
        self._lib.lomo_cuda_launch_count(self.handle, ctypes.byref(out))
        return out.value

    def submit_array(self, param_id: int, grad) -> None:
        """Submits a NumPy gradient: any of the three dtypes, exactly the registered shape
        (checked before the buffer crosses: a gradient of another shape, or of an unsupported
        dtype, raises ValueError/TypeError with nothing changed)."""
        grad, code = self._checked_array(int(param_id), grad)
        self.submit_pointer(param_id, grad.ctypes.data, code, numel=grad.size)

    def _checked_array(self, param_id: int, grad):
        """(contiguous array, dtype code) of a NumPy gradient that matches its registration."""
        import numpy as np

        # Device: a CUDA parameter's gradient pointer is checked by the library with the driver.
        name, shape, _, _ = self.registration(param_id)
        if isinstance(grad, np.generic):  # a 0-d result such as np.float32(1.0)
            grad = np.asarray(grad)
        if not isinstance(grad, np.ndarray):
            raise TypeError(f"gradient for {name!r} must be a NumPy array, got "
                            f"{type(grad).__name__}")
        code = _numpy_dtype_code(grad.dtype)
        if tuple(grad.shape) != shape:
            raise ValueError(f"gradient for {name!r} has shape {tuple(grad.shape)}, the "
                             f"parameter {shape}")
        strides = self._strides.get(param_id)
        if strides is None:
            return np.ascontiguousarray(grad), code
        if grad.size == 0 or (all(st % grad.itemsize == 0 for st in grad.strides) and
                              tuple(st // grad.itemsize for st in grad.strides) == strides):
            return grad, code
        # The parameter's layout (lomo_param_set_strides): a copy of the gradient laid out so.
        out = np.lib.stride_tricks.as_strided(
            np.empty(grad.size, dtype=grad.dtype), shape=grad.shape,
            strides=tuple(st * grad.itemsize for st in strides))
        out[...] = grad
        return out, code

    def end(self, stream=None) -> None:
        self._lib.lomo_step_end(self.handle, _stream(stream))

    def cancel(self) -> None:
        """Abandons the current step (``lomo_step_cancel``); a no-op between steps."""
        self._lib.lomo_step_cancel(self.handle)

    def step(self, grads: Mapping, lr: float, norm_pass: bool | None = None) -> StepInfo:
        """One whole step from NumPy gradients ``{param id or name: gradient}``. With
        ``clip_grad_norm`` set (or ``norm_pass=True``: an overflowing step is then skipped with
        every parameter untouched), a NORM phase over the same gradients comes first. The
        gradients are those of the loss times ``loss_scale``."""
        # Every gradient is checked before the first one is applied: a step either runs whole
        # or raises with every parameter untouched.
        items = self._items(grads)
        if norm_pass is None:
            norm_pass = self.config["clip_grad_norm"] > 0
        if norm_pass:
            self._phase(N.PHASE_NORM, 0.0, items)
        self._phase(N.PHASE_UPDATE, lr, items)
        return self.step_info()

    def accumulate(self, grads: Mapping) -> None:
        """One micro-batch of an accumulated step (an ACCUMULATE phase): NumPy gradients
        ``{param id or name: gradient}`` (of the loss times ``loss_scale``) are added to the
        parameters' accumulation buffers; nothing is updated. The step's last micro-batch is
        ``step(grads, lr)``, which applies the sum (or mean) of all of them. Needs
        :meth:`accum_enable`. Every gradient is checked before the first is added."""
        self._phase(N.PHASE_ACCUMULATE, 0.0, self._items(grads))

    def accum_enable(self, buffer: str = "f32", reduction: str = "sum") -> None:
        """Gradient accumulation (``lomo_accum_enable``): one buffer per parameter, ``buffer``
        ``"f32"`` (4 bytes per element) or ``"param"`` (the parameter's dtype: 2 bytes for
        f16/bf16, partial sums rounded to it); ``reduction`` ``"sum"`` or ``"mean"`` (over the
        step's micro-batches). A step of k micro-batches is k - 1 :meth:`accumulate` calls (or
        ACCUMULATE phases) and then the step itself on the last one; it equals one step on the
        summed (averaged) gradient: clipping, loss scale and overflow checks included. CPU
        parameters; between steps. The buffers count as ``workspace_bytes``."""
        buffers = {"f32": N.ACCUM_F32, "param": N.ACCUM_PARAM_DTYPE}
        reductions = {"sum": N.ACCUM_SUM, "mean": N.ACCUM_MEAN}
        if buffer not in buffers:
            raise ValueError(f"buffer={buffer!r}: expected 'f32' or 'param'")
        if reduction not in reductions:
            raise ValueError(f"reduction={reduction!r}: expected 'sum' or 'mean'")
        self._lib.lomo_accum_enable(self.handle, buffers[buffer], reductions[reduction])

    def accum_disable(self) -> None:
        """Turns accumulation off and frees the buffers (``lomo_accum_disable``)."""
        self._lib.lomo_accum_disable(self.handle)

    @property
    def accum_pending(self) -> int:
        """Micro-batches accumulated in the current step (ACCUMULATE phases since the last
        applied step)."""
        return self._accum_get()[0]

    @property
    def accum_bytes(self) -> int:
        """Bytes of the accumulation buffers (0 when accumulation is off)."""
        return self._accum_get()[1]

    def _accum_get(self):
        pending, nbytes = ctypes.c_uint32(), ctypes.c_uint64()
        self._lib.lomo_accum_get(self.handle, ctypes.byref(pending), ctypes.byref(nbytes))
        return pending.value, nbytes.value

    def _items(self, grads: Mapping):
        """``[(param id, checked array)]`` of ``{param id or name: gradient}``: unknown names,
        duplicates and every gradient's shape and dtype checked before anything is applied."""
        items = []
        for k, g in grads.items():
            if isinstance(k, str) and k not in self._names:
                raise KeyError(f"no parameter named {k!r}")
            items.append((self._names[k] if isinstance(k, str) else int(k), g))
        ids = [pid for pid, _ in items]
        if len(set(ids)) != len(ids):
            raise ValueError("a parameter appears twice in grads")
        return [(pid, self._checked_array(pid, g)) for pid, g in items]

    def _phase(self, phase, lr, items):
        self.begin(phase, lr)
        try:
            for pid, (g, code) in items:
                self.submit_pointer(pid, g.ctypes.data, code, numel=g.size)
        except BaseException:
            self.cancel()
            raise
        self.end()

    # ----------------------------------------------------------------------------- diagnostics
    def step_info(self) -> StepInfo:
        """Diagnostics of the last phase and step (may synchronize with the GPU)."""
        info = N.StepInfo(struct_size=ctypes.sizeof(N.StepInfo))
        self._lib.lomo_step_info_get(self.handle, ctypes.byref(info))
        return StepInfo(
            step=info.step,
            grad_norm=info.grad_norm,
            clip_coef=info.clip_coef,
            loss_scale=info.loss_scale,
            next_loss_scale=info.next_loss_scale,
            overflow=bool(info.overflow),
            skipped=bool(info.skipped),
            skipped_total=info.skipped_total,
            grads_submitted=info.grads_submitted,
            grads_nonfinite=info.grads_nonfinite,
        )

    @property
    def loss_scale(self) -> float:
        """The factor to multiply the loss by before the next backward (1 when off)."""
        out = ctypes.c_float()
        self._lib.lomo_loss_scale(self.handle, ctypes.byref(out))
        return out.value

    # ----------------------------------------------------------------------------------- state
    def state_bytes(self) -> bytes:
        """The complete optimizer state (AdaLomo statistics, step counter, loss scaler) as the
        bytes of a safetensors file (``lomo_state_serialize``)."""
        size = ctypes.c_size_t()
        self._lib.lomo_state_size(self.handle, ctypes.byref(size))
        buf = (ctypes.c_uint8 * max(size.value, 1))()
        written = ctypes.c_size_t()
        self._lib.lomo_state_serialize(self.handle, buf, size.value, ctypes.byref(written))
        return bytes(buf)[: written.value]

    def load_state_bytes(self, data: bytes) -> None:
        """Restores a state written by ``state_bytes`` for the same parameters (names, shapes,
        algorithm); raises LomoError (STATE_MISMATCH) otherwise, leaving the optimizer as it was."""
        data = bytes(data)
        buf = (ctypes.c_uint8 * max(len(data), 1)).from_buffer_copy(data or b"\0")
        self._lib.lomo_state_deserialize(self.handle, buf, len(data))

    def save(self, path) -> None:
        """Writes the state to a safetensors file (``lomo_state_save``, atomic)."""
        self._lib.lomo_state_save(self.handle, str(path).encode())

    def load(self, path) -> None:
        """Loads a state file written by ``save`` (``lomo_state_load``)."""
        self._lib.lomo_state_load(self.handle, str(path).encode())

    def memory_stats(self) -> dict:
        """Memory accounting (``lomo_memory_stats_get``): totals in bytes, and per device
        (``"devices"``: ``{device: {...}}``, -1 = CPU)."""
        st = N.MemoryStats(struct_size=ctypes.sizeof(N.MemoryStats))
        self._lib.lomo_memory_stats_get(self.handle, ctypes.byref(st))
        keys = ("param_count", "param_elements", "param_bytes", "state_bytes",
                "workspace_bytes", "adamw_bytes")
        out = {k: getattr(st, k) for k in keys}
        out["devices"] = {
            d.device: {k: getattr(d, k) for k in keys}
            for d in st.devices[: min(st.device_count, N.MEMORY_MAX_DEVICES)]
        }
        return out

    @staticmethod
    def supports_state() -> bool:
        """Whether the loaded library has the state functions."""
        return N.has_symbol("lomo_state_serialize") and N.has_symbol("lomo_state_deserialize")
