"""lomo_native.jax on 2 and 4 host devices: shard_map parity (against the unsharded step and
the C API), row/column/two-axis/uneven pieces, dynamic loss scaling, stochastic rounding,
donation, a sharded training loop, and plain jit on sharded arrays (the sharding kept, parity,
in-place donation; a 2-D block refused). The device count must be set before jax is imported,
so the cases (sharded_cases.py, sharded_user_cases.py) run in one subprocess per configuration
and file."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

FILES = ("sharded_cases.py", "sharded_user_cases.py")
CASES = [
    (f, ln[9:].split("(")[0])
    for f in FILES
    for ln in open(os.path.join(HERE, f))
    if ln.startswith("def case_")
]

CONFIGS = [(2, "1"), (4, "1"), (2, "0")]  # (devices, jax_enable_x64)
_results = {}


def _run(devices, x64, file):
    key = (devices, x64, file)
    if key not in _results:
        env = dict(os.environ)
        env.pop("XLA_FLAGS", None)
        proc = subprocess.run(
            [sys.executable, os.path.join(HERE, file), str(devices), x64],
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
        if not lines:
            _results[key] = {"__crash__": proc.stdout[-3000:] + proc.stderr[-3000:]}
        else:
            _results[key] = json.loads(lines[-1][len("RESULTS "):])
    return _results[key]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "%ddev-x64=%s" % c)
@pytest.mark.parametrize("case", sorted(CASES), ids=lambda c: c[1])
def test_sharded(config, case):
    res = _run(*config, case[0])
    case = case[1]
    assert "__crash__" not in res, res.get("__crash__")
    assert res.get(case) == "ok", res.get(case)
