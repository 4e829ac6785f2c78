"""The ctypes layer and the NumPy-level Optimizer, against include/lomo.h and NumPy references."""

import ctypes
import re
from pathlib import Path

import numpy as np
import pytest

import lomo_native
from lomo_native import LomoError, Optimizer, _native

HEADER = Path(__file__).resolve().parents[3] / "include" / "lomo.h"


def test_one_table_declares_every_c_function():
    if not HEADER.is_file():
        pytest.skip("not run from a source checkout")
    declared = set(re.findall(r"^\S.*?\b(lomo_\w+)\(", HEADER.read_text(), re.M))
    assert declared, "no function found in the header"
    missing = declared - set(_native.SIGNATURES)
    assert not missing, f"functions of lomo.h without a signature: {sorted(missing)}"
    lib = _native.load()
    for name in declared:
        fn = getattr(lib, name)
        assert fn.argtypes is not None, name


def test_struct_sizes_match_the_library():
    lib = _native.load()
    cfg = _native.Config()
    lib.lomo_config_init(ctypes.byref(cfg), _native.ALGORITHM_ADALOMO)
    assert cfg.struct_size == ctypes.sizeof(_native.Config)
    assert cfg.loss_scale == 1024.0 and cfg.eps1 == 1e-30 and cfg.decay_rate == -0.8


def test_errors_carry_status_and_message():
    with pytest.raises(LomoError) as e:
        Optimizer("adalomo", decay_rate=0.5)
    assert e.value.status == 2 and "decay_rate" in e.value.message
    with pytest.raises(TypeError):
        Optimizer("lomo", no_such_field=1.0)
    opt = Optimizer("lomo", clip_grad_norm=1.0)
    with pytest.raises(LomoError) as e:
        opt.begin(_native.PHASE_UPDATE, 0.1)
    assert e.value.status == 3 and "NORM" in str(e.value)
    w = np.zeros(3, np.float32)
    pid = opt.register_array("w", w)
    with pytest.raises(LomoError) as e:
        opt.register_array("w", np.zeros(3, np.float32))
    assert "already registered" in e.value.message
    opt.begin(_native.PHASE_NORM)
    opt.submit_array(pid, np.ones(3, np.float32))
    with pytest.raises(LomoError) as e:
        opt.submit_array(pid, np.ones(3, np.float32))
    assert e.value.status == 4
    opt.cancel()


def test_library_facts():
    assert lomo_native.version() == "0.1.0"
    assert isinstance(lomo_native.cuda_available(), bool)
    assert Path(lomo_native.library_path()).is_file()


def lomo_reference(p, grads, lrs, clip_norm=0.0, clip_value=0.0, wd=0.0):
    """LOMO in float64: p ← p·(1 − lr·wd) − lr·c·clamp(g, −v, v)."""
    p = p.astype(np.float64)
    for g, lr in zip(grads, lrs):
        g = g.astype(np.float64)
        c = min(1.0, clip_norm / (np.linalg.norm(g) + 1e-6)) if clip_norm else 1.0
        if clip_value:
            g = np.clip(g, -clip_value, clip_value)
        p = p * (1 - lr * wd) - lr * c * g
    return p


def test_numpy_lomo_steps_match_a_float64_reference():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 7)).astype(np.float32)
    b = rng.standard_normal(7).astype(np.float32)
    w0, b0 = w.copy(), b.copy()
    opt = Optimizer("lomo", clip_grad_norm=1.0, clip_grad_value=0.3, weight_decay=0.1)
    ids = opt.register_array("w", w), opt.register_array("b", b)
    gw = [rng.standard_normal((5, 7)).astype(np.float32) for _ in range(3)]
    gb = [rng.standard_normal(7).astype(np.float32) for _ in range(3)]
    for t in range(3):
        info = opt.step({ids[0]: gw[t], "b": gb[t]}, lr=0.1 / (t + 1))
        assert info.step == t + 1
    # the global norm couples w and b: compute it over both
    pw, pb = w0.astype(np.float64), b0.astype(np.float64)
    for t in range(3):
        lr = 0.1 / (t + 1)
        norm = np.sqrt(np.sum(gw[t].astype(np.float64) ** 2) + np.sum(gb[t].astype(np.float64) ** 2))
        c = min(1.0, 1.0 / (norm + 1e-6))
        pw = pw * (1 - lr * 0.1) - lr * c * np.clip(gw[t], -0.3, 0.3)
        pb = pb * (1 - lr * 0.1) - lr * c * np.clip(gb[t], -0.3, 0.3)
    np.testing.assert_allclose(w, pw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b, pb, rtol=1e-5, atol=1e-6)


