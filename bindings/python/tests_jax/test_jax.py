"""lomo_native.jax on the JAX CPU platform, checked against the C API of the same library
(driven through ctypes in jax_capi_ref.py, never through the JAX path)."""

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

DTYPES = {"f32": jnp.float32, "f16": jnp.float16, "bf16": jnp.bfloat16}
# Scalar, vector, matrix, rank 3 (factored over [6, 5]), and one large enough for several
# CPU chunks (> 65536 elements).
SHAPES = [(), (7,), (5, 3), (2, 3, 5), (300, 257)]
LRS = [1e-2, 5e-3, 2.5e-3, 1e-2, 3e-3, 2e-3, 4e-3, 1e-3]


def bits(a):
    a = np.asarray(a)
    return a.view({4: np.uint32, 2: np.uint16}[a.dtype.itemsize])


def make_params(dtype, seed=0, shapes=SHAPES, pscale=1.0):
    rng = np.random.default_rng(seed)
    return [
        np.asarray(rng.normal(size=s).astype(np.float32) * 0.5 * pscale).astype(dtype)
        for s in shapes
    ]


def make_grads(params, step, scale, dtype, inf_at=None):
    rng = np.random.default_rng(1000 + step)
    grads = []
    for i, p in enumerate(params):
        g = rng.normal(size=p.shape).astype(np.float32) * 0.1 * scale
        if inf_at == (step, i) and g.size:
            g.reshape(-1)[g.size // 2] = np.inf
        grads.append(g.astype(dtype))
    return grads


CASES = {
    "defaults": dict(),
    "clip_wd": dict(clip_grad_norm=0.5, clip_grad_value=0.05, weight_decay=0.1),
    "dynamic_skip": dict(
        clip_grad_norm=1.0,
        loss_scale_mode="dynamic",
        loss_scale=2.0**10,
        scale_window=2,
        hysteresis=1,
        inf_at=(2, 3),
    ),
    "dynamic_noclip": dict(
        loss_scale_mode="dynamic", loss_scale=2.0**8, scale_window=2, hysteresis=2, inf_at=(1, 2)
    ),
    "stochastic": dict(rounding="stochastic", seed=7, weight_decay=0.01),
    "static_scale": dict(loss_scale_mode="static", loss_scale=256.0, clip_grad_value=0.02),
    "mask": dict(weight_decay=0.2, mask=(False, True, True, False, True)),
}
ADA_ONLY = {
    "ada_options": dict(eps1=1e-20, eps2=1e-2, clip_threshold=0.5, decay_rate=-0.6),
}


def run_both(algorithm, dtype_name, case, *, grad_dtype=None, jit=True, steps=5, pscale=1.0):
    opts = dict(case)
    inf_at = opts.pop("inf_at", None)
    mask = opts.pop("mask", None)
    dtype = DTYPES[dtype_name]
    gdtype = grad_dtype or dtype
    params = make_params(dtype, pscale=pscale)
    no_decay = tuple(i for i, m in enumerate(mask) if not m) if mask else ()
    # The JAX helper's loss scaling is off by default (the C API's AdaLomo default is static
    # 1024): the same configuration on both sides.
    ref = CApiOptimizer(
        algorithm, params, no_decay=no_decay, **{"loss_scale_mode": "none", **opts}
    )

    opt = lj.Optimizer(
        algorithm, weight_decay_mask=(list(mask) if mask else None), **opts
    )
    jparams = [jnp.asarray(p) for p in params]
    state = opt.init(jparams)
    step_fn = jax.jit(opt.step, donate_argnums=(0, 2)) if jit else opt.step
    history = []
    for t in range(steps):
        scale = ref.loss_scale()
        assert float(state.loss_scale) == scale, (t, float(state.loss_scale), scale)
        grads = make_grads(params, t, scale, gdtype, inf_at)
        ref.step(grads, LRS[t])
        jparams, state = step_fn(jparams, [jnp.asarray(g) for g in grads], state, LRS[t])
        info = ref.info()
        for i, (a, b) in enumerate(zip(jparams, ref.params)):
            assert np.array_equal(bits(a), bits(b)), "step %d, param %d %s differs" % (
                t,
                i,
                b.shape,
            )
        assert int(state.step) == info.step
        assert bool(state.skipped) == bool(info.skipped)
        assert bool(state.overflow) == bool(info.overflow)
        assert float(state.loss_scale) == info.next_loss_scale
        if opt.clip_grad_norm > 0 and not info.skipped:
            np.testing.assert_allclose(float(state.grad_norm), info.grad_norm, rtol=1e-6)
        history.append((scale, bool(info.overflow), bool(info.skipped)))
    return ref, state, history


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("algorithm", ["lomo", "adalomo"])
def test_pytree_step_equals_c_api(algorithm, dtype, case):
    _, _, history = run_both(algorithm, dtype, CASES[case])
    if "inf_at" in CASES[case]:
        # The injected non-finite gradient was seen (and, with clipping, skipped the step).
        step = CASES[case]["inf_at"][0]
        assert history[step][1]
        assert history[step][2] == ("clip_grad_norm" in CASES[case])


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_adalomo_options_equal_c_api(dtype):
    run_both("adalomo", dtype, ADA_ONLY["ada_options"])


@pytest.mark.parametrize("algorithm", ["lomo", "adalomo"])
def test_f16_subnormal_params_equal_c_api(algorithm):
    # XLA's CPU runtime runs custom calls with flush-to-zero and denormals-are-zero set; f16
    # parameters below 2^-14 (subnormal) must still be read and written as they are. Most of
    # these parameters are subnormal (|p| ~ 2^-15).
    for case in ("defaults", "clip_wd"):
        run_both(algorithm, "f16", CASES[case], steps=2, pscale=2.0**-15)


@pytest.mark.parametrize("shape", [(7,), (300, 257)])
def test_f16_subnormals_survive_a_zero_gradient(shape):
    # LOMO with a zero gradient and no weight decay leaves every parameter as it was: f16
    # subnormals on the calling thread (7), and every f16 subnormal of both signs and both zeros
    # on the pool (300×257).
    n = int(np.prod(shape))
    i = np.arange(n)
    p = (i % 0x400).astype(np.uint16)
    p[(i // 0x400) % 2 == 1] |= 0x8000
    p = p.view(np.float16).reshape(shape)
    out, finite = jax.jit(lambda p, g: lj.lomo_update(p, g, lr=0.01))(
        jnp.asarray(p), jnp.zeros(shape, jnp.float32)
    )
    assert bool(finite)
    assert np.array_equal(bits(out), bits(p))


@pytest.mark.parametrize("algorithm", ["lomo", "adalomo"])
def test_mixed_grad_dtype_and_eager(algorithm):
    # bf16 parameters with f32 gradients, run op by op (no outer jit).
    run_both(algorithm, "bf16", CASES["clip_wd"], grad_dtype=jnp.float32, jit=False, steps=2)


def test_dynamic_scaler_actually_moved():
    ref, _, history = run_both("lomo", "f32", CASES["dynamic_skip"], steps=8)
    # Window 2: grows after clean steps, backs off after the injected overflow (step 2).
    scales = [h[0] for h in history]
    assert ref.info().skipped_total == 1
    assert any(b > a for a, b in zip(scales, scales[1:])), scales
    assert scales[3] < scales[2], scales


@pytest.mark.parametrize("algorithm", ["lomo", "adalomo"])
def test_functional_ops_with_groups_equal_c_api(algorithm):
    """The per-tensor operations called directly (no pytree helper), each tensor with its own
    lr multiplier and weight decay (C API groups), static loss scale, value clipping."""
    shapes = [(6, 4), (9,), (3, 2, 2)]
    groups = {1: (0.5, 0.3), 2: (2.0, 0.0), 3: (1.0, 0.05)}
    params = make_params(jnp.float16, seed=5, shapes=shapes)
    opts = dict(loss_scale_mode="static", loss_scale=64.0, clip_grad_value=0.3)
    ref = CApiOptimizer(algorithm, params, group_of=[1, 2, 3], groups=groups, **opts)
    jp = [jnp.asarray(p) for p in params]
    st = [lj.adalomo_state(p) for p in jp]
    for t in range(3):
        grads = make_grads(params, t, 64.0, jnp.float16)
        ref.step(grads, LRS[t])
        for i, g in enumerate(grads):
            mult, wd = groups[i + 1]
            kw = dict(lr=LRS[t], step=t + 1, loss_scale=64.0, weight_decay=wd,
                      clip_grad_value=0.3, lr_multiplier=mult, param_id=i)
            if algorithm == "lomo":
                jp[i], ok = lj.lomo_update(jp[i], jnp.asarray(g), **kw)
            else:
                jp[i], st[i], ok = lj.adalomo_update(jp[i], jnp.asarray(g), st[i], **kw)
            assert bool(ok)
        for a, b in zip(jp, ref.params):
            assert np.array_equal(bits(a), bits(b)), "step %d differs" % t


def test_grad_sum_sq_against_numpy():
    rng = np.random.default_rng(3)
    grads = [rng.normal(size=s).astype(np.float32) for s in [(3, 4), (5,), (), (0, 2)]]
    scale = 8.0
    total = sum(float(np.sum((g.astype(np.float64) / scale) ** 2)) for g in grads)
    sum_sq, coef, finite = lj.grad_sum_sq([jnp.asarray(g) for g in grads], loss_scale=scale,
                                          clip_grad_norm=0.1)
    assert bool(finite)
    np.testing.assert_allclose(float(sum_sq), total, rtol=1e-6)
    np.testing.assert_allclose(float(coef), min(1.0, 0.1 / (np.sqrt(total) + 1e-6)), rtol=1e-6)
    _, coef_off, _ = lj.grad_sum_sq([jnp.asarray(g) for g in grads])
    assert float(coef_off) == 1.0
    grads[1][2] = np.nan
    sum_sq, coef, finite = lj.grad_sum_sq([jnp.asarray(g) for g in grads], clip_grad_norm=1.0)
    assert not bool(finite) and np.isnan(float(coef)) and np.isnan(float(sum_sq))


def test_skip_and_nonfinite_leave_everything_unchanged():
    p = jnp.asarray(make_params(jnp.float32, shapes=[(4, 3)])[0])
    g = jnp.ones((4, 3), jnp.float32)
    state = lj.adalomo_state(p)
    p2, s2, ok = lj.adalomo_update(p, g, state, lr=0.1, step=1, clip_coef=jnp.float32(np.nan))
    assert not bool(ok) and np.array_equal(p2, p) and all(np.all(s == 0) for s in s2)
    bad = g.at[1, 1].set(jnp.inf)
    p3, ok3 = lj.lomo_update(p, bad, lr=0.1)
    assert not bool(ok3) and np.array_equal(p3, p)
    p4, s4, ok4 = lj.adalomo_update(p, bad, state, lr=0.1, step=1)
    assert not bool(ok4) and np.array_equal(p4, p) and all(np.all(s == 0) for s in s4)


def test_zero_size_tensor_is_a_no_op():
    p = jnp.zeros((0, 3), jnp.bfloat16)
    state = lj.adalomo_state(p)
    p2, s2, ok = lj.adalomo_update(p, p, state, lr=0.1, step=1)
    assert bool(ok) and p2.shape == (0, 3) and s2[1].shape == (3,)


# ---------------------------------------------------------------------------------------------
# In-place updates


def test_donated_params_and_state_are_updated_in_place():
    p = jnp.asarray(make_params(jnp.bfloat16, shapes=[(64, 32)])[0])
    g = jnp.ones_like(p)
    row, col = lj.adalomo_state(p)
    ptrs = [x.unsafe_buffer_pointer() for x in (p, row, col)]

    @jax.jit
    def plain(p, g, row, col):
        p2, (r2, c2), _ = lj.adalomo_update(p, g, (row, col), lr=1e-2, step=1)
        return p2, r2, c2

    donated = jax.jit(plain.__wrapped__, donate_argnums=(0, 2, 3))
    # Without donation: new buffers, inputs intact.
    out = plain(p, g, row, col)
    assert all(o.unsafe_buffer_pointer() != q for o, q in zip(out, ptrs))
    assert not p.is_deleted()
    # With donation: the results live in the donated buffers.
    out2 = donated(p, g, row, col)
    assert [o.unsafe_buffer_pointer() for o in out2] == ptrs
    assert p.is_deleted() and row.is_deleted() and col.is_deleted()
    for a, b in zip(out, out2):
        assert np.array_equal(bits(a), bits(b))


def test_pytree_step_in_place_with_donation():
    opt = lj.lomo()
    params = {"w": jnp.ones((8, 8), jnp.float32), "b": jnp.zeros((8,), jnp.float32)}
    state = opt.init(params)
    ptrs = {k: v.unsafe_buffer_pointer() for k, v in params.items()}
    step = jax.jit(opt.step, donate_argnums=(0, 2))
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    new, state = step(params, grads, state, 0.1)
    assert {k: v.unsafe_buffer_pointer() for k, v in new.items()} == ptrs
    np.testing.assert_array_equal(new["w"], np.full((8, 8), 0.9, np.float32))


# ---------------------------------------------------------------------------------------------
# Errors


def raw_call(target, results, *args, **attrs):
    lj.register()
    return jax.ffi.ffi_call(target, results)(*args, **attrs)


def scalars():
    return (jnp.float32(0.1), jnp.float32(1.0), jnp.float32(1.0), jnp.int32(1))


def test_errors_surface_as_python_exceptions():
    p = jnp.ones((4, 3), jnp.float32)
    with pytest.raises(Exception, match="lr must be finite and >= 0, got -1"):
        lj.lomo_update(p, p, lr=-1.0)[0].block_until_ready()
    with pytest.raises(Exception, match=r"step must be >= 1"):
        lj.lomo_update(p, p, lr=0.1, step=0)[0].block_until_ready()
    with pytest.raises(Exception, match="decay_rate must be < 0"):
        lj.adalomo_update(p, p, lj.adalomo_state(p), lr=0.1, step=1, decay_rate=0.5)[
            0
        ].block_until_ready()
    with pytest.raises(Exception, match="loss_scale must be finite and > 0"):
        lj.grad_sum_sq([p], loss_scale=0.0)[0].block_until_ready()
    out = (jax.ShapeDtypeStruct((4, 3), jnp.float32), jax.ShapeDtypeStruct((), jnp.bool_))
    with pytest.raises(Exception, match=r"grad shape must equal the parameter's"):
        raw_call("lomo_lomo_update", out, p, jnp.ones((3, 4)), *scalars())[0].block_until_ready()
    with pytest.raises(Exception, match=r"param must be f32, f16 or bf16, got s32\[4,3\]"):
        pi = jnp.ones((4, 3), jnp.int32)
        res = (jax.ShapeDtypeStruct((4, 3), jnp.int32), out[1])
        raw_call("lomo_lomo_update", res, pi, p, *scalars())[0].block_until_ready()
    with pytest.raises(Exception, match=r"unknown attribute\(s\) \[\"lr\"\]"):
        raw_call("lomo_lomo_update", out, p, p, *scalars(), lr=np.float64(0.1))[
            0
        ].block_until_ready()
    with pytest.raises(Exception, match=r"expected 6 operands and 2 results"):
        raw_call("lomo_lomo_update", out, p, p)[0].block_until_ready()
    with pytest.raises(Exception, match=r"row state must be f32\[4\]"):
        res = (out[0], jax.ShapeDtypeStruct((3,), jnp.float32),
               jax.ShapeDtypeStruct((3,), jnp.float32), out[1])
        raw_call("lomo_adalomo_update", res, p, p, jnp.zeros(3), jnp.zeros(3), *scalars())[
            0
        ].block_until_ready()
    with pytest.raises(TypeError, match="param must be float32"):
        lj.lomo_update(jnp.ones(3, jnp.int32), jnp.ones(3), lr=0.1)
    with pytest.raises(ValueError, match="rounding"):
        lj.lomo_update(p, p, lr=0.1, rounding="up")
    # The process survives and the library still works.
    assert bool(lj.lomo_update(p, p, lr=0.1)[1])


# ---------------------------------------------------------------------------------------------
# A small training loop


def mlp_problem(dtype):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype(np.float32)
    w_true = rng.normal(size=(8, 1)).astype(np.float32)
    y = np.tanh(x @ w_true) + 0.05 * rng.normal(size=(256, 1)).astype(np.float32)
    params = {
        "l1": {"w": rng.normal(size=(8, 32)) * 0.3, "b": np.zeros(32)},
        "l2": {"w": rng.normal(size=(32, 1)) * 0.3, "b": np.zeros(1)},
    }
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)

    def loss_fn(p, x, y):
        h = jnp.tanh(x.astype(dtype) @ p["l1"]["w"] + p["l1"]["b"])
        out = h @ p["l2"]["w"] + p["l2"]["b"]
        return jnp.mean((out.astype(jnp.float32) - y) ** 2)

    return params, loss_fn, jnp.asarray(x), jnp.asarray(y)


@pytest.mark.parametrize(
    "algorithm,dtype,lr",
    [("adalomo", jnp.float32, 1e-2), ("lomo", jnp.float32, 0.1), ("adalomo", jnp.bfloat16, 2e-2)],
)
def test_training_loop_loss_falls(algorithm, dtype, lr):
    params, loss_fn, x, y = mlp_problem(dtype)
    mask = jax.tree_util.tree_map(lambda a: a.ndim >= 2, params)
    opt = lj.Optimizer(algorithm, clip_grad_norm=1.0, weight_decay=1e-3, weight_decay_mask=mask)
    state = opt.init(params)

    @jax.jit
    def train_step(params, state, x, y):
        scale = opt.loss_scale(state)
        loss, grads = jax.value_and_grad(lambda p: loss_fn(p, x, y) * scale)(params)
        params, state = opt.step(params, grads, state, lr)
        return params, state, loss / scale

    train_step = jax.jit(train_step.__wrapped__, donate_argnums=(0, 1))
    losses = []
    for _ in range(60):
        params, state, loss = train_step(params, state, x, y)
        losses.append(float(loss))
    assert int(state.step) == 60
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_example_script_runs():
    import subprocess

    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
    out = subprocess.run(
        [sys.executable, os.path.join(root, "examples", "python", "jax_train.py"), "--steps", "30"],
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
    assert "adalomo, float32 params: 30 steps" in out.stdout, out.stdout
