"""More multi-device cases (run like sharded_cases.py, whose mesh, layouts and helpers they
share: ``python sharded_user_cases.py N_DEVICES X64``): a whole-tensor step inside shard_map on
a device's pieces is refused (it silently took per-piece statistics), specs that contradict
shard_map's are refused, a data-parallel whole-tensor step inside shard_map still runs, and the
optax form under jax.jit on sharded parameters (chain, schedule, MultiSteps) keeps the
sharding, updates donated buffers in place and matches the C API / the unsharded run."""

import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# sharded_cases sets XLA_FLAGS from argv before it imports jax
from sharded_cases import MESH, NAMES, SPECS, equal, make, put  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import lomo_native.jax as lj  # noqa: E402
from jax_capi_ref import CApiOptimizer  # noqa: E402


def _expect_refusal(fn, *words):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the type is checked below
        msg = str(e)
        if not all(w in msg for w in words):
            raise AssertionError("unclear error (want %s): %s" % (words, msg[:600]))
        return e
    raise AssertionError("ran without complaint")


def case_whole_step_on_pieces_refused():
    """opt.step, the optax form and the whole-tensor functions inside shard_map on a device's
    pieces computed the norm and AdaLomo's statistics per piece (0.03 off after one step, no
    error): refused, pointing to sharded_step."""
    opt = lj.adalomo(clip_grad_norm=1.0)
    params = {k: jnp.asarray(v) for k, v in make(1, dyadic=False).items()}
    grads = {k: jnp.asarray(v) for k, v in make(2, dyadic=False).items()}
    sspecs = opt.state_specs(params, SPECS)
    sh_p, sh_g = put(params, SPECS), put(grads, SPECS)
    sh_s = put(opt.init(params), sspecs)

    def smap(body, in_specs, out_specs):
        return jax.jit(jax.shard_map(body, mesh=MESH, in_specs=in_specs, out_specs=out_specs))

    f = smap(lambda p, g, s: opt.step(p, g, s, 0.05), (SPECS, SPECS, sspecs), (SPECS, sspecs))
    e = _expect_refusal(lambda: f(sh_p, sh_g, sh_s), "sharded_step", "shard_map")
    if not isinstance(e, lj.ShardedOperandError):
        raise AssertionError("want ShardedOperandError, got %r" % (e,))
    import optax

    tx = lj.optax.adalomo(0.05)

    def optax_body(p, g):
        u, _ = tx.update(g, tx.init(p), p)
        return optax.apply_updates(p, u)

    f = smap(optax_body, (SPECS, SPECS), SPECS)
    _expect_refusal(lambda: f(sh_p, sh_g), "sharded_step")
    spec = SPECS["w_cols"]
    f = smap(lambda p, g: lj.lomo_update(p, g, lr=0.1)[0], (spec, spec), spec)
    _expect_refusal(lambda: f(sh_p["w_cols"], sh_g["w_cols"]), "sharded_step")
    f = smap(lambda g: lj.grad_sum_sq(g)[0], (spec,), P())
    _expect_refusal(lambda: f(sh_g["w_cols"]), "sharded_step")


def case_data_parallel_whole_step_in_shard_map():
    """Replicated parameters with gradients reduced by pmean: opt.step inside shard_map is
    right (no false refusal) and equals the C API on the mean gradient."""
    options = dict(clip_grad_norm=1.0, weight_decay=0.01, loss_scale_mode="none")
    opt = lj.adalomo(**options)
    params = make(1, dyadic=False)
    n = MESH.size
    rng = np.random.default_rng(5)
    per_dev = {k: rng.standard_normal((n,) + v.shape).astype(np.float32) for k, v in params.items()}
    capi = CApiOptimizer("adalomo", [params[k] for k in NAMES], **options)
    mean = {k: jnp.mean(jnp.asarray(per_dev[k]), axis=0) for k in NAMES}
    capi.step([np.asarray(mean[k]) for k in NAMES], 0.05)
    axes = tuple(MESH.axis_names)
    repl = {k: P() for k in NAMES}
    stacked = {k: P(axes) for k in NAMES}
    sspecs = opt.state_specs(params, repl)

    def body(p, g, s):
        g = jax.tree_util.tree_map(lambda a: jax.lax.pmean(a[0], axes), g)
        return opt.step(p, g, s, 0.05)

    f = jax.jit(jax.shard_map(body, mesh=MESH, in_specs=(repl, stacked, sspecs),
                              out_specs=(repl, sspecs)))
    out, _ = f(put({k: jnp.asarray(v) for k, v in params.items()}, repl),
               put({k: jnp.asarray(v) for k, v in per_dev.items()}, stacked),
               put(opt.init(params), sspecs))
    for i, k in enumerate(NAMES):
        equal(out[k], capi.params[i], False, "data parallel %s" % k, rtol=1e-5)