def adalomo_reference(p, grads, lrs, eps1=1e-30, eps2=1e-3, tau=1.0, decay=-0.8):
    """AdaLomo (semantics.md §3.3) in float64 for a 1-D or 2-D parameter."""
    p = p.astype(np.float64)
    row = col = v = None
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g = g.astype(np.float64)
        beta = 1.0 - t ** decay
        u2 = g * g + eps1
        if p.ndim == 2:
            row = u2.mean(-1) if row is None else beta * row + (1 - beta) * u2.mean(-1)
            col = u2.mean(-2) if col is None else beta * col + (1 - beta) * u2.mean(-2)
            u = g / np.sqrt(np.outer(row / row.mean(), col))
        else:
            v = u2 if v is None else beta * v + (1 - beta) * u2
            u = g / np.sqrt(v)
        u = u / max(1.0, np.sqrt(np.mean(u * u)) / tau)
        eta = lr * max(eps2, np.sqrt(np.mean(p * p)))
        p = p - eta * u
    return p


def test_numpy_adalomo_matches_a_float64_reference():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    w0, b0 = w.copy(), b.copy()
    opt = Optimizer("adalomo", loss_scale_mode="none")
    opt.register_array("w", w)
    opt.register_array("b", b)
    gw = [rng.standard_normal((6, 4)).astype(np.float32) for _ in range(4)]
    gb = [rng.standard_normal(4).astype(np.float32) for _ in range(4)]
    lrs = [0.01, 0.02, 0.01, 0.005]
    for t in range(4):
        opt.step({"w": gw[t], "b": gb[t]}, lrs[t])
    np.testing.assert_allclose(w, adalomo_reference(w0, gw, lrs), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(b, adalomo_reference(b0, gb, lrs), rtol=1e-5, atol=1e-7)


def test_numpy_loss_scale_is_undone_and_nonfinite_is_never_applied():
    w = np.ones(4, np.float32)
    opt = Optimizer("lomo", loss_scale_mode="dynamic", loss_scale=1024.0)
    opt.register_array("w", w)
    assert opt.loss_scale == 1024.0
    opt.step({"w": np.full(4, 1024.0, np.float32)}, lr=0.5)  # gradient of loss·1024
    np.testing.assert_array_equal(w, np.full(4, 0.5, np.float32))
    info = opt.step({"w": np.array([1, np.inf, 1, 1], np.float32)}, lr=0.5)
    assert info.overflow and info.grads_nonfinite == 1
    np.testing.assert_array_equal(w, np.full(4, 0.5, np.float32))
    assert opt.loss_scale == 512.0
    # with a NORM phase the whole step is skipped: the finite parameter is untouched too
    v = np.ones(2, np.float32)
    opt.register_array("v", v)
    info = opt.step({"w": np.array([1, np.nan, 1, 1], np.float32), "v": np.ones(2, np.float32)},
                    lr=0.5, norm_pass=True)
    assert info.skipped and info.skipped_total == 1
    np.testing.assert_array_equal(v, np.ones(2, np.float32))
    assert opt.loss_scale == 256.0


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_numpy_nonfinite_policies_against_a_float64_reference(dtype):
    rng = np.random.default_rng(7)
    n = 200_000  # several chunks of the CPU pool
    g = rng.standard_normal(n).astype(np.float32)
    bad = [3, 70_001, n - 1]
    g[bad] = [np.nan, np.inf, -np.inf]
    g = g.astype(dtype)
    for policy in ("per_tensor", "per_element"):
        w = rng.standard_normal(n).astype(dtype)
        w0 = w.copy()
        opt = Optimizer("lomo", weight_decay=0.1, nonfinite_policy=policy)
        assert opt.config["nonfinite_policy"] == (policy == "per_element")
        opt.register_array("w", w)
        info = opt.step({"w": g}, lr=0.05)
        assert info.overflow and info.grads_nonfinite == 1
        assert np.isfinite(w).all()
        if policy == "per_tensor":
            np.testing.assert_array_equal(w, w0)
            continue
        want = w0.astype(np.float64) * (1 - 0.05 * 0.1) - 0.05 * g.astype(np.float64)
        want[bad] = w0[bad]
        np.testing.assert_allclose(w, want.astype(dtype), rtol=1e-3 if dtype == np.float16 else 1e-6,
                                   atol=1e-3 if dtype == np.float16 else 1e-7)
        np.testing.assert_array_equal(w[bad], w0[bad])
    with pytest.raises(ValueError):
        Optimizer("lomo", nonfinite_policy="sometimes")


def test_numpy_float16_and_groups():
    w = np.ones(8, np.float16)
    opt = Optimizer("lomo")
    opt.group_set(1, lr_multiplier=0.5, weight_decay=0.0)
    assert opt.group_get(1) == (0.5, 0.0)
    opt.register_array("w", w, group=1)
    opt.step({"w": np.ones(8, np.float32)}, lr=0.25)  # gradient dtype may differ
    np.testing.assert_array_equal(w, np.full(8, 0.875, np.float16))
    with pytest.raises(TypeError):
        opt.register_array("i", np.zeros(2, np.int32))
    with pytest.raises(ValueError):  # a view with gaps (transposed ones are accepted)
        opt.register_array("t", np.zeros((3, 4), np.float32)[:, ::2])
    ro = np.zeros(3, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError):
        opt.register_array("r", ro)


@pytest.fixture
def flush_denormal():
    """Flush-to-zero and denormals-are-zero on this thread, as torch.set_flush_denormal(True)
    (or an -Ofast host program, or XLA's CPU runtime) sets them; restored afterwards."""
    torch = pytest.importorskip("torch")
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-to-zero mode")
    try:
        assert np.float32(2.0**-135) * np.float32(0.5) == 0.0  # the mode is on
        yield
    finally:
        torch.set_flush_denormal(False)


def test_float16_subnormal_params_under_flush_to_zero(flush_denormal):
    # Every f16 subnormal m·2^-24 (|m| < 1024). A zero gradient leaves them as they are; then a
    # gradient k·2^-20 at lr 2^-4 moves each by exactly k·2^-24 (all values exact in f16).
    m = np.arange(-1023, 1024, dtype=np.int64)
    w = (m * 2.0**-24).astype(np.float16)
    w0 = w.copy()
    opt = Optimizer("lomo")
    opt.register_array("w", w)
    opt.step({"w": np.zeros(w.shape, np.float32)}, lr=2.0**-4)
    np.testing.assert_array_equal(w.view(np.uint16), w0.view(np.uint16))
    k = np.where(m > 0, 1, -1) * (np.abs(m) % 7)  # moves towards zero, stays subnormal
    opt.step({"w": (k * 2.0**-20).astype(np.float32)}, lr=2.0**-4)
    np.testing.assert_array_equal(w, ((m - k) * 2.0**-24).astype(np.float16))


def test_adalomo_float16_tiny_params_under_flush_to_zero(flush_denormal):
    # Parameters around 2^-15 (mostly f16 subnormals) against the float64 reference; a flushed
    # read would be off by the parameter itself (~3e-5), far beyond f16 rounding.
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((6, 40)) * 2.0**-15).astype(np.float16)
    w0 = w.astype(np.float64)
    g = [rng.standard_normal((6, 40)).astype(np.float32) for _ in range(2)]
    opt = Optimizer("adalomo", loss_scale_mode="none")
    opt.register_array("w", w)
    for t in range(2):
        opt.step({"w": g[t]}, 0.1)
    want = adalomo_reference(w0, g, [0.1, 0.1])
    np.testing.assert_allclose(w.astype(np.float64), want, rtol=2e-3, atol=6e-8)


