"""lomo_native.jax.optax (issue 12, item 3): optax.apply_updates(params, updates) against the
C API's step (jax_capi_ref.py, never the JAX path) — bitwise for bf16/f16, within one ulp for
f32 — alone, after optax.clip_by_global_norm in optax.chain, with an optax schedule as lr, and
under optax.MultiSteps; and an optax training loop whose loss falls."""

import os
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from jax_capi_ref import CApiOptimizer  # noqa: E402

from lomo_native import jax as lj  # noqa: E402

jax.config.update("jax_platforms", "cpu")

lox = lj.optax
DTYPES = {"f32": jnp.float32, "f16": jnp.float16, "bf16": jnp.bfloat16}
SHAPES = [(7,), (5, 3), (2, 3, 5), (300, 257)]
OPTIONS = {
    "defaults": dict(),
    "clip_wd": dict(clip_grad_norm=0.5, clip_grad_value=0.05, weight_decay=0.1),
    "stochastic": dict(rounding="stochastic", seed=3, weight_decay=0.01),
}


def bits(a):
    a = np.asarray(a)
    return a.view({4: np.int32, 2: np.int16}[a.dtype.itemsize]).astype(np.int64)


def make_params(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=s) * 0.5).astype(np.float32).astype(dtype) for s in SHAPES]


def make_grads(params, t, dtype, dyadic=False):
    rng = np.random.default_rng(100 + t)
    out = []
    for p in params:
        if dyadic:  # small dyadic values: every mean of them is exact
            g = rng.integers(-64, 65, size=p.shape).astype(np.float32) * 2.0**-8
        else:
            g = rng.normal(size=p.shape).astype(np.float32) * 0.3
        out.append(g.astype(dtype))
    return out


def check_equal(new, ref_params, old, dtype_name, where):
    """bf16/f16: bitwise. f32: within one ulp of the larger of the old and the new value — the
    fused step rounds once, p + (new - p) rounds the difference and the sum (exact when new and
    p are within a factor of 2, e.g. not at a sign change)."""
    for i, (a, b, o) in enumerate(zip(new, ref_params, old)):
        a, o = np.asarray(a), np.asarray(o)
        assert a.dtype == b.dtype, where
        if dtype_name == "f32":
            tol = np.spacing(np.maximum(np.abs(o), np.abs(b)))
            err = np.abs(a.astype(np.float64) - b.astype(np.float64))
            assert (err <= tol).all(), "%s, param %d: %g ulps" % (where, i, (err / tol).max())
            # the next step starts from the same values on both sides (the C API updates its
            # registered NumPy buffers in place)
            b[...] = a
        else:
            assert np.array_equal(bits(a), bits(b)), "%s, param %d differs" % (where, i)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(OPTIONS))
@pytest.mark.parametrize("algorithm", ["lomo", "adalomo"])
def test_apply_updates_equals_c_api(algorithm, case, dtype):
    opts = OPTIONS[case]
    params = make_params(DTYPES[dtype])
    ref = CApiOptimizer(algorithm, params, loss_scale_mode="none", **opts)
    tx = getattr(lox, algorithm)(1e-2, **opts)
    jp = [jnp.asarray(p) for p in params]
    state = tx.init(jp)

    @jax.jit
    def step(p, state, g):
        updates, state = tx.update(g, state, p)
        return optax.apply_updates(p, updates), state, updates

    exact = total = 0
    for t in range(4):
        grads = make_grads(params, t, DTYPES[dtype])
        ref.step(grads, 1e-2)
        old = [np.asarray(p) for p in jp]
        jp, state, updates = step(jp, state, [jnp.asarray(g) for g in grads])
        assert all(u.dtype == jnp.float32 for u in updates)
        check_equal(jp, ref.params, old, dtype, "step %d" % t)
        exact += sum(int(np.sum(bits(a) == bits(b))) for a, b in zip(jp, ref.params))
        total += sum(b.size for b in ref.params)
        assert int(state.count) == t + 1 and int(state.inner.step) == ref.info().step
    if dtype == "f32":
        assert exact >= 0.99 * total, (exact, total)  # nearly every element is exact


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("algorithm", ["lomo", "adalomo"])
def test_chain_after_clip_by_global_norm_with_schedule(algorithm, dtype):
    """optax.chain(optax.clip_by_global_norm(0.5), ours with a cosine schedule): the C API is
    fed the gradients optax clipped and the schedule's lr for each count."""
    params = make_params(DTYPES[dtype], seed=2)
    schedule = optax.cosine_decay_schedule(2e-2, decay_steps=5, alpha=0.1)
    clip = optax.clip_by_global_norm(0.5)
    tx = optax.chain(clip, getattr(lox, algorithm)(schedule, weight_decay=0.05))
    ref = CApiOptimizer(algorithm, params, loss_scale_mode="none", weight_decay=0.05)
    jp = [jnp.asarray(p) for p in params]
    state = tx.init(jp)
    clip_state = clip.init(jp)
    step = jax.jit(lambda p, s, g: tx.update(g, s, p))
    # optax's clipping, compiled as in the chain (f32 rounding of the norm as there)
    clip_fn = jax.jit(lambda g, p: clip.update(g, clip_state, p)[0])
    for t in range(5):
        grads = [jnp.asarray(g) for g in make_grads(params, t, DTYPES[dtype])]
        clipped = clip_fn(grads, jp)
        lr = float(jax.jit(schedule)(jnp.int32(t)))  # as the chain evaluates it
        ref.step([np.asarray(g) for g in clipped], lr)
        updates, state = step(jp, state, grads)
        old = [np.asarray(p) for p in jp]
        jp = optax.apply_updates(jp, updates)
        check_equal(jp, ref.params, old, dtype, "step %d (lr %g)" % (t, lr))
    assert lr < 2e-2 * 0.5  # the schedule moved


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("algorithm", ["lomo", "adalomo"])
def test_multisteps_accumulates(algorithm, dtype):
    """optax.MultiSteps(every_k_schedule=2): the first call of each pair leaves the parameters
    as they are, the second equals the C API's step on the mean of the two gradients (dyadic, so
    the mean is exact in any order)."""
    params = make_params(DTYPES[dtype], seed=4)
    tx = optax.MultiSteps(getattr(lox, algorithm)(1e-2, clip_grad_norm=1.0), every_k_schedule=2)
    ref = CApiOptimizer(algorithm, params, loss_scale_mode="none", clip_grad_norm=1.0)
    jp = [jnp.asarray(p) for p in params]
    state = tx.init(jp)
    step = jax.jit(lambda p, s, g: tx.update(g, s, p))
    for t in range(3):
        g1 = make_grads(params, 2 * t, DTYPES[dtype], dyadic=True)
        g2 = make_grads(params, 2 * t + 1, DTYPES[dtype], dyadic=True)
        before = [np.asarray(p) for p in jp]
        updates, state = step(jp, state, [jnp.asarray(g) for g in g1])
        jp = optax.apply_updates(jp, updates)
        for a, b in zip(jp, before):
            assert np.array_equal(bits(a), bits(b))
        updates, state = step(jp, state, [jnp.asarray(g) for g in g2])
        jp = optax.apply_updates(jp, updates)
        mean = [
            ((a.astype(np.float32) + b.astype(np.float32)) / 2).astype(a.dtype)
            for a, b in zip(g1, g2)
        ]
        ref.step(mean, 1e-2)
        check_equal(jp, ref.params, before, dtype, "accumulated step %d" % t)
        assert int(state.inner_opt_state.inner.step) == t + 1


