"""The one place that loads ``liblomo.so`` and declares the C API for ctypes.

``load()`` returns the library (a ``ctypes.CDLL``) with ``argtypes``/``restype`` set from
``SIGNATURES`` for every C function, loaded once per process. Every function that returns a
``lomo_status`` raises :class:`LomoError` (status number and the thread's last-error message)
instead of returning a non-OK status, so callers never check numbers by hand.

Where the library comes from, in order: the ``LOMO_LIBRARY`` environment variable (a path to the
shared library), the copy bundled in this package (``pip install`` puts it there), the
repository's ``target/release`` (for a source checkout).
"""

from __future__ import annotations

import ctypes
import os
import threading
from ctypes import (
    POINTER,
    CFUNCTYPE,
    Structure,
    c_bool,
    c_char,
    c_char_p,
    c_double,
    c_float,
    c_int32,
    c_int64,
    c_size_t,
    c_uint8,
    c_uint32,
    c_uint64,
    c_void_p,
)
from pathlib import Path

__all__ = [
    "LomoError",
    "load",
    "check",
    "has_symbol",
    "library_path",
    "SIGNATURES",
    "Config",
    "ParamDesc",
    "StepInfo",
    "MemoryStats",
    "DeviceMemory",
    "STATUS_OK",
    "DTYPE_F32",
    "DTYPE_F16",
    "DTYPE_BF16",
    "DEVICE_CPU",
    "ALGORITHM_LOMO",
    "ALGORITHM_ADALOMO",
    "PHASE_NORM",
    "PHASE_UPDATE",
    "PHASE_ACCUMULATE",
    "ACCUM_F32",
    "ACCUM_PARAM_DTYPE",
    "ACCUM_SUM",
    "ACCUM_MEAN",
    "LOSS_SCALE_NONE",
    "LOSS_SCALE_STATIC",
    "LOSS_SCALE_DYNAMIC",
    "ROUNDING_NEAREST",
    "ROUNDING_STOCHASTIC",
    "NONFINITE_PER_TENSOR",
    "NONFINITE_PER_ELEMENT",
    "PARAM_CARRY_RMS",
    "Comm",
    "ShardDesc",
    "ALL_REDUCE_FN",
    "COMM_NONE",
    "REDUCE_SUM",
    "REDUCE_MAX",
    "DTYPE_F64",
    "LAYOUT_FULL",
    "LAYOUT_ROWS",
    "LAYOUT_COLS",
    "LAYOUT_FLAT",
    "GRAD_REDUCED",
    "GRAD_ALL_REDUCE",
    "GRAD_REDUCE_SCATTER",
    "SHARD_NORM_DUPLICATE",
    "DIST_CHECK",
]

# ---------------------------------------------------------------------------------------- enums
# Mirrors include/lomo.h (the numbers are stable: they are never renumbered).
STATUS_OK = 0
STATUS_NAMES = {
    0: "OK",
    1: "NULL_ARGUMENT",
    2: "INVALID_ARGUMENT",
    3: "PHASE_ERROR",
    4: "DUPLICATE_GRADIENT",
    5: "UNKNOWN_PARAM",
    6: "DEVICE_MISMATCH",
    7: "NO_CUDA",
    8: "CUDA_ERROR",
    9: "COMPILE_ERROR",
    10: "IO_ERROR",
    11: "STATE_MISMATCH",
    12: "OUT_OF_MEMORY",
    13: "UNSUPPORTED",
    14: "PANIC",
    15: "COMM_ERROR",
    16: "DIST_MISMATCH",
}
DTYPE_F32, DTYPE_F16, DTYPE_BF16 = 0, 1, 2
DEVICE_CPU = -1
ALGORITHM_LOMO, ALGORITHM_ADALOMO = 0, 1
PHASE_NORM, PHASE_UPDATE, PHASE_ACCUMULATE = 0, 1, 2
ACCUM_F32, ACCUM_PARAM_DTYPE = 0, 1
ACCUM_SUM, ACCUM_MEAN = 0, 1
LOSS_SCALE_NONE, LOSS_SCALE_STATIC, LOSS_SCALE_DYNAMIC = 0, 1, 2
ROUNDING_NEAREST, ROUNDING_STOCHASTIC = 0, 1
NONFINITE_PER_TENSOR, NONFINITE_PER_ELEMENT = 0, 1
PARAM_CARRY_RMS = 1


