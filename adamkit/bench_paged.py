"""``adamkit bench --paged``: paged (memory-mapped) optimizer state on the CPU.

Two measurements, in one process and its children:

* **speed**: adamkit's AdamW at 32 and 8 bits with state in ordinary memory and in a
  memory-mapped file (``paged=True``), round-robin, medians, the paged step's speed as
  a ratio of the in-RAM one (the page cache holds the file here);
* **budget**: a child process caps its anonymous memory (``RLIMIT_DATA``) below what
  parameters, gradients and 32-bit state need together, then trains a few steps with
  paged state (which the limit does not count) and with in-RAM state (which it does).
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

import adamkit

from .bench import WORKLOADS, write_json

PAGED_WORKLOADS = ("flat-16M", "gpt2")
PAGED_QUICK_WORKLOADS = ("flat-1M",)


def speed(workload: str, bits: int, reps: int) -> dict[str, Any]:
    """One AdamW step on ``workload``'s shapes, in-RAM and paged state, ``reps`` rounds."""
    shapes = WORKLOADS[workload]()
    gen = torch.Generator().manual_seed(0)
    runs = {}
    for paged in (False, True):
        params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        opt = adamkit.AdamW(params, lr=1e-3, state_bits=bits, paged=paged)
        opt.step()  # state created (and the file's pages touched)
        runs[paged] = (opt, [])
    for _ in range(reps):
        for opt, times in runs.values():
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
    ram, paged = (statistics.median(runs[k][1]) for k in (False, True))
    return dict(
        workload=workload,
        bits=bits,
        elements=sum(math.prod(s) for s in shapes),
        in_ram_ms=ram * 1e3,
        paged_ms=paged * 1e3,
        paged_vs_in_ram=ram / paged,
    )


_BUDGET_CHILD = """
import resource, sys, time, torch, adamkit
n = int(sys.argv[1]); paged = sys.argv[2] == "paged"
p = torch.nn.Parameter(torch.zeros(n)); p.grad = torch.full((n,), 1e-3)
data = int([l for l in open("/proc/self/status") if l.startswith("VmData")][0].split()[1]) * 1024
budget = data + n * 4  # room for half the 32-bit state (8 bytes per element)
resource.setrlimit(resource.RLIMIT_DATA, (budget, resource.RLIM_INFINITY))
opt = adamkit.AdamW([p], lr=0.01, paged=paged)
try:
    opt.step()
    t0 = time.perf_counter()
    for _ in range(3):
        opt.step()
    print(f"ok {(time.perf_counter() - t0) / 3 * 1e3:.1f} {budget - data}")
except (RuntimeError, MemoryError) as err:
    print(f"oom {type(err).__name__} {budget - data}")
"""


def budget(n: int) -> dict[str, Any]:
    """Train ``n`` parameters under a data limit with room for half their state."""
    out: dict[str, Any] = {"elements": n, "state_mb": 8 * n / 2**20}
    for mode in ("paged", "in-RAM"):
        done = subprocess.run(
            [sys.executable, "-c", _BUDGET_CHILD, str(n), "paged" if mode == "paged" else "ram"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        words = (done.stdout.strip().split() or ["failed"]) + ["", "", ""]
        out["budget_mb"] = int(words[2]) / 2**20 if words[2].isdigit() else None
        failed = f"out of memory ({words[1] or done.returncode})"
        out[mode] = f"trains, {words[1]} ms/step" if words[0] == "ok" else failed
    return out


def run(args: argparse.Namespace) -> int:
    """``adamkit bench --paged``."""
    from rich.console import Console
    from rich.table import Table

    workloads = args.workloads or (PAGED_QUICK_WORKLOADS if args.quick else PAGED_WORKLOADS)
    reps = args.reps or (3 if args.quick else 9)
    rows = [speed(w, bits, reps) for w in workloads for bits in (32, 8)]
    limit = budget(10_000_000 if args.quick else 50_000_000)  # room for a thread stack or two
    table = Table(title=f"AdamW step, in-RAM vs paged state (CPU, median of {reps})")
    for col in ("workload", "bits", "in-RAM ms", "paged ms", "paged vs in-RAM"):
        table.add_column(col, justify="left" if col == "workload" else "right")
    for r in rows:
        times = f"{r['in_ram_ms']:.2f}", f"{r['paged_ms']:.2f}", f"{r['paged_vs_in_ram']:.2f}x"
        table.add_row(r["workload"], str(r["bits"]), *times)
    console = Console(width=max(100, Console().width))
    console.print(table)
    console.print(
        f"{limit['elements']:,} parameters, {limit['state_mb']:.0f} MB of 32-bit state, RLIMIT_DATA with room for "
        f"{limit['budget_mb'] or 0:.0f} MB: paged state {limit['paged']}; in-RAM state {limit['in-RAM']}"
    )
    if args.json:
        meta = {"reps": reps, "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
        write_json(args.json, {"meta": meta, "speed": rows, "budget": limit})
    return 0
