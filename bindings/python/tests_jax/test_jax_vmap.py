"""jax.vmap over the step (each batch element an independent optimizer on whole tensors, e.g. an
ensemble or a hyperparameter sweep): the custom_partitioning wrappers of the sharded-jit path
have no batching rule, so ``jax.vmap(opt.step)`` raised "Batching rule for
'custom_partitioning' not implemented". Checked against the C API of the same library
(jax_capi_ref.py), one optimizer per batch element, never against the JAX path itself."""

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

SHAPES = {"b": (5,), "w": (4, 6)}


def _batch(seed, n, scale=1.0):
    rng = np.random.default_rng(seed)
    return {
        k: (rng.standard_normal((n,) + s) * scale).astype(np.float32) for k, s in SHAPES.items()
    }


@pytest.mark.parametrize(
    "algorithm,options",
    [
        ("adalomo", dict(clip_grad_norm=1.0, weight_decay=0.01)),
        ("lomo", dict(clip_grad_norm=0.5, clip_grad_value=0.3)),
        ("adalomo", dict(loss_scale_mode="dynamic", loss_scale=8.0)),
    ],
)
def test_vmap_over_step_is_one_optimizer_per_element(algorithm, options):
    n = 3
    opt = getattr(lj, algorithm)(**options)
    params = _batch(0, n)
    names = sorted(SHAPES)
    capi_options = dict(dict(loss_scale_mode="none"), **options)  # the C API's AdaLomo: 1024
    refs = [CApiOptimizer(algorithm, [params[k][i] for k in names], **capi_options)
            for i in range(n)]
    state = jax.vmap(opt.init)({k: jnp.asarray(v) for k, v in params.items()})
    step = jax.jit(jax.vmap(opt.step, in_axes=(0, 0, 0, None)))
    p = {k: jnp.asarray(v) for k, v in params.items()}
    for t in range(3):
        grads = _batch(10 + t, n, scale=1.0 + 2 * t)
        if t == 1:
            grads["w"][1, 0, 0] = np.inf  # element 1 alone overflows
        scaled = {k: v * np.asarray(state.loss_scale)[(...,) + (None,) * len(SHAPES[k])]
                  for k, v in grads.items()}
        for i, r in enumerate(refs):
            r.step([scaled[k][i] for k in names], 0.05)
        p, state = step(p, {k: jnp.asarray(v) for k, v in scaled.items()}, state, 0.05)
        for i, r in enumerate(refs):
            for j, k in enumerate(names):
                np.testing.assert_allclose(np.asarray(p[k][i]), r.params[j], rtol=1e-6, atol=1e-7)
            assert float(state.loss_scale[i]) == r.loss_scale()
        assert bool(state.skipped[1]) == (t == 1 and options.get("clip_grad_norm", 0) > 0)


def test_nested_vmap_of_functional_update():
    rng = np.random.default_rng(3)
    p = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    g = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    f = jax.jit(jax.vmap(jax.vmap(lambda p, g: lj.lomo_update(p, g, lr=0.1, weight_decay=0.1))))
    out, finite = f(jnp.asarray(p), jnp.asarray(g))
    assert finite.shape == (2, 3) and bool(jnp.all(finite))
    for a in range(2):
        for b in range(3):
            ref = CApiOptimizer("lomo", [p[a, b]], weight_decay=0.1)
            ref.step([g[a, b]], 0.1)
            np.testing.assert_array_equal(np.asarray(out[a, b]), ref.params[0])