# -------------------------------------------------------------------------------------- structs
class Config(Structure):
    """``struct lomo_config``; fill it with ``lomo_config_init``."""

    _fields_ = [
        ("struct_size", c_size_t),
        ("algorithm", c_uint32),
        ("weight_decay", c_double),
        ("clip_grad_norm", c_double),
        ("clip_grad_value", c_double),
        ("loss_scale_mode", c_uint32),
        ("loss_scale", c_double),
        ("scale_factor", c_double),
        ("scale_window", c_uint32),
        ("min_loss_scale", c_double),
        ("hysteresis", c_uint32),
        ("eps1", c_double),
        ("eps2", c_double),
        ("clip_threshold", c_double),
        ("decay_rate", c_double),
        ("rounding", c_uint32),
        ("seed", c_uint64),
        ("nonfinite_policy", c_uint32),
    ]


class ParamDesc(Structure):
    """``struct lomo_param_desc``."""

    _fields_ = [
        ("struct_size", c_size_t),
        ("name", c_char_p),
        ("data", c_void_p),
        ("dtype", c_uint32),
        ("ndim", c_uint32),
        ("shape", POINTER(c_int64)),
        ("device", c_int32),
        ("group", c_uint32),
        ("flags", c_uint32),
    ]


class StepInfo(Structure):
    """``struct lomo_step_info``."""

    _fields_ = [
        ("struct_size", c_size_t),
        ("step", c_uint64),
        ("grad_norm", c_float),
        ("clip_coef", c_float),
        ("loss_scale", c_float),
        ("next_loss_scale", c_float),
        ("overflow", c_uint32),
        ("skipped", c_uint32),
        ("skipped_total", c_uint64),
        ("grads_submitted", c_uint32),
        ("grads_nonfinite", c_uint32),
    ]


MEMORY_MAX_DEVICES = 16  # LOMO_MEMORY_MAX_DEVICES


class DeviceMemory(Structure):
    """``struct lomo_device_memory``."""

    _fields_ = [
        ("device", c_int32),
        ("param_count", c_uint32),
        ("param_elements", c_uint64),
        ("param_bytes", c_uint64),
        ("state_bytes", c_uint64),
        ("workspace_bytes", c_uint64),
        ("adamw_bytes", c_uint64),
    ]


class MemoryStats(Structure):
    """``struct lomo_memory_stats``."""

    _fields_ = [
        ("struct_size", c_size_t),
        ("param_count", c_uint64),
        ("param_elements", c_uint64),
        ("param_bytes", c_uint64),
        ("state_bytes", c_uint64),
        ("workspace_bytes", c_uint64),
        ("adamw_bytes", c_uint64),
        ("device_count", c_uint32),
        ("devices", DeviceMemory * MEMORY_MAX_DEVICES),
    ]


# ------------------------------------------------------------------------------ the one table

# Distributed training (lomo_comm, lomo_shard_desc, lomo_dist_set; ABI 2).
COMM_NONE = 0xFFFFFFFF
REDUCE_SUM, REDUCE_MAX = 0, 1
DTYPE_F64 = 3  # the dtype of the records the library hands to the callbacks
LAYOUT_FULL, LAYOUT_ROWS, LAYOUT_COLS, LAYOUT_FLAT = 0, 1, 2, 3
GRAD_REDUCED, GRAD_ALL_REDUCE, GRAD_REDUCE_SCATTER = 0, 1, 2
SHARD_NORM_DUPLICATE = 1
DIST_CHECK = 1

