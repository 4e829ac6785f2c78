"""Train a small MLP with AdaLomo (or LOMO) from liblomo.so inside jax.jit.

    pip install "./bindings/python[jax]"
    python examples/python/jax_train.py [--algorithm lomo] [--bf16] [--optax] [--devices 2]

(or, in a checkout without installing: `cargo build --release` and
`PYTHONPATH=bindings/python python examples/python/jax_train.py`.) The whole step —
forward, backward, global-norm clipping and the in-place optimizer update — is one jitted
function; parameters and optimizer state are donated, so the update writes into their buffers.

With --optax the same optimizer runs as an optax GradientTransformation
(lomo_native.jax.optax; needs `pip install optax`): optax.chain(optax.clip_by_global_norm,
AdaLomo with an optax cosine schedule) and optax.apply_updates, at the cost of a copy of the
parameters and a full-size updates tree per step (the default path needs neither).

With --devices N (N host CPU devices; the flag sets XLA_FLAGS before jax is imported) the MLP
is tensor-parallel over a 1-D mesh "x" inside jax.shard_map (Megatron's layout: l1 split over
its output columns, l2 and out over their input rows) and the optimizer runs
opt.sharded_step: the global norm, AdaLomo's statistics and the skip decisions are reduced with
jax.lax.psum, so the step equals the unsharded one, and each device keeps only its pieces.
"""

import argparse
import os
import sys
import time

# The host device count must be set before jax is imported.
if "--devices" in sys.argv[:-1]:
    _n = int(sys.argv[sys.argv.index("--devices") + 1])
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=%d" % _n
    )

import numpy as np

import jax
import jax.numpy as jnp

from lomo_native import jax as lomo_jax


def make_data(n=1024, d_in=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d_in)).astype(np.float32)
    w = rng.normal(size=(d_in, 1)).astype(np.float32)
    y = np.sin(x @ w) + 0.05 * rng.normal(size=(n, 1)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


def init_params(d_in=16, hidden=64, dtype=jnp.float32, seed=1):
    rng = np.random.default_rng(seed)
    p = {
        "l1": {"w": rng.normal(size=(d_in, hidden)) / np.sqrt(d_in), "b": np.zeros(hidden)},
        "l2": {"w": rng.normal(size=(hidden, hidden)) / np.sqrt(hidden), "b": np.zeros(hidden)},
        "out": {"w": rng.normal(size=(hidden, 1)) / np.sqrt(hidden), "b": np.zeros(1)},
    }
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), p)


def loss_fn(params, x, y):
    h = x.astype(params["l1"]["w"].dtype)
    for layer in ("l1", "l2"):
        h = jnp.tanh(h @ params[layer]["w"] + params[layer]["b"])
    out = h @ params["out"]["w"] + params["out"]["b"]
    return jnp.mean((out.astype(jnp.float32) - y) ** 2)