def test_close_is_idempotent():
    opt = Optimizer("adalomo")
    opt.close()
    opt.close()
    with pytest.raises(ValueError):
        opt.loss_scale


def test_distributed_structs_and_one_rank_piece_equal_plain_steps():
    """lomo_comm / lomo_shard_desc through ctypes: one rank holding the whole tensor as a ROWS
    piece calls the all-reduce (identity for one rank) and steps exactly like a plain optimizer;
    a failing callback is LOMO_STATUS_COMM_ERROR."""
    rng = np.random.default_rng(3)
    w0 = rng.standard_normal((6, 4)).astype(np.float32)
    grads = [rng.standard_normal((6, 4)).astype(np.float32) for _ in range(3)]
    calls = []
    fail = [0]

    @_native.ALL_REDUCE_FN
    def all_reduce(user, buf, count, dtype, op, stream):
        assert dtype == _native.DTYPE_F64 and op in (_native.REDUCE_SUM, _native.REDUCE_MAX)
        calls.append(count)
        return fail[0]

    plain_w, piece_w = w0.copy(), w0.copy()
    plain, piece = Optimizer("adalomo"), Optimizer("adalomo")
    plain.register_array("w", plain_w)
    pid = piece.register_array("w", piece_w)
    comm = _native.Comm(struct_size=ctypes.sizeof(_native.Comm), rank=0, size=1,
                        all_reduce=all_reduce)
    cid = ctypes.c_uint32()
    piece._lib.lomo_comm_add(piece.handle, ctypes.byref(comm), ctypes.byref(cid))
    shape = (ctypes.c_int64 * 2)(6, 4)
    desc = _native.ShardDesc(struct_size=ctypes.sizeof(_native.ShardDesc),
                             layout=_native.LAYOUT_ROWS, global_ndim=2, global_shape=shape,
                             offset=0, piece_comm=cid.value, grad_mode=_native.GRAD_REDUCED,
                             grad_comm=_native.COMM_NONE, flags=0)
    piece._lib.lomo_param_set_shard(piece.handle, pid, ctypes.byref(desc))
    piece._lib.lomo_dist_set(piece.handle, cid.value, _native.DIST_CHECK)
    for g in grads:
        plain.step({0: g * plain.loss_scale}, lr=0.01)
        piece.step({0: g * piece.loss_scale}, lr=0.01)
        assert plain_w.tobytes() == piece_w.tobytes()
    # per step: the tensor's statistics (2C + 3), the check record, the phase record
    assert calls[:3] == [2 * 4 + 3, 10, 2]
    fail[0] = 5
    piece.begin(_native.PHASE_UPDATE, 0.01)
    with pytest.raises(LomoError) as e:
        piece.submit_array(pid, grads[0])
    assert e.value.status == 15 and "5" in e.value.message
    piece.cancel()