ALL_REDUCE_FN = CFUNCTYPE(c_int32, c_void_p, c_void_p, c_size_t, c_uint32, c_uint32, c_void_p)
REDUCE_SCATTER_FN = CFUNCTYPE(
    c_int32, c_void_p, c_void_p, c_void_p, c_size_t, c_uint32, c_uint32, c_void_p
)
ALL_GATHER_FN = CFUNCTYPE(c_int32, c_void_p, c_void_p, c_void_p, c_size_t, c_uint32, c_void_p)
DESTROY_FN = CFUNCTYPE(None, c_void_p)


class Comm(Structure):
    """``lomo_comm``: the caller's communicator (keep the callback objects alive as long as
    the optimizer)."""

    _fields_ = [
        ("struct_size", c_size_t),
        ("rank", c_uint32),
        ("size", c_uint32),
        ("user", c_void_p),
        ("all_reduce", ALL_REDUCE_FN),
        ("reduce_scatter", REDUCE_SCATTER_FN),
        ("all_gather", ALL_GATHER_FN),
        ("destroy", DESTROY_FN),
    ]


class ShardDesc(Structure):
    """``lomo_shard_desc``: where a registered buffer lies in a global tensor."""

    _fields_ = [
        ("struct_size", c_size_t),
        ("layout", c_uint32),
        ("global_ndim", c_uint32),
        ("global_shape", POINTER(c_int64)),
        ("offset", c_int64),
        ("piece_comm", c_uint32),
        ("grad_mode", c_uint32),
        ("grad_comm", c_uint32),
        ("flags", c_uint32),
    ]


class _StatusMarker:
    """Marks functions that return a ``lomo_status`` (a ``uint32_t``) in ``SIGNATURES``."""

    def __repr__(self):
        return "lomo_status"


_status = _StatusMarker()
_opt = c_void_p  # lomo_optimizer *

# name: (restype, argtypes, required). ``required=False`` marks functions that a library built
# from an older revision may lack; their absence is reported by ``has_symbol`` and, when called,
# by a LomoError that says so.
SIGNATURES: dict[str, tuple[object, list, bool]] = {
    # introspection
    "lomo_abi_version": (c_uint32, [], True),
    "lomo_version": (c_char_p, [], True),
    "lomo_status_str": (c_char_p, [c_uint32], True),
    "lomo_last_error_message": (c_size_t, [POINTER(c_char), c_size_t], True),
    "lomo_cuda_available": (c_bool, [], True),
    # lifecycle
    "lomo_config_init": (_status, [POINTER(Config), c_uint32], True),
    "lomo_optimizer_new": (_status, [POINTER(Config), POINTER(_opt)], True),
    "lomo_optimizer_free": (None, [_opt], True),
    # groups and parameters
    "lomo_group_set": (_status, [_opt, c_uint32, c_double, c_double], True),
    "lomo_group_get": (_status, [_opt, c_uint32, POINTER(c_double), POINTER(c_double)], True),
    "lomo_param_register": (_status, [_opt, POINTER(ParamDesc), POINTER(c_uint32)], True),
    "lomo_param_count": (_status, [_opt, POINTER(c_uint32)], True),
    # steps
    "lomo_step_begin": (_status, [_opt, c_uint32, c_float, c_void_p], True),
    "lomo_grad_submit": (_status, [_opt, c_uint32, c_void_p, c_uint32, c_void_p], True),
    "lomo_grad_submit_checked": (
        _status, [_opt, c_uint32, c_void_p, c_uint32, c_uint64, c_void_p], False),
    # several gradients in one call (CUDA: multi-tensor launches for small tensors)
    "lomo_grad_submit_batch": (
        _status, [_opt, c_size_t, POINTER(c_uint32), POINTER(c_void_p), POINTER(c_uint32),
                  POINTER(c_uint64), c_void_p], False),
    "lomo_step_end": (_status, [_opt, c_void_p], True),
    "lomo_step_cancel": (_status, [_opt], True),
    "lomo_step_info_get": (_status, [_opt, POINTER(StepInfo)], True),
    "lomo_loss_scale": (_status, [_opt, POINTER(c_float)], True),
    # device address of the f32 loss scale (CUDA optimizers; for graph capture)
    "lomo_cuda_loss_scale_ptr": (_status, [_opt, POINTER(c_void_p)], False),
    # kernels launched so far (CUDA optimizers; launches per step)
    "lomo_cuda_launch_count": (_status, [_opt, POINTER(c_uint64)], False),
    # optimizer state (checkpoints: the bytes are a safetensors file) and memory accounting
    "lomo_state_save": (_status, [_opt, c_char_p], False),
    "lomo_state_load": (_status, [_opt, c_char_p], False),
    "lomo_state_size": (_status, [_opt, POINTER(c_size_t)], False),
    "lomo_state_serialize": (
        _status,
        [_opt, POINTER(c_uint8), c_size_t, POINTER(c_size_t)],
        False,
    ),
    "lomo_state_deserialize": (_status, [_opt, POINTER(c_uint8), c_size_t], False),
    "lomo_memory_stats_get": (_status, [_opt, POINTER(MemoryStats)], False),
    # distributed training (ABI 2)
    "lomo_comm_add": (_status, [_opt, POINTER(Comm), POINTER(c_uint32)], False),
    "lomo_param_set_shard": (_status, [_opt, c_uint32, POINTER(ShardDesc)], False),
    "lomo_dist_set": (_status, [_opt, c_uint32, c_uint32], False),
    # layouts other than contiguous (channels_last, permuted views)
    "lomo_param_set_strides": (_status, [_opt, c_uint32, c_uint32, POINTER(c_int64)], False),
    # gradient accumulation
    "lomo_accum_enable": (_status, [_opt, c_uint32, c_uint32], False),
    "lomo_accum_disable": (_status, [_opt], False),
    "lomo_accum_get": (_status, [_opt, POINTER(c_uint32), POINTER(c_uint64)], False),
}