def case_sharded_step_specs_contradict_shard_map():
    """sharded_step given specs other than the ones shard_map split the arrays by (a piece
    declared replicated, a replicated array declared split): refused before anything runs."""
    opt = lj.adalomo(clip_grad_norm=1.0)
    p = {"b": jnp.ones((4,), jnp.float32), "w": jnp.ones((8, 4), jnp.float32)}
    row = {"b": P(), "w": P("x", None)}
    repl = {"b": P(), "w": P()}
    for real, declared in ((row, repl), (repl, row)):
        ss = opt.state_specs(p, declared)
        f = jax.jit(jax.shard_map(lambda p, g, s: opt.sharded_step(p, g, s, 0.1, declared),
                                  mesh=MESH, in_specs=(real, real, ss), out_specs=(declared, ss)))
        args = (put(p, real), put(p, real), put(opt.init(p), ss))
        _expect_refusal(lambda: f(*args), "PartitionSpec", "in_specs")


def _optax_jit_parity(tx_of, reference, dtype, steps=3, donate=True):
    import optax

    tx = tx_of()
    params = make(1, dtype, dyadic=False)
    sh_p = put({k: jnp.asarray(v) for k, v in params.items()}, SPECS)
    sh_s = tx.init(sh_p)

    def upd(p, g, s):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    f = jax.jit(upd, donate_argnums=(0, 2) if donate else ())
    for t in range(steps):
        grads = make(40 + t, dtype, dyadic=False, scale=2.0)
        ptrs = {k: sorted(s.data.unsafe_buffer_pointer() for s in sh_p[k].addressable_shards)
                for k in NAMES}
        old = sh_p
        sh_p, sh_s = f(sh_p, put({k: jnp.asarray(v) for k, v in grads.items()}, SPECS), sh_s)
        jax.block_until_ready(sh_p)  # one step at a time (host-device collectives)
        ref = reference(grads, t)
        for k in NAMES:
            rtol = 2e-6 if dtype == np.float32 else 2.0**-7
            equal(sh_p[k], ref[k], False, "optax step %d %s" % (t, k), rtol=rtol)
            want = NamedSharding(MESH, SPECS[k])
            if not sh_p[k].sharding.is_equivalent_to(want, sh_p[k].ndim):
                raise AssertionError("%s: sharding %s, want %s" % (k, sh_p[k].sharding, want))
            got = sorted(s.data.unsafe_buffer_pointer() for s in sh_p[k].addressable_shards)
            if donate and t > 0 and (got != ptrs[k] or not old[k].is_deleted()):
                raise AssertionError("%s was not updated in place (optax form)" % k)
    return sh_s


def case_optax_jit_sharded_chain_schedule():
    """optax.chain(clip_by_global_norm, lomo_optax.adalomo(schedule)) / lomo under jax.jit on
    sharded parameters, f32 and bf16: the C API's step on whole arrays (clip_by_global_norm
    taken by optax on the whole gradients), the parameters' and the state's sharding kept."""
    import optax

    sched = optax.linear_schedule(0.05, 0.01, 3)
    for alg, dtype, options in (
        ("adalomo", np.float32, dict(clip_grad_norm=0.5, weight_decay=0.01)),
        ("lomo", jnp.bfloat16, dict(weight_decay=0.01)),
    ):
        capi = CApiOptimizer(alg, [make(1, dtype, dyadic=False)[k] for k in NAMES],
                             loss_scale_mode="none", **options)

        def reference(grads, t):
            g = [jnp.asarray(grads[k]) for k in NAMES]
            g, _ = optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())
            capi.step([np.asarray(a) for a in g], float(sched(t)))
            return dict(zip(NAMES, capi.params))

        def tx_of():
            return optax.chain(optax.clip_by_global_norm(1.0),
                               getattr(lj.optax, alg)(sched, **options))

        state = _optax_jit_parity(tx_of, reference, dtype)
        ada = jax.tree_util.tree_leaves(state[1].inner.ada)
        want = jax.tree_util.tree_leaves(getattr(lj, alg)(**options).state_specs(
            make(1), SPECS).ada, is_leaf=lambda x: isinstance(x, P))
        for a, sp in zip(ada, want):
            if not a.sharding.is_equivalent_to(NamedSharding(MESH, sp), a.ndim):
                raise AssertionError("AdaLomo state sharding %s, want %s" % (a.sharding, sp))


