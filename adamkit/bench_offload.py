"""``adamkit bench --offload``: the optimizer step of CPU offload, adamkit against torchao.

A GPT-2-small-sized set of parameters (``gpt2``: 124M elements in 148 tensors; quick:
``gpt2-mini``) trained by offloaded AdamW:

* adamkit's :class:`~adamkit.CPUOffload` at 32, 8 and 4 bits of state;
* torchao's ``CPUOffloadOptimizer`` with ``torch.optim.AdamW(fused=True)`` (its
  default): one torch optimizer per parameter, stepped in the order the gradients
  arrived, each parameter copied back after its step;
* the backward pass alone (no step), which the other rows include: subtracted, it
  gives each contender's step time.

On a GPU each round times a backward pass (``torch.autograd.backward(params, w)``: each
gradient is a fixed tensor, so what is left is the offload's copies, hooks and step)
plus ``step()``, until the device is done. Without a GPU the parameters stay on the CPU and the copies
are no-ops: adamkit's offload shares the parameters as its host copies, torchao's
optimizer (which refuses a machine without CUDA) is replaced by the same per-parameter
loop over the same tensors, so what is compared is the host step, which is what
limits offload.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from .bench import WORKLOADS, write_json
from .offload import CPUOffload

OFFLOAD_WORKLOADS = ("gpt2",)
OFFLOAD_QUICK_WORKLOADS = ("gpt2-mini",)


class _SharedOffload(CPUOffload):
    """CPU parameters are their own host copies: the copies are no-ops."""

    _share_cpu = True


class _PerParameterOffload:
    """torchao's ``CPUOffloadOptimizer`` loop with the copies as no-ops: one
    ``torch.optim.AdamW(fused=True)`` per parameter, stepped in gradient-arrival order."""

    def __init__(self, params: list[torch.Tensor], **kwargs: Any) -> None:
        self.optims = {p: torch.optim.AdamW([p], fused=True, **kwargs) for p in params}
        self.queue: dict[torch.Tensor, None] = {}
        for p in params:
            p.register_post_accumulate_grad_hook(self._arrived)

    def _arrived(self, p: torch.Tensor) -> None:
        self.queue.pop(p, None)
        self.queue[p] = None

    def step(self) -> None:
        for p in self.queue:
            self.optims[p].step()
        self.queue.clear()

    def zero_grad(self) -> None:
        for opt in self.optims.values():
            opt.zero_grad()


class _BackwardOnly:
    """No step: the backward pass and the synchronization alone, to subtract."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = params

    def step(self) -> None:
        pass

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


#: The row that times backward alone (no ratio: what the others' times include).
BASELINE = "backward alone (no step)"


def contenders(device: torch.device) -> dict[str, Callable[[list[torch.Tensor]], Any]]:
    """Name -> how to build it over ``params`` (on ``device``)."""
    offload = CPUOffload if device.type == "cuda" else _SharedOffload
    out: dict[str, Callable[[list[torch.Tensor]], Any]] = {
        f"adamkit CPUOffload {bits}-bit": (lambda ps, b=bits: offload(ps, lr=1e-3, state_bits=b)) for bits in (32, 8, 4)
    }
    out["adamkit CPUOffload 8-bit tapered"] = lambda ps: offload(ps, lr=1e-3, state_bits=8, quant_map="tapered")
    if device.type == "cuda":
        try:
            from torchao.optim import CPUOffloadOptimizer
        except ImportError:
            CPUOffloadOptimizer = None
        if CPUOffloadOptimizer is not None:
            out["torchao CPUOffloadOptimizer (torch AdamW fused)"] = lambda ps: CPUOffloadOptimizer(
                ps, torch.optim.AdamW, fused=True, lr=1e-3
            )
    else:
        out["torchao's loop (torch AdamW fused per parameter)"] = lambda ps: _PerParameterOffload(ps, lr=1e-3)
    out[BASELINE] = _BackwardOnly
    return out