# ------------------------------------------------------------------------------------ errors
class LomoError(RuntimeError):
    """A C call returned a non-OK status.

    ``status`` is the status number (``STATUS_NAMES`` has its name), ``message`` the library's
    last-error message for the calling thread.
    """

    def __init__(self, status: int, message: str, function: str | None = None):
        self.status = int(status)
        self.status_name = STATUS_NAMES.get(self.status, "UNKNOWN")
        self.message = message
        self.function = function
        where = f"{function}: " if function else ""
        super().__init__(f"{where}{message} [LOMO_STATUS_{self.status_name}]")


def _last_error(lib: ctypes.CDLL) -> str:
    n = lib.lomo_last_error_message(None, 0)
    buf = ctypes.create_string_buffer(n + 1)
    lib.lomo_last_error_message(buf, n + 1)
    return buf.value.decode("utf-8", errors="replace")


def _make_errcheck(lib: ctypes.CDLL, name: str):
    def errcheck(result, func, args):
        if result != STATUS_OK:
            msg = _last_error(lib) or lib.lomo_status_str(result).decode()
            raise LomoError(result, msg, name)
        return result

    return errcheck


class _Missing:
    """Stands in for a symbol the loaded library lacks; calling it raises a clear LomoError."""

    def __init__(self, name: str, path: str):
        self.name, self.path = name, path

    def __call__(self, *args, **kwargs):
        raise LomoError(
            13,
            f"the loaded library {self.path} has no symbol {self.name}; it was built from an "
            "older lomo revision (rebuild it, or point LOMO_LIBRARY at a newer liblomo.so)",
            self.name,
        )


# ------------------------------------------------------------------------------------ loading
#: The ``LOMO_ABI_VERSION`` (include/lomo.h) this package is written for: a library reporting a
#: lower ``lomo_abi_version()`` is refused at load time with its path and version.
ABI_VERSION = 2

_LIB: ctypes.CDLL | None = None
_LIB_PATH: str | None = None
_LOCK = threading.Lock()