def case_optax_jit_sharded_multisteps():
    """optax.MultiSteps(adalomo, 2) under jax.jit on sharded parameters against the same
    transformation on whole arrays on one device."""
    import optax

    def tx_of():
        return optax.MultiSteps(lj.optax.adalomo(0.05, clip_grad_norm=1.0), 2)

    tx = tx_of()
    ref_p = {k: jnp.asarray(v) for k, v in make(1, dyadic=False).items()}
    ref_s = tx.init(ref_p)

    @jax.jit
    def ref_step(p, g, s):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    def reference(grads, t):
        nonlocal ref_p, ref_s
        ref_p, ref_s = ref_step(ref_p, {k: jnp.asarray(v) for k, v in grads.items()}, ref_s)
        return ref_p

    _optax_jit_parity(tx_of, reference, np.float32, steps=4)


def _other_spec(shape, spec):
    """A different split of the same array: its other dimension over the mesh's last axis
    where that divides it, else replicated."""
    ax = MESH.axis_names[-1]
    n = MESH.shape[ax]
    split = [d for d, e in enumerate(tuple(spec)) if e is not None]
    if len(shape) >= 2:
        d = 1 if split == [0] else 0
        if shape[d] % n == 0:
            return P(*[ax if i == d else None for i in range(len(shape))])
    elif len(shape) == 1 and not split and shape[0] % n == 0:
        return P(ax)
    return P()


def case_jit_operands_sharded_otherwise():
    """jax.jit(opt.step) with gradients and AdaLomo state sharded otherwise than the parameter
    (e.g. the gradient of a row-split weight split over its columns): Shardy propagated the
    gradient's split into the parameter through the shared factors of the sharding rule, the
    parameter and state came out as 2-D blocks (donation lost) and the next step was refused
    as a 2-D block. Now the parameter's sharding is kept, state resharded to state_specs, in
    place, equal to the unsharded step."""
    for alg in ("adalomo", "lomo"):
        opt = getattr(lj, alg)(clip_grad_norm=1.0, weight_decay=0.01)
        params = {k: jnp.asarray(v) for k, v in make(1).items()}
        ref_p, ref_s = params, opt.init(params)
        sspecs = opt.state_specs(params, SPECS)
        gspecs = {k: _other_spec(params[k].shape, SPECS[k]) for k in NAMES}
        odd_state = opt.init(params)._replace(ada=tuple(
            tuple(jax.device_put(a, NamedSharding(MESH, _other_spec(a.shape, sp)))
                  for a, sp in zip(st, ssp))
            for st, ssp in zip(opt.init(params).ada, sspecs.ada)))
        sh_p, sh_s = put(params, SPECS), odd_state
        step = jax.jit(opt.step, donate_argnums=(0, 2))
        for t in range(3):
            g = {k: jnp.asarray(v) for k, v in make(50 + t, scale=4.0).items()}
            ref_p, ref_s = jax.jit(opt.step)(ref_p, g, ref_s, 0.05)
            ptrs = {k: sorted(s.data.unsafe_buffer_pointer() for s in sh_p[k].addressable_shards)
                    for k in NAMES}
            old = sh_p
            sh_p, sh_s = step(sh_p, put(g, gspecs), sh_s, 0.05)
            jax.block_until_ready(sh_p)
            for k in NAMES:
                equal(sh_p[k], ref_p[k], False, "%s step %d %s" % (alg, t, k))
                want = NamedSharding(MESH, SPECS[k])
                if not sh_p[k].sharding.is_equivalent_to(want, sh_p[k].ndim):
                    raise AssertionError("%s: sharding %s, want %s" % (k, sh_p[k].sharding, want))
                got = sorted(s.data.unsafe_buffer_pointer() for s in sh_p[k].addressable_shards)
                if t > 0 and (got != ptrs[k] or not old[k].is_deleted()):
                    raise AssertionError("%s was not updated in place" % k)
            for a, sp in zip(jax.tree_util.tree_leaves(sh_s.ada), jax.tree_util.tree_leaves(
                    sspecs.ada, is_leaf=lambda x: isinstance(x, P))):
                if not a.sharding.is_equivalent_to(NamedSharding(MESH, sp), a.ndim):
                    raise AssertionError("state sharding %s, want %s" % (a.sharding, sp))


_GSPMD_BLOCK = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
jax.config.update("jax_use_shardy_partitioner", False)
import lomo_native.jax as lj
mesh = jax.make_mesh((2, 2), ("x", "y"), axis_types=(AxisType.Auto,) * 2)
opt = lj.adalomo()
p = {"w": jnp.ones((4, 6), jnp.float32)}
sh = {"w": jax.device_put(p["w"], NamedSharding(mesh, P("x", "y")))}
try:
    jax.jit(opt.step)(sh, sh, opt.init(p), 0.01)
