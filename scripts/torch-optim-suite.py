"""torch's own optimizer tests, run on adamkit's classes.

PyTorch's ``test/test_optim.py`` (``TestOptimRenewed``) is driven by the ``optim_db``
that ships in the wheel (``torch.testing._internal.common_optimizers``). This runs its
CPU tests for the Adam, AdamW and Adamax entries twice, in two processes: once as
shipped, with torch's classes, and once with each entry's ``optim_cls`` replaced by
adamkit's class of the same name. It prints the counts of both runs and every test that
passes with torch's classes but not with adamkit's (exit status 1 if there is one).

    python scripts/torch-optim-suite.py /path/to/pytorch/test/test_optim.py [-k EXPR]

The test file is upstream's, at a revision whose tests the installed wheel's
``common_optimizers`` supports (it is not part of this repository). Only its
``TestOptimRenewed`` runs: the test classes it imports from ``test/optim/`` (lr
schedulers, SWA, differentiable optimizers) are not about these entries and are
replaced by empty stand-ins, so the file runs on its own. It needs pytest and
expecttest (torch's test helpers import it; the ``test`` extra installs both). On 2
cores the two runs take about 1 and 1.5 minutes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import types
import xml.etree.ElementTree as ET
from pathlib import Path

#: adamkit from this checkout, not whichever copy is installed.
REPO = Path(__file__).resolve().parents[1]
ENTRIES = ("Adam", "AdamW", "Adamax")
VARIANTS = ("torch", "adamkit")
#: What test_optim.py imports from test/optim/: other test classes, not run here.
STAND_INS = {
    "optim.test_lrscheduler": "TestLRScheduler",
    "optim.test_optim": "TestDifferentiableOptimizer",
    "optim.test_swa_utils": "TestSWAUtils",
}


def _worker(variant: str, test_file: Path, junit: Path, extra: list[str]) -> int:
    """Run upstream's TestOptimRenewed in this process with ``variant``'s classes."""
    sys.path.insert(0, str(REPO))
    import pytest
    from torch.testing._internal import common_optimizers

    import adamkit

    sys.modules.setdefault("optim", types.ModuleType("optim"))
    for module_name, class_name in STAND_INS.items():
        module = sys.modules.setdefault(module_name, types.ModuleType(module_name))
        setattr(module, class_name, type(class_name, (), {}))
    # Before the test module is imported: its @optims decorators read the list then.
    db = common_optimizers.optim_db
    db[:] = [info for info in db if info.name in ENTRIES]
    if variant == "adamkit":
        for info in db:
            info.optim_cls = getattr(adamkit, info.name)
    args = [f"{test_file}::TestOptimRenewedCPU", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    # Not a PyTorch checkout's pytest.ini options or conftest plugins: the file's tests alone.
    args += ["--rootdir", str(test_file.parent), "-o", "addopts=", "--noconftest", *extra]
    return int(pytest.main(args))


def _results(junit: Path) -> dict[str, tuple[str, str]]:
    """test name -> (outcome, the failure's first line), from a JUnit XML report."""
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", (child.get("message") or "").splitlines()[0][:200]
            elif child.tag == "skipped" and outcome == "passed":
                outcome = "skipped"
        out[case.get("name")] = (outcome, message)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("test_file", type=Path, help="upstream's test/test_optim.py")
    parser.add_argument("-k", dest="select", help="pytest -k expression, to run a subset")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--junit", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    test_file = args.test_file.resolve()
    extra = ["-k", args.select] if args.select else []
    if args.worker:
        return _worker(args.worker, test_file, args.junit, extra)

    import torch

    print(f"{test_file} on torch {torch.__version__}, the CPU; adamkit from {REPO}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            junit = Path(tmp) / f"{variant}.xml"
            cmd = [sys.executable, __file__, str(test_file), "--worker", variant, "--junit", str(junit), *extra]
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if not junit.exists():
                sys.stdout.write(proc.stdout + proc.stderr)
                raise SystemExit(f"the {variant} run produced no report (exit status {proc.returncode})")
            results[variant] = _results(junit)
            outcomes = [r for r, _ in results[variant].values()]
            counts = ", ".join(f"{outcomes.count(k)} {k}" for k in ("passed", "failed", "skipped"))
            print(f"{variant:8s} classes: {counts} ({time.perf_counter() - start:.0f} s)")
    ours = results["adamkit"]
    regressions = sorted(
        t for t, (r, _) in results["torch"].items() if r == "passed" and ours.get(t, ("",))[0] != "passed"
    )
    print(f"passing with torch's classes, not with adamkit's: {len(regressions)}")
    for name in regressions:
        outcome, message = ours.get(name, ("not run", ""))
        print(f"  {name}: {outcome} {message}")
    return 1 if regressions else 0


if __name__ == "__main__":
    raise SystemExit(main())