def _candidates() -> list[Path]:
    here = Path(__file__).resolve().parent
    out = []
    env = os.environ.get("LOMO_LIBRARY")
    if env:
        return [Path(env)]
    out.append(here / "liblomo.so")
    # source checkout: bindings/python/lomo_native -> repository root
    for root in (here.parent.parent.parent,):
        out.append(root / "target" / "release" / "liblomo.so")
    return out


def library_path() -> str:
    """The path ``load()`` uses (or used)."""
    if _LIB_PATH is not None:
        return _LIB_PATH
    cands = _candidates()
    for c in cands:
        if c.is_file():
            return str(c)
    tried = ", ".join(str(c) for c in cands)
    raise OSError(
        f"liblomo.so not found (tried {tried}); install the package with "
        "`pip install ./bindings/python`, build it with `cargo build --release`, or set "
        "LOMO_LIBRARY to its path"
    )


def load() -> ctypes.CDLL:
    """Loads the library once and returns it with every signature of ``SIGNATURES`` declared."""
    global _LIB, _LIB_PATH
    if _LIB is not None:
        return _LIB
    with _LOCK:
        if _LIB is not None:
            return _LIB
        path = library_path()
        lib = ctypes.CDLL(path)
        _check_version(lib, path)
        for name, (restype, argtypes, required) in SIGNATURES.items():
            try:
                fn = getattr(lib, name)
            except AttributeError:
                if required:
                    raise OSError(
                        f"{path} (lomo {_describe(lib)}) lacks the required symbol {name}; "
                        "rebuild it (cargo build --release) or point LOMO_LIBRARY at a newer "
                        "liblomo.so"
                    ) from None
                setattr(lib, name, _Missing(name, path))
                continue
            fn.argtypes = argtypes
            if restype is _status:
                fn.restype = c_uint32
                fn.errcheck = _make_errcheck(lib, name)
            else:
                fn.restype = restype
        _LIB_PATH = path
        _LIB = lib
        return lib


def _describe(lib: ctypes.CDLL) -> str:
    """``<version>, ABI <n>`` of a loaded library, as far as it tells."""
    try:
        fn = lib.lomo_version
        fn.restype, fn.argtypes = c_char_p, []
        version = fn().decode()
    except (AttributeError, UnicodeDecodeError):
        version = "of unknown version"
    try:
        abi = lib.lomo_abi_version
        abi.restype, abi.argtypes = c_uint32, []
        return f"{version}, ABI {abi()}"
    except AttributeError:
        return f"{version}, no lomo_abi_version"


def _check_version(lib: ctypes.CDLL, path: str) -> None:
    """Refuses a library older than this package (``lomo_abi_version() < ABI_VERSION``) or one
    that is not liblomo at all, naming its path and version."""
    from . import __version__

    try:
        abi_fn = lib.lomo_abi_version
    except AttributeError:
        raise OSError(
            f"{path} is not a lomo library (no lomo_abi_version); set LOMO_LIBRARY to a "
            "liblomo.so built from the lomo repository"
        ) from None
    abi_fn.restype, abi_fn.argtypes = c_uint32, []
    abi = abi_fn()
    if abi < ABI_VERSION:
        raise OSError(
            f"{path} is lomo {_describe(lib)}, older than lomo_native {__version__} expects "
            f"(ABI {ABI_VERSION}); rebuild it (cargo build --release), reinstall the package, "
            "or point LOMO_LIBRARY at a newer liblomo.so"
        )


def has_symbol(name: str) -> bool:
    """Whether the loaded library exports ``name`` (False for optional symbols it lacks)."""
    return not isinstance(getattr(load(), name, None), (_Missing, type(None)))


def check(status: int, function: str | None = None) -> None:
    """Raises LomoError for a non-OK status (for callers that bypass the declared table)."""
    if status != STATUS_OK:
        lib = load()
        raise LomoError(status, _last_error(lib) or lib.lomo_status_str(status).decode(), function)
