"""Loss scaling in lomo_native.jax (issue 12, item 4): off by default, so a user who
differentiates the plain loss gets the right norm and clipping; ``opt.value_and_grad`` applies
and removes the scale when it is on. References: NumPy for the norm, the C API (jax_capi_ref.py)
for the steps."""

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


def problem(dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    y = rng.normal(size=(64, 3)).astype(np.float32) * 3.0
    params = [
        (rng.normal(size=(8, 3)) * 2.0).astype(np.float32).astype(dtype),
        np.zeros(3, np.float32).astype(dtype),
    ]

    def loss_fn(p, x, y):
        out = x.astype(p[0].dtype) @ p[0] + p[1]
        return jnp.mean((out.astype(jnp.float32) - y) ** 2)

    return params, loss_fn, jnp.asarray(x), jnp.asarray(y)


@pytest.mark.parametrize("algorithm", ["lomo", "adalomo"])
def test_defaults_have_no_loss_scale(algorithm):
    opt = lj.Optimizer(algorithm)
    assert opt.loss_scale_mode == "none"
    state = opt.init([jnp.zeros((2, 2))])
    assert float(opt.loss_scale(state)) == 1.0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("algorithm", ["lomo", "adalomo"])
def test_plain_gradients_norm_and_clipping_with_defaults(algorithm, dtype):
    """The user does nothing special: jax.grad of the plain loss, clip_grad_norm=1.0. The
    reported norm is the NumPy norm of those gradients (≫ 1 here, so clipping triggers) and the
    step equals the C API's with clipping on the same gradients."""
    params, loss_fn, x, y = problem(dtype)
    opt = lj.Optimizer(algorithm, clip_grad_norm=1.0)
    jp = [jnp.asarray(p) for p in params]
    state = opt.init(jp)
    grads = jax.grad(loss_fn)(jp, x, y)
    ng = [np.asarray(g) for g in grads]
    norm = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in ng))
    assert norm > 5.0  # clipping at 1.0 must act
    new, state = jax.jit(opt.step)(jp, grads, state, 1e-2)
    np.testing.assert_allclose(float(state.grad_norm), norm, rtol=1e-6)
    ref = CApiOptimizer(algorithm, params, clip_grad_norm=1.0, loss_scale_mode="none")
    ref.step(ng, 1e-2)
    info = ref.info()
    assert info.clip_coef < 0.25  # the C API clipped too
    for a, b in zip(new, ref.params):
        assert np.array_equal(bits(a), bits(b))


def test_value_and_grad_without_scaling_is_jax_value_and_grad():
    params, loss_fn, x, y = problem(jnp.float32)
    jp = [jnp.asarray(p) for p in params]
    opt = lj.adalomo()
    state = opt.init(jp)
    value, grads = opt.value_and_grad(loss_fn)(state, jp, x, y)
    v2, g2 = jax.value_and_grad(loss_fn)(jp, x, y)
    assert float(value) == float(v2)
    for a, b in zip(grads, g2):
        assert np.array_equal(bits(a), bits(b))


@pytest.mark.parametrize("mode", ["static", "dynamic"])
@pytest.mark.parametrize("algorithm", ["lomo", "adalomo"])
def test_value_and_grad_applies_and_removes_the_scale_fp16(algorithm, mode):
    """fp16 with loss scaling: the wrapper reports the unscaled loss, hands step the scaled
    gradients, and the step (and grad_norm) equal the C API given those scaled gradients; the
    reported norm is that of the plain gradients."""
    params, loss_fn, x, y = problem(jnp.float16)
    opts = dict(loss_scale_mode=mode, loss_scale=2.0**8, clip_grad_norm=1.0)
    if mode == "dynamic":
        opts.update(scale_window=2)
    opt = lj.Optimizer(algorithm, **opts)
    ref = CApiOptimizer(algorithm, params, **opts)
    jp = [jnp.asarray(p) for p in params]
    state = opt.init(jp)

    @jax.jit
    def train_step(p, state):
        (loss, aux), grads = opt.value_and_grad(lambda p: (loss_fn(p, x, y), 7), has_aux=True)(
            state, p
        )
        return grads, loss, aux

    for t in range(4):
        scale = ref.loss_scale()
        assert float(opt.loss_scale(state)) == scale
        grads, loss, aux = train_step(jp, state)
        assert int(aux) == 7
        np.testing.assert_allclose(float(loss), float(loss_fn(jp, x, y)), rtol=1e-6)
        # the gradients of the scaled loss (the reference: JAX of the loss times the scale)
        plain = jax.grad(lambda p: loss_fn(p, x, y) * jnp.float32(scale))(jp)
        for a, b in zip(grads, plain):
            assert np.array_equal(bits(a), bits(b))
        ng = [np.asarray(g) for g in grads]
        ref.step(ng, 1e-2)
        jp, state = jax.jit(opt.step)(jp, grads, state, 1e-2)
        for a, b in zip(jp, ref.params):
            assert np.array_equal(bits(a), bits(b)), t
        info = ref.info()
        np.testing.assert_allclose(float(state.grad_norm), info.grad_norm, rtol=1e-6)
        unscaled = np.sqrt(sum(float(np.sum((g.astype(np.float64) / scale) ** 2)) for g in ng))
        np.testing.assert_allclose(float(state.grad_norm), unscaled, rtol=1e-6)
        assert float(state.loss_scale) == info.next_loss_scale
    if mode == "dynamic":
        assert float(state.loss_scale) > 2.0**8  # the scaler grew (window 2)
