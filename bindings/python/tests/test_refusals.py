"""What the NumPy level refuses before a pointer crosses (issue 13, kind 1): gradients of another
shape, size or dtype, and steps whose gradients do not all match — with every parameter
untouched."""

import numpy as np
import pytest

from lomo_native import LomoError, Optimizer


@pytest.mark.parametrize("algorithm", ["lomo", "adalomo"])
def test_wrong_shape_or_size_is_refused_before_anything_changes(algorithm):
    w = np.full((4, 64), 0.5, np.float32)
    v = np.full(1024, 0.25, np.float32)
    opt = Optimizer(algorithm)
    wid = opt.register_array("w", w)
    vid = opt.register_array("v", v)
    w0, v0 = w.copy(), v.copy()
    for grads in ({wid: np.ones((4, 32), np.float32)},          # the case
                  {vid: np.ones(3, np.float32)},                # 3 elements for 1024
                  {wid: np.ones((64, 4), np.float32)},          # same size, other shape
                  {wid: np.ones(256, np.float32)},              # same size, flattened
                  {wid: np.ones((4, 64), np.float32), vid: np.ones(1023, np.float32)}):
        with pytest.raises(ValueError, match="shape"):
            opt.step(grads, lr=0.1)
        np.testing.assert_array_equal(w, w0)
        np.testing.assert_array_equal(v, v0)
    with pytest.raises(TypeError, match="float64"):
        opt.step({wid: np.ones((4, 64), np.float64)}, lr=0.1)
    with pytest.raises(TypeError, match="NumPy array"):
        opt.step({wid: [[1.0] * 64] * 4}, lr=0.1)
    np.testing.assert_array_equal(w, w0)
    assert opt.step_info().step == 0
    # A good step afterwards trains both.
    opt.step({wid: np.ones((4, 64), np.float32), vid: np.ones(1024, np.float32)}, lr=0.1)
    assert opt.step_info().step == 1 and not np.array_equal(w, w0) and not np.array_equal(v, v0)


def test_submit_array_inside_a_phase_checks_too():
    w = np.zeros((4, 64), np.float32)
    opt = Optimizer("lomo")
    wid = opt.register_array("w", w)
    opt.begin(1, 0.1)
    with pytest.raises(ValueError, match=r"\(4, 32\)"):
        opt.submit_array(wid, np.ones((4, 32), np.float32))
    opt.submit_array(wid, np.ones((4, 64), np.float32))   # still expected in this phase
    opt.end()
    np.testing.assert_allclose(w, -0.1)


def test_raw_pointer_with_a_count_is_checked_by_the_library():
    w = np.zeros(1024, np.float32)
    opt = Optimizer("lomo")
    wid = opt.register_array("w", w)
    g = np.ones(3, np.float32)
    opt.begin(1, 0.1)
    with pytest.raises(LomoError) as e:
        opt.submit_pointer(wid, g.ctypes.data, 0, numel=g.size)
    assert e.value.status == 2 and "1024" in e.value.message
    opt.cancel()
    np.testing.assert_array_equal(w, 0)


def test_configurations_that_would_write_nan_are_refused():
    # The case: eps1 = 0 wrote NaN to every element of zero-gradient rows.
    for field, value in (("eps1", 0.0), ("eps2", 0.0), ("eps1", 1e-300), ("clip_threshold", 0.0)):
        with pytest.raises(LomoError) as e:
            Optimizer("adalomo", **{field: value})
        assert e.value.status == 2 and field in e.value.message
    with pytest.raises(LomoError, match="clip_grad_value"):
        Optimizer("lomo", clip_grad_value=1e-300)


def test_torch_adalomo_refuses_eps1_zero_at_construction():
    torch = pytest.importorskip("torch")
    from lomo_native.torch import AdaLomo

    model = torch.nn.Linear(16, 8)
    with pytest.raises(LomoError, match="eps1"):
        AdaLomo(model, eps=(0.0, 1e-3))
    # Nothing was hooked: a plain backward leaves .grad as PyTorch does.
    model(torch.ones(2, 16)).sum().backward()
    assert model.weight.grad is not None


def test_zero_gradient_rows_and_vectors_stay_finite_with_the_default_eps1():
    w = np.full((8, 16), 0.5, np.float32)
    v = np.full(16, 0.25, np.float32)
    opt = Optimizer("adalomo", loss_scale_mode="none")
    wid, vid = opt.register_array("w", w), opt.register_array("v", v)
    g = np.zeros((8, 16), np.float32)
    g[1::2] = 1e12   # rows this large make the zero rows' ratio underflow f32
    info = opt.step({wid: g, vid: np.zeros(16, np.float32)}, lr=0.01)
    assert not info.overflow
    assert np.isfinite(w).all() and np.isfinite(v).all()
    assert (w[0::2] == 0.5).all() and (w[1::2] < 0.5).all() and (v == 0.25).all()
