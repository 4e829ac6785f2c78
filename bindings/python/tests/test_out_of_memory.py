"""Allocation failure is a status, not an abort (issue 14): through the Python binding."""

import numpy as np
import pytest

from lomo_native import LomoError, Optimizer, _native


def test_adalomo_state_larger_than_memory_raises_out_of_memory():
    opt = Optimizer("adalomo")
    w = np.full((3, 5), 0.5, np.float32)
    opt.register_array("w", w)
    before = opt.state_bytes()
    # The data is never read at registration: a small buffer stands in for the 16 TiB one.
    stand_in = np.zeros(16, np.float32)
    with pytest.raises(LomoError) as e:
        opt.register_pointer("big", stand_in.ctypes.data, _native.DTYPE_F32, [2**40, 4])
    assert e.value.status == 12 and e.value.status_name == "OUT_OF_MEMORY"
    # 2**40 rows of f32 second-moment state.
    assert "4398046511104 bytes" in e.value.message
    assert opt.param_count == 1 and opt.state_bytes() == before
    # The optimizer is still usable.
    pid = opt.register_array("b", np.ones(4, np.float32))
    opt.step({pid: np.full(4, 0.5, np.float32)}, lr=1e-2)
    assert opt.param_count == 2
    opt.close()


def test_shape_overflowing_64_bits_raises_invalid_argument():
    opt = Optimizer("lomo")
    stand_in = np.zeros(16, np.float32)
    with pytest.raises(LomoError) as e:
        opt.register_pointer("x", stand_in.ctypes.data, _native.DTYPE_F32, [2**32, 2**32])
    assert e.value.status == 2 and "64-bit" in e.value.message
    assert opt.param_count == 0
    opt.close()
