"""Issue 13 on the JAX path: gradients are checked against their parameter before anything is
handed to XLA (kind 1), and results do not depend on XLA's flush-to-zero environment (kind 5),
checked against the C API of the same library (jax_capi_ref.py, never the JAX path)."""

import os
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from jax_capi_ref import CApiOptimizer  # noqa: E402

from lomo_native import jax as lj  # noqa: E402

jax.config.update("jax_platforms", "cpu")


def bits(a):
    a = np.asarray(a)
    return a.view({4: np.uint32, 2: np.uint16}[a.dtype.itemsize])


# ------------------------------------------------------------------------------ kind 5


@pytest.mark.parametrize("shape", [(7,), (300, 257)])
def test_f32_subnormal_params_survive_a_zero_gradient_under_jit(shape):
    # The case: jax.jit(lomo_update) on 1e-40 values with a zero gradient wrote zeros
    # (XLA runs custom calls with FTZ/DAZ set); the C API keeps 1e-40. On the calling thread (7)
    # and on the library's pool (300×257).
    p = np.full(shape, 1e-40, np.float32)
    p.reshape(-1)[1::2] = -1e-40
    out, finite = jax.jit(lambda p, g: lj.lomo_update(p, g, lr=0.01))(
        jnp.asarray(p), jnp.zeros(shape, jnp.float32)
    )
    assert bool(finite)
    assert np.array_equal(bits(out), bits(p))
    assert float(np.abs(np.asarray(out)).max()) == np.float32(1e-40)


def test_adalomo_zero_rows_next_to_large_rows_match_the_c_api():
    # The case: an (8, 16) parameter whose rows 0, 3 and 5 get a zero gradient while the
    # others get gradients near 1e5; XLA's flush modes made the zero rows NaN with finite=True.
    rng = np.random.default_rng(3)
    p = rng.normal(size=(8, 16)).astype(np.float32)
    v = rng.normal(size=16).astype(np.float32)
    ref = CApiOptimizer("adalomo", [p, v], loss_scale_mode="none")
    opt = lj.adalomo(loss_scale_mode="none")
    params = [jnp.asarray(p), jnp.asarray(v)]
    state = opt.init(params)
    step = jax.jit(opt.step)
    for t in range(3):
        g = (rng.normal(size=(8, 16)) * 1e5).astype(np.float32)
        g[[0, 3, 5]] = 0.0
        gv = (rng.normal(size=16) * 1e5).astype(np.float32)
        gv[::3] = 0.0
        ref.step([g, gv], 1e-2)
        params, state = step(params, [jnp.asarray(g), jnp.asarray(gv)], state, 1e-2)
        for a, b in zip(params, ref.params):
            assert np.all(np.isfinite(np.asarray(a)))
            assert np.array_equal(bits(a), bits(b)), t
        assert not bool(state.overflow) and not ref.info().overflow


# ------------------------------------------------------------------------------ kind 1


def test_a_gradient_of_another_shape_is_refused_before_xla():
    p = jnp.ones((4, 64), jnp.float32)
    for g in (jnp.ones((4, 32)), jnp.ones((64, 4)), jnp.ones(256), jnp.ones(3)):
        with pytest.raises(ValueError, match="grad shape must equal the parameter's"):
            lj.lomo_update(p, g, lr=0.1)
        with pytest.raises(ValueError, match="grad shape must equal the parameter's"):
            lj.adalomo_update(p, g, lj.adalomo_state(p), lr=0.1, step=1)
    # AdaLomo state of another parameter's shape, or not float32.
    with pytest.raises(ValueError, match="AdaLomo state"):
        lj.adalomo_update(p, p, (jnp.zeros(64), jnp.zeros(4)), lr=0.1, step=1)
    with pytest.raises(ValueError, match="AdaLomo state"):
        lj.adalomo_update(p, p, (jnp.zeros(4, jnp.bfloat16), jnp.zeros(64)), lr=0.1, step=1)
    # The pytree helper: a leaf of another shape raises at trace time, with nothing changed.
    opt = lj.lomo()
    params = {"w": p, "b": jnp.zeros(3)}
    state = opt.init(params)
    with pytest.raises(ValueError, match="grad shape"):
        jax.jit(opt.step)(params, {"w": jnp.ones((4, 32)), "b": jnp.ones(3)}, state, 0.1)
    assert np.array_equal(np.asarray(params["w"]), np.ones((4, 64), np.float32))


# ------------------------------------------------------------------------------ kind 4


def test_configurations_that_would_write_nan_are_refused():
    from lomo_native import LomoError

    # The case: eps1 = 0 made AdaLomo write NaN to zero-gradient rows.
    with pytest.raises(LomoError, match="eps1"):
        lj.adalomo(eps1=0.0)
    with pytest.raises(LomoError, match="eps2"):
        lj.adalomo(eps2=0.0)
    with pytest.raises(LomoError, match="clip_grad_value"):
        lj.lomo(clip_grad_value=1e-300)
    p = jnp.ones((8, 16), jnp.float32)
    with pytest.raises(Exception, match="eps1"):
        lj.adalomo_update(p, jnp.zeros_like(p), lj.adalomo_state(p), lr=0.1, step=1, eps1=0.0)[
            0
        ].block_until_ready()


def test_dynamic_scale_growth_stops_below_the_largest_f32_as_the_c_api():
    # A sibling of kind 3 (training that silently stops): a scale grown past the largest f32 is
    # infinite, every gradient overflows, and backing off from infinity stays infinite.
    rng = np.random.default_rng(9)
    p = rng.normal(size=(4, 3)).astype(np.float32)
    opts = dict(loss_scale_mode="dynamic", loss_scale=2.0**124, scale_window=1)
    ref = CApiOptimizer("lomo", [p], **opts)
    opt = lj.lomo(**opts)
    params = [jnp.asarray(p)]
    state = opt.init(params)
    step = jax.jit(opt.step)
    for t in range(8):
        g = np.zeros((4, 3), np.float32)   # finite at any scale
        ref.step([g], 1e-3)
        params, state = step(params, [jnp.asarray(g)], state, 1e-3)
        assert float(state.loss_scale) == ref.loss_scale() == min(2.0 ** (124 + t), 2.0**127)