def test_submit_pointers_equals_one_by_one_and_checks_first():
    """``submit_pointers`` (lomo_grad_submit_batch) against separate submits, bit for bit, and a
    bad entry anywhere in the batch changes nothing."""
    rng = np.random.default_rng(3)
    shapes = [(5, 7), (7,), (3, 2, 4)]
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(3)]
    results = []
    for batch in (False, True):
        ps = [p.copy() for p in init]
        opt = Optimizer("lomo", clip_grad_norm=1.0)
        ids = [opt.register_array(f"p{i}", p) for i, p in enumerate(ps)]
        for gs in grads:
            for phase in (0, 1):
                opt.begin(phase, 0.1)
                if batch:
                    opt.submit_pointers(ids, [g.ctypes.data for g in gs], [0] * len(gs),
                                        [g.size for g in gs])
                else:
                    for i, g in zip(ids, gs):
                        opt.submit_pointer(i, g.ctypes.data, 0, numel=g.size)
                opt.end()
        results.append(ps)
    for a, b in zip(*results):
        assert a.tobytes() == b.tobytes()
    opt = Optimizer("lomo")
    ps = [p.copy() for p in init]
    ids = [opt.register_array(f"p{i}", p) for i, p in enumerate(ps)]
    gs = grads[0]
    opt.begin(1, 0.1)
    with pytest.raises(LomoError):  # the last entry's count is wrong
        opt.submit_pointers(ids, [g.ctypes.data for g in gs], [0] * 3, [35, 7, 23])
    with pytest.raises(LomoError):  # an id twice
        opt.submit_pointers([0, 0], [gs[0].ctypes.data] * 2, [0, 0], [35, 35])
    for a, b in zip(ps, init):
        assert a.tobytes() == b.tobytes()
    opt.submit_pointers(ids, [g.ctypes.data for g in gs], [0] * 3, [g.size for g in gs])
    opt.end()
    assert not np.array_equal(ps[0], init[0])
    with pytest.raises(LomoError, match="no phase is active"):
        opt.submit_pointers(ids, [g.ctypes.data for g in gs], [0] * 3, [g.size for g in gs])
    with pytest.raises(LomoError):  # no CUDA parameters
        opt.cuda_launch_count()
