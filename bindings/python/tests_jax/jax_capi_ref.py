"""The reference for the JAX tests: the C API of liblomo.so driven directly through ctypes
(lomo_config_init / lomo_optimizer_new / lomo_param_register / lomo_step_begin /
lomo_grad_submit / lomo_step_end) on NumPy buffers. Independent of lomo_native.jax."""

import ctypes
from ctypes import (
    POINTER,
    Structure,
    byref,
    c_char_p,
    c_double,
    c_float,
    c_int32,
    c_int64,
    c_size_t,
    c_uint32,
    c_uint64,
    c_void_p,
)

import numpy as np

from lomo_native import load

ALGORITHMS = {"lomo": 0, "adalomo": 1}
PHASE_NORM, PHASE_UPDATE = 0, 1
MODES = {"none": 0, "static": 1, "dynamic": 2}
ROUNDING = {"nearest": 0, "stochastic": 1}
DEVICE_CPU = -1


class lomo_config(Structure):
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
    ]


class lomo_param_desc(Structure):
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


class lomo_step_info(Structure):
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


def _lib():
    lib = load()
    if not getattr(lib, "_jax_test_sigs", False):
        lib.lomo_config_init.argtypes = [POINTER(lomo_config), c_uint32]
        lib.lomo_optimizer_new.argtypes = [POINTER(lomo_config), POINTER(c_void_p)]
        lib.lomo_optimizer_free.argtypes = [c_void_p]
        lib.lomo_optimizer_free.restype = None
        lib.lomo_group_set.argtypes = [c_void_p, c_uint32, c_double, c_double]
        lib.lomo_param_register.argtypes = [c_void_p, POINTER(lomo_param_desc), POINTER(c_uint32)]
        lib.lomo_step_begin.argtypes = [c_void_p, c_uint32, c_float, c_void_p]
        lib.lomo_grad_submit.argtypes = [c_void_p, c_uint32, c_void_p, c_uint32, c_void_p]
        lib.lomo_step_end.argtypes = [c_void_p, c_void_p]
        lib.lomo_step_info_get.argtypes = [c_void_p, POINTER(lomo_step_info)]
        lib.lomo_loss_scale.argtypes = [c_void_p, POINTER(c_float)]
        lib.lomo_last_error_message.argtypes = [c_char_p, c_size_t]
        lib.lomo_last_error_message.restype = c_size_t
        for name in (
            "lomo_config_init",
            "lomo_optimizer_new",
            "lomo_group_set",
            "lomo_param_register",
            "lomo_step_begin",
            "lomo_grad_submit",
            "lomo_step_end",
            "lomo_step_info_get",
            "lomo_loss_scale",
        ):
            getattr(lib, name).restype = c_uint32
        lib._jax_test_sigs = True
    return lib


def _check(status):
    if status != 0:
        lib = _lib()
        buf = ctypes.create_string_buffer(1024)
        lib.lomo_last_error_message(buf, len(buf))
        raise RuntimeError("C API status %d: %s" % (status, buf.value.decode()))


def dtype_code(dt) -> int:
    name = np.dtype(dt).name
    return {"float32": 0, "float16": 1, "bfloat16": 2}[name]


class CApiOptimizer:
    """A C API optimizer over NumPy parameter copies (which it updates in place)."""

    def __init__(self, algorithm, params, *, no_decay=(), group_of=None, groups=None, **options):
        """``no_decay``: indices of parameters put in a group without weight decay;
        ``groups``: {group id: (lr_multiplier, weight_decay)} and ``group_of``: group per index."""
        lib = _lib()
        cfg = lomo_config()
        _check(lib.lomo_config_init(byref(cfg), ALGORITHMS[algorithm]))
        for key, value in options.items():
            if key == "loss_scale_mode":
                value = MODES[value]
            elif key == "rounding":
                value = ROUNDING[value]
            setattr(cfg, key, value)
        self._opt = c_void_p()
        _check(lib.lomo_optimizer_new(byref(cfg), byref(self._opt)))
        if no_decay:
            _check(lib.lomo_group_set(self._opt, 1, 1.0, 0.0))
        for gid, (mult, wd) in (groups or {}).items():
            _check(lib.lomo_group_set(self._opt, gid, mult, wd))
        self.params = [np.array(p, copy=True) for p in params]
        self._shapes = []
        for i, p in enumerate(self.params):
            shape = (c_int64 * max(p.ndim, 1))(*p.shape)
            self._shapes.append(shape)
            desc = lomo_param_desc(
                struct_size=ctypes.sizeof(lomo_param_desc),
                name=b"p%d" % i,
                data=p.ctypes.data,
                dtype=dtype_code(p.dtype),
                ndim=p.ndim,
                shape=shape,
                device=DEVICE_CPU,
                group=(group_of[i] if group_of else (1 if i in no_decay else 0)),
                flags=0,
            )
            pid = c_uint32()
            _check(lib.lomo_param_register(self._opt, byref(desc), byref(pid)))
            assert pid.value == i
        self.clip = options.get("clip_grad_norm", 0.0) > 0

    def __del__(self):
        if getattr(self, "_opt", None):
            _lib().lomo_optimizer_free(self._opt)
            self._opt = None

    def loss_scale(self) -> float:
        s = c_float()
        _check(_lib().lomo_loss_scale(self._opt, byref(s)))
        return s.value

    def _phase(self, phase, lr, grads):
        lib = _lib()
        _check(lib.lomo_step_begin(self._opt, phase, lr, None))
        for i, g in enumerate(grads):
            g = np.ascontiguousarray(g)
            _check(lib.lomo_grad_submit(self._opt, i, g.ctypes.data, dtype_code(g.dtype), None))
        _check(lib.lomo_step_end(self._opt, None))

    def step(self, grads, lr):
        """One step (NORM phase first when clipping); the grads are already loss-scaled."""
        if self.clip:
            self._phase(PHASE_NORM, lr, grads)
        self._phase(PHASE_UPDATE, lr, grads)

    def info(self) -> lomo_step_info:
        info = lomo_step_info(struct_size=ctypes.sizeof(lomo_step_info))
        _check(_lib().lomo_step_info_get(self._opt, byref(info)))
        return info