except Exception as e:
    print("REFUSED", "2-D block" in str(e))
"""


def case_block_refusal_is_an_exception():
    """A 2-D block: on a mesh with Explicit axes (jax.make_mesh's default in recent JAX) or a
    committed array, ShardedOperandError at trace time; a mesh axis of size 1 splits nothing
    (accepted, equal to the unsharded step); under the GSPMD partitioner the refusal raised in
    XLA's sharding-inference callback was a failed CHECK that aborted the process."""
    if MESH.size != 4:
        return
    from jax.sharding import AxisType

    mesh = jax.make_mesh((2, 2), ("x", "y"), axis_types=(AxisType.Explicit,) * 2)
    opt = lj.adalomo(clip_grad_norm=1.0)
    p = {"w": jnp.ones((4, 6), jnp.float32)}
    sh = {"w": jax.device_put(p["w"], NamedSharding(mesh, P("x", "y")))}
    for fn in (lambda: jax.jit(opt.step)(sh, sh, opt.init(p), 0.01),
               lambda: lj.lomo_update(sh["w"], sh["w"], lr=0.1)):
        e = _expect_refusal(fn, "2-D block", "shard_map")
        if not isinstance(e, lj.ShardedOperandError):
            raise AssertionError("want ShardedOperandError, got %r" % (e,))
    mesh1 = jax.make_mesh((1, 4), ("a", "b"), axis_types=(AxisType.Explicit,) * 2)
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)
    ref = jax.jit(opt.step)({"w": w}, {"w": w * 0.5}, opt.init({"w": w}), 0.01)[0]["w"]
    sw = jax.device_put(w, NamedSharding(mesh1, P("a", "b")))
    out = jax.jit(opt.step)({"w": sw}, {"w": sw * 0.5}, opt.init({"w": w}), 0.01)[0]["w"]
    equal(out, ref, False, "size-1 axis")
    import subprocess

    proc = subprocess.run([sys.executable, "-c", _GSPMD_BLOCK], capture_output=True, text=True,
                          timeout=600, env={k: v for k, v in os.environ.items()
                                            if k != "XLA_FLAGS"})
    if proc.returncode != 0 or "REFUSED True" not in proc.stdout:
        raise AssertionError("GSPMD: rc %d %s" % (proc.returncode, proc.stderr[-1500:]))


def case_shard_map_unit_mesh_axis():
    """shard_map on a (1, N) mesh with specs naming both axes (a configurable trainer's
    P("data", "model") with one data replica): the size-1 axis splits nothing, so P("a", "b")
    is a column split, not a refused 2-D block; equal to the unsharded step."""
    from jax.sharding import AxisType

    n = MESH.size
    mesh = jax.make_mesh((1, n), ("a", "b"), axis_types=(AxisType.Explicit,) * 2)
    opt = lj.adalomo(clip_grad_norm=1.0, weight_decay=0.01)
    rng = np.random.default_rng(2)
    shapes = {"w_ab": (6, 2 * n), "w_ba": (2 * n, 6), "v": (2 * n,)}
    specs = {"w_ab": P("a", "b"), "w_ba": P("b", "a"), "v": P(("a", "b"))}
    params = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
    grads = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
    ref_p, ref_s = jax.jit(opt.step)(params, grads, opt.init(params), 0.05)
    sspecs = opt.state_specs(params, specs, mesh)
    f = jax.jit(jax.shard_map(lambda p, g, s: opt.sharded_step(p, g, s, 0.05, specs), mesh=mesh,
                              in_specs=(specs, specs, sspecs), out_specs=(specs, sspecs)))

    def place(t):
        return {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in t.items()}

    out_p, out_s = f(place(params), place(grads),
                     jax.device_put(opt.init(params), opt.state_shardings(mesh, params, specs)))
    for k in shapes:
        equal(out_p[k], ref_p[k], False, "unit axis %s" % k)
    for a, b in zip(jax.tree_util.tree_leaves(out_s), jax.tree_util.tree_leaves(ref_s)):
        equal(a, b, False, "unit axis state")


CASES = {k[5:]: v for k, v in sorted(globals().items()) if k.startswith("case_")}

if __name__ == "__main__":
    results = {}
    for name in sys.argv[3:] or list(CASES):
        try:
            CASES[name]()
            results[name] = "ok"
        except Exception:  # noqa: BLE001 - reported to the pytest side
            results[name] = traceback.format_exc()[-3000:]
    print("RESULTS " + json.dumps(results))
