"""The main job as a newcomer meets it: ``adamkit bench`` shows its progress when its
output is not a terminal and keeps a log; the example reports a missing optional
dependency before it trains."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

from helpers import ROOT

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


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