def test_refusals():
    with pytest.raises(ValueError, match="loss_scale_mode='none'"):
        lox.adalomo(1e-2, loss_scale_mode="dynamic")
    tx = lox.lomo(0.1)
    p = [jnp.ones((3,))]
    with pytest.raises(ValueError, match="needs params"):
        tx.update(p, tx.init(p))
    with pytest.raises(TypeError):
        lox.as_gradient_transformation(object(), 0.1)
    assert isinstance(tx, optax.GradientTransformation)


@pytest.mark.parametrize("algorithm,lr", [("adalomo", 1e-2), ("lomo", 0.1)])
def test_optax_training_loop_loss_falls(algorithm, lr):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(256, 8)).astype(np.float32))
    w_true = rng.normal(size=(8, 1)).astype(np.float32)
    y = jnp.tanh(x @ w_true)
    params = {
        "l1": {"w": jnp.asarray(rng.normal(size=(8, 32)) * 0.3, jnp.float32),
               "b": jnp.zeros(32)},
        "l2": {"w": jnp.asarray(rng.normal(size=(32, 1)) * 0.3, jnp.float32),
               "b": jnp.zeros(1)},
    }

    def loss_fn(p):
        h = jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"])
        return jnp.mean((h @ p["l2"]["w"] + p["l2"]["b"] - y) ** 2)

    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        getattr(lox, algorithm)(optax.linear_schedule(lr, lr * 0.1, 60), weight_decay=1e-3),
    )
    state = tx.init(params)

    @jax.jit
    def train_step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(60):
        params, state, loss = train_step(params, state)
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_example_script_optax_form_runs():
    import subprocess

    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
    out = subprocess.run(
        [sys.executable, os.path.join(root, "examples", "python", "jax_train.py"), "--optax",
         "--steps", "30"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(
            os.environ,
            JAX_PLATFORMS="cpu",
            PYTHONPATH=os.pathsep.join(
                [os.path.join(root, "bindings", "python"), os.environ.get("PYTHONPATH", "")]
            ),
        ),
    )
    assert out.returncode == 0, out.stderr
    assert "adalomo (optax), float32 params: 30 steps" in out.stdout, out.stdout
    losses = [float(l.split()[3]) for l in out.stdout.splitlines() if l.startswith("step")]
    assert losses[-1] < losses[0], losses


def test_inject_hyperparams_injects_the_learning_rate():
    # optax.inject_hyperparams(lomo_optax.adalomo)(learning_rate=...) raised "unexpected keyword
    # argument 'options'" (it binds the factory's signature; **options became a keyword).
    # Against the C API; the lr changed through the state takes effect; a compile-time option
    # given as a hyperparameter is refused with a message naming static_args.
    params = make_params(jnp.float32)
    ref = CApiOptimizer("adalomo", params, loss_scale_mode="none", weight_decay=0.1)
    tx = optax.inject_hyperparams(lox.adalomo, static_args=("weight_decay",))(
        learning_rate=1e-2, weight_decay=0.1
    )
    jp = [jnp.asarray(p) for p in params]
    state = tx.init(jp)

    @jax.jit
    def step(p, state, g):
        updates, state = tx.update(g, state, p)
        return optax.apply_updates(p, updates), state

    for t, lr in enumerate((1e-2, 3e-3)):
        state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
        grads = make_grads(params, t, jnp.float32)
        ref.step(grads, lr)
        old = [np.asarray(p) for p in jp]
        jp, state = step(jp, state, [jnp.asarray(g) for g in grads])
        check_equal(jp, ref.params, old, "f32", "inject_hyperparams step %d" % t)
    tx = optax.inject_hyperparams(lox.lomo)(learning_rate=1e-2, weight_decay=0.1)
    with pytest.raises(TypeError, match="static_args"):
        jax.jit(tx.update)(jp, tx.init(jp), jp)
