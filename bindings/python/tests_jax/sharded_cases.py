"""Multi-device cases of lomo_native.jax under shard_map and jit, run by test_jax_sharded.py in a
subprocess (XLA_FLAGS must give the host devices before jax is imported).

Usage: python sharded_cases.py N_DEVICES X64(0|1). Prints one JSON object {case: "ok" | error}.
Each case compares the sharded step with independent references: the unsharded
``Optimizer.step`` (whole arrays on one device) and the C API (jax_capi_ref.py)."""

import json
import os
import sys
import traceback

N = int(sys.argv[1])
X64 = sys.argv[2] == "1"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=%d" % N
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", X64)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
import lomo_native.jax as lj  # noqa: E402
from jax_capi_ref import CApiOptimizer  # noqa: E402

if N == 2:
    MESH = jax.make_mesh((2,), ("x",))
    ROWS2 = "x"  # the "several axes" spec falls back to one axis on a 1-D mesh
else:
    MESH = jax.make_mesh((2, 2), ("x", "y"))
    ROWS2 = ("x", "y")

# name: (shape, spec); uneven: odd widths and piece sizes where shard_map allows.
LAYOUT = {
    "w_rows": ((8, 12), P(ROWS2, None)),
    "w_cols": ((6, 8), P(None, "x")),
    "w_cols_y": ((5, 4 * (N // 2) * 2), P(None, "y" if N == 4 else "x")),
    "w_rank3": ((4, 3, 5), P("x", None, None)),
    "bias": ((4 * N,), P(ROWS2)),
    "w_repl": ((5, 7), P()),
    "w_uneven_rows": ((2 * N, 7), P(ROWS2, None)),
    "w_uneven_cols": ((3, 2 * N + 2 * N), P(None, ROWS2)),
}
NAMES = sorted(LAYOUT)


def make(seed, dtype=np.float32, dyadic=True, scale=1.0):
    rng = np.random.default_rng(seed)
    out = {}
    for k in NAMES:
        shape = LAYOUT[k][0]
        if dyadic:
            v = rng.integers(-16, 17, size=shape) / 16.0 * scale
        else:
            v = rng.standard_normal(shape) * scale
        out[k] = np.asarray(v, dtype)
    return out


SPECS = {k: LAYOUT[k][1] for k in NAMES}


def put(tree, specs):
    return jax.tree_util.tree_map(
        lambda a, s: jax.device_put(a, NamedSharding(MESH, s)),
        tree,
        specs,
        is_leaf=lambda x: isinstance(x, P),
    )


def sharded_fn(opt, params):
    sspecs = opt.state_specs(params, SPECS)

    def body(p, g, s, lr):
        return opt.sharded_step(p, g, s, lr, SPECS)

    sm = jax.shard_map(
        body, mesh=MESH, in_specs=(SPECS, SPECS, sspecs, P()), out_specs=(SPECS, sspecs)
    )
    return jax.jit(sm, donate_argnums=(0, 2)), sspecs


def equal(a, b, exact, what, rtol=2e-6):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if exact:
        if not np.array_equal(a, b, equal_nan=True):
            raise AssertionError("%s: max |diff| %g (want bitwise)" % (what, np.nanmax(abs(a - b))))
    elif not np.allclose(a, b, rtol=rtol, atol=1e-6, equal_nan=True):
        raise AssertionError("%s: max |diff| %g" % (what, np.nanmax(abs(a - b))))


def run_parity(algorithm, steps=3, dtype=np.float32, dyadic=True, nonfinite_at=None, **options):
    """Sharded vs unsharded Optimizer.step for `steps` steps, every array compared."""
    opt = getattr(lj, algorithm)(**options)
    params = make(1, dtype, dyadic)
    ref_p = {k: jnp.asarray(v) for k, v in params.items()}
    ref_s = opt.init(ref_p)
    step_ref = jax.jit(opt.step)
    fn, sspecs = sharded_fn(opt, ref_p)
    sh_p = put({k: jnp.asarray(v) for k, v in params.items()}, SPECS)
    sh_s = put(opt.init(ref_p), sspecs)
    # Bit for bit: LOMO always (dyadic inputs, f64 records); AdaLomo when its statistics are
    # exact sums — x = g·coef dyadic (the norm clip inactive: coef 1) and the update clip
    # inactive (Σu² sums x²/row, not dyadic) — since a split tensor groups its f32 partial sums
    # differently; otherwise within a few f32 ulps. After one AdaLomo step the parameters are no
    # longer dyadic (Σp² for RMS(p)): later steps agree to f32 rounding.
    exact_stats = options.get("clip_threshold", 1.0) >= 1e3 and options.get(
        "clip_grad_norm", 0.0
    ) in (0.0, 1e6)
    exact0 = X64 and dyadic and (algorithm == "lomo" or exact_stats)
    for t in range(steps):
        grads = make(10 + t, dtype, dyadic, scale=4.0)
        if nonfinite_at == t:
            grads["w_cols"][0, -1] = np.inf  # on the last device's piece only
        scale = float(ref_s.loss_scale)
        gs = {k: jnp.asarray(v * np.asarray(scale, v.dtype)) for k, v in grads.items()}
        exact = exact0 and (algorithm == "lomo" or t == 0)
        ref_p, ref_s = step_ref(ref_p, gs, ref_s, 0.05)
        sh_p, sh_s = fn(sh_p, put(gs, SPECS), sh_s, 0.05)
        for k in NAMES:
            equal(sh_p[k], ref_p[k], exact, "step %d %s" % (t, k))
            if sh_p[k].sharding.spec != NamedSharding(MESH, SPECS[k]).spec and SPECS[k] != P():
                raise AssertionError("%s lost its sharding: %s" % (k, sh_p[k].sharding))
        for a, b in zip(jax.tree_util.tree_leaves(sh_s), jax.tree_util.tree_leaves(ref_s)):
            equal(a, b, exact, "step %d state" % t)
    return opt, sh_p, ref_p


def case_adalomo_all_options():
    run_parity(
        "adalomo",
        clip_grad_norm=1.0,
        weight_decay=0.01,
        clip_grad_value=3.0,
        clip_threshold=0.5,
    )


def case_adalomo_bitwise():
    # Every statistic but Σu² is exact on dyadic inputs: bit for bit without the update clip.
    run_parity("adalomo", clip_grad_norm=1e6, weight_decay=0.01, clip_threshold=1e4)
    run_parity("adalomo", nonfinite_at=1, loss_scale_mode="dynamic", clip_threshold=1e4)


def case_adalomo_nondyadic():
    run_parity("adalomo", dyadic=False, clip_grad_norm=1.0, weight_decay=0.01)


def case_lomo_all_options():
    run_parity("lomo", clip_grad_norm=1.0, weight_decay=0.01, clip_grad_value=3.0)


def case_lomo_no_norm_nonfinite_piece():
    # No NORM phase: the tensor with a non-finite piece is skipped on every device.
    run_parity("lomo", nonfinite_at=1)


def case_adalomo_dynamic_scaling_overflow():
    opt, _, _ = run_parity(
        "adalomo",
        steps=4,
        nonfinite_at=1,
        loss_scale_mode="dynamic",
        loss_scale=2.0**8,
        scale_window=2,
        clip_grad_norm=1.0,
    )


def case_adalomo_dynamic_no_norm():
    run_parity("adalomo", steps=3, nonfinite_at=0, loss_scale_mode="dynamic", loss_scale=4.0)


def case_stochastic_rounding_bf16():
    for alg in ("lomo", "adalomo"):
        run_parity(alg, dtype=jnp.bfloat16, dyadic=False, rounding="stochastic", seed=7)


def case_capi_parity():
    """The sharded AdaLomo step against the C API on whole NumPy arrays."""
    # The NORM phase runs (coefficient 1), the update clip is inactive: exact statistics.
    options = dict(
        clip_grad_norm=1e6, weight_decay=0.01, clip_threshold=1e4, loss_scale_mode="none"
    )
    opt = lj.adalomo(**options)
    params = make(1)
    capi = CApiOptimizer("adalomo", [params[k] for k in NAMES], **options)
    fn, sspecs = sharded_fn(opt, params)
    sh_p = put({k: jnp.asarray(v) for k, v in params.items()}, SPECS)
    sh_s = put(opt.init(params), sspecs)
    for t in range(2):
        grads = make(20 + t, scale=4.0)
        capi.step([grads[k] for k in NAMES], 0.05)
        sh_p, sh_s = fn(sh_p, put(grads, SPECS), sh_s, 0.05)
        for i, k in enumerate(NAMES):
            equal(sh_p[k], capi.params[i], X64 and t == 0, "C API step %d %s" % (t, k))


def case_donation_in_place():
    opt = lj.adalomo(clip_grad_norm=1.0)
    params = {k: jnp.asarray(v) for k, v in make(1).items()}
    fn, sspecs = sharded_fn(opt, params)
    sh_p = put(params, SPECS)
    sh_s = put(opt.init(params), sspecs)
    grads = put({k: jnp.asarray(v) for k, v in make(5).items()}, SPECS)
    sh_p, sh_s = fn(sh_p, grads, sh_s, 0.01)  # compile
    before = {
        k: sorted(s.data.unsafe_buffer_pointer() for s in sh_p[k].addressable_shards)
        for k in NAMES
    }
    old = sh_p
    sh_p, sh_s = fn(sh_p, grads, sh_s, 0.01)
    for k in NAMES:
        after = sorted(s.data.unsafe_buffer_pointer() for s in sh_p[k].addressable_shards)
        if after != before[k]:
            raise AssertionError("%s was not updated in place" % k)
        if not old[k].is_deleted():
            raise AssertionError("%s: the donated input is still alive" % k)


def case_jit_sharded_keeps_sharding():
    """Plain jax.jit(opt.step) on sharded arrays: the same numbers as the unsharded step, the
    inputs' shardings kept (no all-gather), the donated buffers updated in place."""
    for alg, options in (
        ("adalomo", dict(clip_grad_norm=1e6, clip_threshold=1e4, weight_decay=0.01)),
        ("adalomo", dict(clip_grad_norm=1.0, loss_scale_mode="dynamic", loss_scale=16.0)),
        ("lomo", dict(clip_grad_norm=1.0, weight_decay=0.01)),
        ("lomo", dict(rounding="stochastic", seed=3)),
    ):
        opt = getattr(lj, alg)(**options)
        exact = X64 and (alg == "lomo" or options.get("clip_grad_norm") != 1.0)
        params = {k: jnp.asarray(v) for k, v in make(1).items()}
        ref_p, ref_s = params, opt.init(params)
        sspecs = opt.state_specs(params, SPECS)
        sh_p, sh_s = put(params, SPECS), put(opt.init(params), sspecs)
        step = jax.jit(opt.step, donate_argnums=(0, 2))
        for t in range(2):
            g = {k: jnp.asarray(v) for k, v in make(30 + t, scale=4.0).items()}
            if t == 1 and alg == "adalomo" and "loss_scale" in options:
                g["w_rows"] = g["w_rows"].at[-1, 0].set(jnp.inf)  # the last device's piece
            g = {k: v * ref_s.loss_scale for k, v in g.items()}
            ref_p, ref_s = jax.jit(opt.step)(ref_p, g, ref_s, 0.05)
            ptrs = {k: sorted(s.data.unsafe_buffer_pointer() for s in sh_p[k].addressable_shards)
                    for k in NAMES}
            old = sh_p
            sh_p, sh_s = step(sh_p, put(g, SPECS), sh_s, 0.05)
            for k in NAMES:
                equal(sh_p[k], ref_p[k], exact and t == 0, "jit %s step %d %s" % (alg, t, k))
                want = NamedSharding(MESH, SPECS[k])
                if not sh_p[k].sharding.is_equivalent_to(want, len(LAYOUT[k][0])):
                    raise AssertionError("%s: sharding %s, want %s" % (k, sh_p[k].sharding, want))
                got = sorted(s.data.unsafe_buffer_pointer() for s in sh_p[k].addressable_shards)
                if t > 0 and (got != ptrs[k] or not old[k].is_deleted()):
                    raise AssertionError("%s was not updated in place under jit" % k)
            for a, b in zip(jax.tree_util.tree_leaves(sh_s), jax.tree_util.tree_leaves(ref_s)):
                equal(a, b, exact and t == 0, "jit %s step %d state" % (alg, t))
            for a, sp in zip(jax.tree_util.tree_leaves(sh_s.ada), jax.tree_util.tree_leaves(
                    sspecs.ada, is_leaf=lambda x: isinstance(x, P))):
                if not a.sharding.is_equivalent_to(NamedSharding(MESH, sp), a.ndim):
                    raise AssertionError("state sharding %s, want %s" % (a.sharding, sp))


def case_jit_block_refused():
    """A parameter split over two dimensions cannot be kept: a clear error, never an
    all-gather."""
    if N != 4:
        return
    opt = lj.adalomo()
    p = {"w": jnp.ones((4, 6), jnp.float32)}
    sh = put(p, {"w": P("x", "y")})
    try:
        jax.jit(opt.step)(sh, sh, opt.init(p), 0.01)
    except Exception as e:  # noqa: BLE001 - XLA wraps the partitioner's error
        if "2-D block" not in str(e) or "shard_map" not in str(e):
            raise AssertionError("unclear error: %s" % str(e)[:500])
    else:
        raise AssertionError("a 2-D block was accepted")


def case_optax_sharded_loss_falls():
    """A sharded training loop (linear regression, rows of W over the mesh) where the loss
    falls; the gradient of each piece is computed locally, the loss psum'd."""
    opt = lj.adalomo(clip_grad_norm=1.0)
    rng = np.random.default_rng(0)
    d_in, d_out = 8, 4 * N
    w_true = rng.standard_normal((d_out, d_in)).astype(np.float32)
    x = rng.standard_normal((64, d_in)).astype(np.float32)
    y = x @ w_true.T
    params = {"w": jnp.asarray(0.5 * rng.standard_normal((d_out, d_in)), jnp.float32)}
    specs = {"w": P(ROWS2, None)}
    sspecs = opt.state_specs(params, specs)

    def train(p, s, xb, yb):
        def loss_fn(p):
            pred = xb @ p["w"].T  # this device's output rows
            return jnp.sum((pred - yb) ** 2) / yb.size

        loss, g = jax.value_and_grad(loss_fn)(p)
        p, s = opt.sharded_step(p, g, s, 0.1, specs)
        return p, s, jax.lax.psum(loss, ROWS2)

    fn = jax.jit(
        jax.shard_map(
            train,
            mesh=MESH,
            in_specs=(specs, sspecs, P(), P(None, ROWS2)),
            out_specs=(specs, sspecs, P()),
        )
    )
    p = put(params, specs)
    s = put(opt.init(params), sspecs)
    yb = jax.device_put(y, NamedSharding(MESH, P(None, ROWS2)))
    losses = []
    for _ in range(60):
        p, s, loss = fn(p, s, x, yb)
        losses.append(float(loss))
    if not losses[-1] < 0.3 * losses[0]:
        raise AssertionError("loss did not fall: %s" % losses[::10])


def case_functional_errors():
    """The split-phase operations refuse inconsistent pieces and missing rounds before running."""
    p = jnp.ones((4, 6), jnp.float32)
    st = (jnp.zeros((4,), jnp.float32), jnp.zeros((3,), jnp.float32))
    try:
        lj.adalomo_piece_apply(
            p[:, :3], p[:, :3], st, [], piece=0, layout="cols", global_shape=(4, 6), lr=0.1, step=1
        )
    except Exception as e:  # noqa: BLE001
        if "round" not in str(e):
            raise
    else:
        raise AssertionError("apply without the reduced records ran")
    try:
        lj.lomo_piece_stats(p, p, piece=0, layout="cols", global_shape=(4, 5), lr=0.1)
    except ValueError:
        pass
    else:
        raise AssertionError("a piece that does not fit was accepted")


CASES = {k[5:]: v for k, v in sorted(globals().items()) if k.startswith("case_")}

if __name__ == "__main__":
    results = {}
    only = sys.argv[3:] or list(CASES)
    for name in only:
        try:
            CASES[name]()
            results[name] = "ok"
        except Exception:  # noqa: BLE001 - reported to the pytest side
            results[name] = traceback.format_exc()[-3000:]
    print("RESULTS " + json.dumps(results))
