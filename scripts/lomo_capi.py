"""The C API of liblomo through ctypes, for scripts/gpu_check.py: the structs of lomo.h, the
argument types of every call it makes, and `Opt`, an optimizer handle that registers and steps
torch tensors (host or device memory) by address.

Loads LOMO_LIBRARY (default target/release/liblomo.so) on import.
"""
import ctypes as C
import os

import torch

LIB = os.environ.get("LOMO_LIBRARY", "target/release/liblomo.so")
lib = C.CDLL(LIB)


class Config(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("algorithm", C.c_uint32), ("weight_decay", C.c_double),
                ("clip_grad_norm", C.c_double), ("clip_grad_value", C.c_double),
                ("loss_scale_mode", C.c_uint32), ("loss_scale", C.c_double), ("scale_factor", C.c_double),
                ("scale_window", C.c_uint32), ("min_loss_scale", C.c_double), ("hysteresis", C.c_uint32),
                ("eps1", C.c_double), ("eps2", C.c_double), ("clip_threshold", C.c_double),
                ("decay_rate", C.c_double), ("rounding", C.c_uint32), ("seed", C.c_uint64)]


class ParamDesc(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("name", C.c_char_p), ("data", C.c_void_p),
                ("dtype", C.c_uint32), ("ndim", C.c_uint32), ("shape", C.POINTER(C.c_int64)),
                ("device", C.c_int32), ("group", C.c_uint32), ("flags", C.c_uint32)]


class StepInfo(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("step", C.c_uint64), ("grad_norm", C.c_float),
                ("clip_coef", C.c_float), ("loss_scale", C.c_float), ("next_loss_scale", C.c_float),
                ("overflow", C.c_uint32), ("skipped", C.c_uint32), ("skipped_total", C.c_uint64),
                ("grads_submitted", C.c_uint32), ("grads_nonfinite", C.c_uint32)]


P = C.c_void_p
for name, args in {
    "lomo_config_init": [C.POINTER(Config), C.c_uint32],
    "lomo_optimizer_new": [C.POINTER(Config), C.POINTER(P)],
    "lomo_group_set": [P, C.c_uint32, C.c_double, C.c_double],
    "lomo_param_register": [P, C.POINTER(ParamDesc), C.POINTER(C.c_uint32)],
    "lomo_step_begin": [P, C.c_uint32, C.c_float, P],
    "lomo_grad_submit": [P, C.c_uint32, P, C.c_uint32, P],
    "lomo_step_end": [P, P],
    "lomo_step_info_get": [P, C.POINTER(StepInfo)],
    "lomo_loss_scale": [P, C.POINTER(C.c_float)],
    "lomo_state_size": [P, C.POINTER(C.c_size_t)],
    "lomo_state_serialize": [P, C.c_char_p, C.c_size_t, C.POINTER(C.c_size_t)],
    "lomo_state_deserialize": [P, C.c_char_p, C.c_size_t],
}.items():
    getattr(lib, name).argtypes = args
    getattr(lib, name).restype = C.c_uint32
lib.lomo_optimizer_free.argtypes = [P]
lib.lomo_optimizer_free.restype = None
lib.lomo_last_error_message.argtypes = [C.c_char_p, C.c_size_t]
lib.lomo_last_error_message.restype = C.c_size_t
lib.lomo_cuda_available.restype = C.c_bool

DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def ok(status):
    if status != 0:
        buf = C.create_string_buffer(4096)
        lib.lomo_last_error_message(buf, 4096)
        raise RuntimeError(f"lomo status {status}: {buf.value.decode()}")


class Opt:
    def __init__(self, algorithm, **fields):
        self.cfg = Config()
        ok(lib.lomo_config_init(C.byref(self.cfg), algorithm))
        for k, v in fields.items():
            setattr(self.cfg, k, v)
        self.h = P()
        ok(lib.lomo_optimizer_new(C.byref(self.cfg), C.byref(self.h)))
        self.keep = []

    def __del__(self):
        lib.lomo_optimizer_free(self.h)

    def register(self, name, t, device, group=0, flags=0):
        shape = (C.c_int64 * max(t.dim(), 1))(*t.shape)
        nm = name.encode()
        self.keep += [shape, nm]
        d = ParamDesc(C.sizeof(ParamDesc), nm, t.data_ptr(), DT[t.dtype], t.dim(), shape, device, group, flags)
        pid = C.c_uint32()
        ok(lib.lomo_param_register(self.h, C.byref(d), C.byref(pid)))
        return pid.value

    def step(self, phase, lr, grads, stream):
        ok(lib.lomo_step_begin(self.h, phase, lr, stream))
        for i, g in enumerate(grads):
            ok(lib.lomo_grad_submit(self.h, i, g.data_ptr(), DT[g.dtype], stream))
        ok(lib.lomo_step_end(self.h, stream))

    def info(self):
        i = StepInfo()
        i.struct_size = C.sizeof(StepInfo)
        ok(lib.lomo_step_info_get(self.h, C.byref(i)))
        return i

    def loss_scale(self):
        s = C.c_float()
        ok(lib.lomo_loss_scale(self.h, C.byref(s)))
        return s.value

    def state(self):
        n, w = C.c_size_t(), C.c_size_t()
        ok(lib.lomo_state_size(self.h, C.byref(n)))
        buf = C.create_string_buffer(n.value)
        ok(lib.lomo_state_serialize(self.h, buf, n.value, C.byref(w)))
        return buf.raw[: w.value]

    def load_state(self, blob):
        ok(lib.lomo_state_deserialize(self.h, blob, len(blob)))
