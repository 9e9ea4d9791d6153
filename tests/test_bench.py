"""The command line and the main job (``adamkit/cli.py``, ``bench.py``, ``demo.py``),
as a newcomer meets them: ``adamkit bench`` shows its progress when its output is not
a terminal and keeps a log; ``adamkit demo`` agrees with torch; the example reports a
missing optional dependency before it trains. And the bench's plumbing: paired
ratios, new gradients each round, state bytes and low-bit accuracy, its workloads."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT

import adamkit

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


@pytest.mark.heavy  # a fresh process: seconds
def test_bench_prints_progress_lines_when_piped_and_logs_them(tmp_path: Path) -> None:
    args = ["--quick", "--workloads", "flat-1M", "--dtypes", "fp32", "--no-compile", "--no-accuracy"]
    args += ["--optimizers", "adamkit", "torch fused"]
    done = subprocess.run(
        [sys.executable, "-m", "adamkit", "bench", *args],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=240,
    )  # stdout and stderr are pipes, not terminals
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    # workload, contender and elapsed time, at least at each warm-up step
    for name in ("adamkit", "torch fused", "roofline"):
        assert any(re.match(rf"\[\s*\d+m\d\ds\] flat-1M fp32: {name}, warm-up", line) for line in lines), lines
    assert any(line.endswith("] done") for line in lines), lines
    assert "optimizer step, AdamW" in done.stdout  # the table, on stdout; progress kept off it
    assert "warm-up" not in done.stdout
    log = (tmp_path / "adamkit-bench.log").read_text().splitlines()  # the default log, in the current directory
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[\s*\d+m\d\ds\] "
    assert all(re.match(stamp, line) for line in log), log
    steps = [line for line in log if re.search(r"flat-1M fp32: .*(warm-up|round \d+/3)", line)]
    assert len(steps) == 4 * 3  # every step of (warm-up + 3 rounds) x (2 contenders + roofline)


def test_bench_progress_lines_are_throttled_between_warm_ups() -> None:
    from adamkit.bench import Progress

    out = io.StringIO()  # not a terminal
    progress = Progress(total=8, stream=out, interval=3600.0)
    for rep in range(2):
        for name in ("a", "b"):
            progress.step("w fp32", name, rep, 1)
            progress.advance()
    progress.line("done")
    progress.close()
    printed = out.getvalue().splitlines()
    assert [line.split("] ", 1)[1] for line in printed] == [
        "w fp32: a, warm-up (step 1/8)",
        "w fp32: b, warm-up (step 2/8)",
        "done",
    ]


@pytest.mark.heavy
def test_example_reports_a_missing_matplotlib_before_training(tmp_path: Path) -> None:
    script = ROOT / "examples" / "stdlib_char_lm.py"
    code = (
        "import runpy, sys; sys.modules['matplotlib'] = None; "
        f"sys.argv = [{str(script)!r}, '--out', 'x.png']; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "matplotlib" in done.stderr and "--no-plot" in done.stderr, done.stderr[-2000:]
    assert "parameters" not in done.stdout  # it stopped before reading the data and building the model
    assert not list(tmp_path.iterdir())


@pytest.mark.heavy
def test_cli_demo_runs_and_agrees_with_torch() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "adamkit", "demo", "--steps", "30"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "OK: largest parameter difference from torch.optim" in out.stdout
    assert out.stdout.count("\n") >= 6


def test_bench_ratio_pairs_rounds_and_run_workload_reports_every_contender() -> None:
    from adamkit import bench

    # a slow spell (rounds 2-3) hits both contenders: paired ratios stay 2.0
    torch_times, ours = [2.0, 20.0, 30.0, 2.0, 2.0], [1.0, 10.0, 15.0, 1.0, 1.0]
    assert bench._paired_ratio(torch_times, ours) == 2.0
    chosen = [c for c in bench.contenders() if c.name in ("adamkit", "torch fused")]
    ticks = []
    results, bandwidth = bench.run_workload("small-2k", "fp32", 2, chosen, lambda: ticks.append(1))
    assert [r.optimizer for r in results] == ["adamkit", "torch fused"]
    assert len(ticks) == 3 * 3  # (reps + warm-up) x (contenders + roofline)
    assert bandwidth > 0
    for r in results:
        assert len(r.samples_ms) == 2 and r.median_ms > 0 and r.elements_per_s > 0
        assert r.vs_torch_fused is not None and r.vs_torch_fused > 0
    assert results[1].vs_torch_fused == 1.0


def test_bench_new_grads_gives_every_parameter_a_new_gradient_each_round(monkeypatch) -> None:
    """--new-grads: each round assigns new gradient tensors (alternating two sets)."""
    import dataclasses

    from adamkit import bench

    seen: list[list[int]] = []
    real_params = bench._params

    def spy(shapes, dtype, grads, device="cpu", channels_last=False):
        ps = real_params(shapes, dtype, grads, device, channels_last)
        seen.append(ps)
        return ps

    monkeypatch.setattr(bench, "_params", spy)
    ids_per_step: list[list[int]] = []

    def spying(make):
        def make_spy(ps):
            opt = make(ps)
            step = opt.step

            def stepped():
                ids_per_step.append([id(p.grad) for p in ps])
                return step()

            opt.step = stepped
            return opt

        return make_spy

    chosen = [
        dataclasses.replace(c, make=spying(c.make)) for c in bench.contenders() if c.name in ("adamkit", "torch fused")
    ]
    results, _ = bench.run_workload("small-2k", "fp32", 2, chosen, lambda: None, new_grads=True)
    assert len(results) == 2 and len(seen) == 2
    adamkit_steps = ids_per_step[0::2]
    assert adamkit_steps[0] != adamkit_steps[1] and adamkit_steps[0] == adamkit_steps[2]  # two sets, alternating
    assert set(adamkit_steps[0]).isdisjoint(adamkit_steps[1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_bench_on_cuda_without_a_gpu_says_so() -> None:
    from adamkit import bench

    with pytest.raises(SystemExit, match="no CUDA GPU"):
        bench.main(["--quick", "--device", "cuda"])


def test_bench_plot_without_matplotlib_says_so_before_timing(monkeypatch) -> None:
    import sys

    from adamkit import bench

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    timed = []
    monkeypatch.setattr(bench, "run_workload", lambda *a, **k: timed.append(a) or ([], 1.0))
    with pytest.raises(SystemExit, match="--plot needs matplotlib"):
        bench.main(["--quick", "--plot", "x.png"])
    assert not timed


def test_bench_reads_state_bytes_and_measures_low_bit_accuracy() -> None:
    from adamkit import bench

    p = torch.zeros(1 << 16, requires_grad=True)
    p.grad = torch.ones_like(p)
    for bits, want in ((32, 8.0), (8, 2 * (1 + 4 / 256)), (4, 2 * (0.5 + 4 / 128))):
        opt = adamkit.AdamW([p], state_bits=bits)
        opt.step()
        assert bench.state_bytes(opt, p.numel()) == pytest.approx(want)
    errors = bench.accuracy(rows=64, cols=256, steps=5)
    assert {"adamkit 8-bit", "adamkit 4-bit"} <= errors.keys()
    assert 0 < errors["adamkit 8-bit"] < errors["adamkit 4-bit"] < 0.5
    chosen = [c for c in bench.contenders() if c.name in ("adamkit 8-bit", "torch fused")]
    results, _ = bench.run_workload("flat-1M", "fp32", 1, chosen, lambda: None)
    assert [r.optimizer for r in results] == ["adamkit 8-bit", "torch fused"]
    assert results[0].state_bytes_per_param == pytest.approx(2 * (1 + 4 / 256))


def test_bench_resnet50_workload_is_torchvisions_in_channels_last() -> None:
    """resnet50-cl: torchvision's ResNet-50 parameter count, its 4-D weights and their
    gradients in channels_last (the rest contiguous)."""
    from adamkit import bench

    shapes = bench.WORKLOADS["resnet50-cl"]()
    assert len(shapes) == 161 and sum(int(np.prod(s)) for s in shapes) == 25_557_032
    small = [(8, 4, 3, 3), (8,), (3, 5)]
    grads = [bench._layout(torch.randn(s), True) for s in small]
    ps = bench._params(small, torch.float32, grads, "cpu", channels_last=True)
    assert ps[0].is_contiguous(memory_format=torch.channels_last) and not ps[0].is_contiguous()
    assert grads[0].stride() == ps[0].stride() and ps[1].is_contiguous() and ps[2].is_contiguous()