def speed(workload: str, reps: int, device: torch.device) -> list[dict[str, Any]]:
    """Every contender on ``workload``'s shapes, round-robin, ``reps`` timed rounds each
    after one warm-up round; medians and the ratio to torchao's (>1: faster)."""
    shapes = WORKLOADS[workload]()
    gen = torch.Generator().manual_seed(0)
    runs: dict[str, tuple[Any, list[torch.Tensor], list[torch.Tensor], list[float]]] = {}
    for name, make in contenders(device).items():
        params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device)) for s in shapes]
        weights = [torch.randn(s, generator=gen).to(device) * 1e-3 for s in shapes]  # the gradients
        runs[name] = (make(params), params, weights, [])

    keep = device.type == "cpu"  # gradients zeroed in place: no 0.5 GB of page faults a round

    def one(opt: Any, params: list[torch.Tensor], weights: list[torch.Tensor]) -> float:
        _sync(device)
        t0 = time.perf_counter()
        torch.autograd.backward(params, weights)  # each gradient += its weights, hooks fired
        opt.step()
        _sync(device)
        elapsed = time.perf_counter() - t0
        if keep:
            for p in params:
                p.grad.zero_()
        else:
            opt.zero_grad()
        return elapsed

    for rep in range(reps + 1):
        for opt, params, weights, times in runs.values():
            elapsed = one(opt, params, weights)
            if rep:
                times.append(elapsed)
    elements = sum(math.prod(s) for s in shapes)
    peer = next((times for name, (_, _, _, times) in runs.items() if name.startswith("torchao")), None)
    peer_ms = statistics.median(peer) * 1e3 if peer else None
    rows = []
    for name, (_, _, _, times) in runs.items():
        ms = statistics.median(times) * 1e3
        rows.append(
            dict(
                workload=workload,
                elements=elements,
                optimizer=name,
                median_ms=ms,
                vs_torchao=None if peer_ms is None or name == BASELINE else peer_ms / ms,
                device=str(device),
            )
        )
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace) -> int:
    """``adamkit bench --offload``."""
    from rich.console import Console
    from rich.table import Table

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    workloads = args.workloads or (OFFLOAD_QUICK_WORKLOADS if args.quick else OFFLOAD_WORKLOADS)
    reps = args.reps or (3 if args.quick else 9)
    rows = [r for w in workloads for r in speed(w, reps, device)]
    where = "GPU, real copies" if device.type == "cuda" else "no GPU: the copies are no-ops"
    table = Table(title=f"Offloaded AdamW: backward + step, median of {reps} ({where})")
    for col in ("workload", "optimizer", "ms", "step ms", "vs torchao", "step vs torchao"):
        table.add_column(col, justify="left" if col in ("workload", "optimizer") else "right")
    base = {r["workload"]: r["median_ms"] for r in rows if r["optimizer"] == BASELINE}
    peer = {r["workload"]: r["median_ms"] for r in rows if r["optimizer"].startswith("torchao")}
    for r in rows:
        step = r["median_ms"] - base.get(r["workload"], 0.0)
        r["step_ms"] = None if r["optimizer"] == BASELINE else step
        peer_step = peer.get(r["workload"], 0.0) - base.get(r["workload"], 0.0)
        r["step_vs_torchao"] = peer_step / step if r["step_ms"] and peer_step > 0 and step > 0 else None
        ratio = "" if r["vs_torchao"] is None else f"{r['vs_torchao']:.2f}x"
        step_ratio = "" if r["step_vs_torchao"] is None else f"{r['step_vs_torchao']:.2f}x"
        step_text = "" if r["step_ms"] is None else f"{step:.1f}"
        table.add_row(r["workload"], r["optimizer"], f"{r['median_ms']:.1f}", step_text, ratio, step_ratio)
    Console(width=max(100, Console().width)).print(table)
    if args.json:
        meta = {
            "reps": reps,
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        }
        write_json(args.json, {"meta": meta, "results": rows})
    return 0
