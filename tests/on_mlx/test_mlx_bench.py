"""``adamkit bench --mlx``, the affine-state comparison, and the MLX example."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

mx = pytest.importorskip("mlx.core")

from helpers import ROOT  # noqa: E402

from adamkit.mlx import bench  # noqa: E402


def test_affine_mx_quantize_state_diverges_where_8_bit_state_converges():
    """Both moments in MLX's 8-bit affine ``mx.quantize`` format: the regression's loss
    goes to NaN (second moments rounded to a block's minimum, zero, divide the first
    moment's error by ε); adamkit's 8-bit state trains like 32-bit state."""
    losses = bench.convergence(steps=60)
    full, ours, affine = losses["32-bit"], losses["adamkit.mlx 8-bit"], losses["mlx affine 8-bit"]
    assert full[-1] < 0.8 * full[0]  # it trains
    assert abs(ours[-1] - full[-1]) <= 0.05 * full[-1]
    assert not math.isfinite(affine[-1]) or affine[-1] > 10 * full[-1], affine


@pytest.mark.heavy
def test_bench_mlx_quick(tmp_path):
    """``adamkit bench --mlx --quick --json``: every contender on every quick workload,
    state bytes within the goals, the update errors and the convergence losses."""
    out = tmp_path / "mlx.json"
    done = subprocess.run(
        [sys.executable, "-m", "adamkit", "bench", "--mlx", "--quick", "--reps", "2", "--json", str(out), "--no-log"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "vs mlx AdamW" in done.stdout and "affine" in done.stdout
    result = json.loads(out.read_text())
    rows = {(r["workload"], r["optimizer"]): r for r in result["results"]}
    for workload in bench.MLX_QUICK_WORKLOADS:
        for name in bench.contenders():
            assert rows[(workload, name)]["median_ms"] > 0
    assert rows[("flat-1M", "adamkit.mlx 8-bit")]["state_bytes_per_param"] <= 2.05
    assert rows[("flat-1M", "adamkit.mlx 4-bit")]["state_bytes_per_param"] <= 1.1
    errors = result["meta"]["accuracy"]["relative_update_error"]
    assert errors["adamkit.mlx 8-bit"] < 0.05 and errors["adamkit.mlx 4-bit"] < 0.3
    assert set(result["meta"]["convergence"]) == {"32-bit", "adamkit.mlx 8-bit", "mlx affine 8-bit"}


@pytest.mark.heavy
def test_example_trains_at_every_width(tmp_path):
    """examples/mlx_char_lm.py at a tiny size: every optimizer trains, the JSON is written."""
    out = tmp_path / "lm.json"
    args = ["--steps", "8", "--d", "32", "--layers", "1", "--ctx", "16", "--batch", "4", "--bytes", "50000"]
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "mlx_char_lm.py"), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert len(results) == 4
    assert all(math.isfinite(r["held_out_loss"]) for r in results.values())
    assert results["adamkit.mlx AdamW 8-bit"]["state_bytes_per_param"] < 8