def make_optimizer(args, params):
    """The pytree optimizer of ``args.algorithm`` with global norm clipping, and its base lr.
    No weight decay for biases (the C API's "group with weight_decay = 0")."""
    decay_mask = jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
    make = lomo_jax.adalomo if args.algorithm == "adalomo" else lomo_jax.lomo
    opt = make(
        clip_grad_norm=1.0,
        weight_decay=1e-4,
        weight_decay_mask=decay_mask,
        rounding="stochastic" if args.bf16 else "nearest",
    )
    return opt, (1e-2 if args.algorithm == "adalomo" else 0.3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--algorithm", choices=["adalomo", "lomo"], default="adalomo")
    ap.add_argument("--bf16", action="store_true", help="bf16 parameters (stochastic rounding)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--optax", action="store_true", help="the optax GradientTransformation form")
    ap.add_argument("--devices", type=int, default=1, help="tensor-parallel over N CPU devices")
    args = ap.parse_args()
    if args.optax:
        return main_optax(args)
    if args.devices > 1:
        return main_sharded(args)

    dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    params = init_params(dtype=dtype)
    x, y = make_data()
    opt, base_lr = make_optimizer(args, params)
    state = opt.init(params)

    def train_step(params, state, x, y, lr):
        # jax.value_and_grad that also applies the loss scale when one is configured (fp16:
        # loss_scale_mode="dynamic"); off by default, then these are the plain gradients
        loss, grads = opt.value_and_grad(loss_fn)(state, params, x, y)
        params, state = opt.step(params, grads, state, lr)
        return params, state, loss

    train_step = jax.jit(train_step, donate_argnums=(0, 1))
    t0 = time.perf_counter()
    for i in range(args.steps):
        lr = base_lr * 0.5 * (1 + np.cos(np.pi * i / args.steps))  # cosine schedule, traced
        params, state, loss = train_step(params, state, x, y, jnp.float32(lr))
        if i % 20 == 0 or i == args.steps - 1:
            print(
                "step %4d  loss %.5f  grad-norm %.4f  lr %.5f"
                % (i, float(loss), float(state.grad_norm), lr)
            )
    print(
        "%s, %s params: %d steps in %.2f s, %d skipped"
        % (args.algorithm, jnp.dtype(dtype).name, int(state.step), time.perf_counter() - t0,
           args.steps - int(state.step))
    )


def main_optax(args):
    import optax

    from lomo_native.jax import optax as lomo_optax

    dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    params = init_params(dtype=dtype)
    x, y = make_data()
    decay_mask = jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
    base_lr = 1e-2 if args.algorithm == "adalomo" else 0.3
    make = lomo_optax.adalomo if args.algorithm == "adalomo" else lomo_optax.lomo
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        make(
            optax.cosine_decay_schedule(base_lr, args.steps),
            weight_decay=1e-4,
            weight_decay_mask=decay_mask,
            rounding="stochastic" if args.bf16 else "nearest",
        ),
    )
    state = tx.init(params)

    @jax.jit
    def train_step(params, state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    t0 = time.perf_counter()
    for i in range(args.steps):
        params, state, loss = train_step(params, state, x, y)
        if i % 20 == 0 or i == args.steps - 1:
            print("step %4d  loss %.5f" % (i, float(loss)))
    print(
        "%s (optax), %s params: %d steps in %.2f s"
        % (args.algorithm, jnp.dtype(dtype).name, int(state[1].count),
           time.perf_counter() - t0)
    )


def main_sharded(args):
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((args.devices,), ("x",))
    dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    params = init_params(dtype=dtype)
    x, y = make_data()
    # Column-parallel l1 (its hidden units), row-parallel l2 and out; the rest replicated.
    specs = {
        "l1": {"w": P(None, "x"), "b": P("x")},
        "l2": {"w": P("x", None), "b": P()},
        "out": {"w": P("x", None), "b": P()},
    }
    opt, base_lr = make_optimizer(args, params)
    state_specs = opt.state_specs(params, specs)

    def local_loss(p, x, y):
        # Inside shard_map: this device's hidden units of l1, its input rows of l2 and out.
        h = jnp.tanh(x.astype(p["l1"]["w"].dtype) @ p["l1"]["w"] + p["l1"]["b"])
        h = jnp.tanh(jax.lax.psum(h @ p["l2"]["w"], "x") + p["l2"]["b"])
        n = h.shape[1] // args.devices
        h_local = jax.lax.dynamic_slice_in_dim(h, jax.lax.axis_index("x") * n, n, axis=1)
        out = jax.lax.psum(h_local @ p["out"]["w"], "x") + p["out"]["b"]
        return jnp.mean((out.astype(jnp.float32) - y) ** 2)

    def train_step(p, state, x, y, lr):
        loss, grads = jax.value_and_grad(local_loss)(p, x, y)
        p, state = opt.sharded_step(p, grads, state, lr, specs)
        return p, state, loss

    train_step = jax.jit(
        jax.shard_map(
            train_step,
            mesh=mesh,
            in_specs=(specs, state_specs, P(), P(), P()),
            out_specs=(specs, state_specs, P()),
        ),
        donate_argnums=(0, 1),
    )
    put = lambda tree, sp: jax.tree_util.tree_map(  # noqa: E731
        lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), tree, sp,
        is_leaf=lambda v: isinstance(v, P),
    )
    params = put(params, specs)
    state = put(opt.init(params), state_specs)
    t0 = time.perf_counter()
    first = None
    for i in range(args.steps):
        lr = base_lr * 0.5 * (1 + np.cos(np.pi * i / args.steps))
        params, state, loss = train_step(params, state, x, y, jnp.float32(lr))
        # Wait for each step: host-device meshes with fewer free cores than devices can
        # deadlock in XLA's CPU collectives when many steps are queued (plain JAX too).
        loss = float(loss)
        first = loss if first is None else first
        if i % 20 == 0 or i == args.steps - 1:
            print(
                "step %4d  loss %.5f  grad-norm %.4f  lr %.5f"
                % (i, float(loss), float(state.grad_norm), lr)
            )
    print("l1.w is split over %d devices: %s" % (args.devices, params["l1"]["w"].sharding.spec))
    print(
        "%s, %s params, %d devices: %d steps in %.2f s, loss %.4f -> %.4f"
        % (args.algorithm, jnp.dtype(dtype).name, args.devices, int(state.step),
           time.perf_counter() - t0, first, float(loss))
    )
    if not float(loss) < first:
        raise SystemExit("the loss did not fall")


if __name__ == "__main__":
    main()
