"""``adamkit bench --mlx``: adamkit.mlx against mlx.optimizers on MLX's default device.

Three measurements, in one process:

* **speed**: one optimizer step over the same shapes as the torch bench's workloads,
  ``adamkit.mlx.AdamW`` at 32, 8 and 4 bits against ``mlx.optimizers.AdamW`` with
  ``bias_correction=True`` (torch's math), round-robin, medians: elements per second,
  state bytes per parameter, the ratio against MLX's AdamW;
* **accuracy**: the torch bench's low-bit update-error workload
  (:func:`adamkit.bench.accuracy`) in MLX;
* **convergence**: a small regression trained with 32-bit state, adamkit.mlx's 8-bit
  state, and both moments in MLX's own 8-bit affine ``mx.quantize`` format (the
  obvious way to quantize state in MLX): the last loss of each.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import torch
from mlx.utils import tree_flatten, tree_map

from . import AdamW, _native

MLX_WORKLOADS = ("flat-16M", "gpt2", "small")
MLX_QUICK_WORKLOADS = ("flat-1M", "gpt2-mini", "small-2k")
REFERENCE = "mlx AdamW"


def contenders() -> dict[str, Callable[[], optim.Optimizer]]:
    return {
        REFERENCE: lambda: optim.AdamW(1e-3, bias_correction=True),
        "adamkit.mlx AdamW": lambda: AdamW(1e-3),
        "adamkit.mlx 8-bit": lambda: AdamW(1e-3, state_bits=8),
        "adamkit.mlx 4-bit": lambda: AdamW(1e-3, state_bits=4),
    }


def state_bytes(opt: optim.Optimizer, n: int) -> float:
    """Bytes of per-parameter state (moments, codes, scales) per parameter element."""
    total = sum(v.nbytes for k, v in tree_flatten(opt.state) if "." in k)
    return total / n


def speed(workload: str, reps: int, progress: Any = None) -> list[dict[str, Any]]:
    """One step of each contender on ``workload``'s shapes, ``reps`` rounds after a warm-up."""
    from ..bench import WORKLOADS

    shapes = WORKLOADS[workload]()
    n = sum(math.prod(s) for s in shapes)
    params0 = {f"p{i}": mx.random.normal(s, key=mx.random.key(i)) * 0.02 for i, s in enumerate(shapes)}
    grads = {
        k: mx.random.normal(v.shape, key=mx.random.key(10**6 + i)) * 1e-3 for i, (k, v) in enumerate(params0.items())
    }
    mx.eval(params0, grads)
    runs = {name: [make(), params0, []] for name, make in contenders().items()}
    for rep in range(reps + 1):
        for name, run in runs.items():
            if progress is not None:
                progress.step(f"mlx {workload}", name, rep, reps)
            opt, params, times = run
            t0 = time.perf_counter()
            params = opt.apply_gradients(grads, params)
            mx.eval(params, opt.state)
            if rep:
                times.append(time.perf_counter() - t0)
            run[1] = params
            if progress is not None:
                progress.advance()
    reference = statistics.median(runs[REFERENCE][2])
    rows = []
    for name, (opt, _, times) in runs.items():
        median = statistics.median(times)
        rows.append(
            dict(
                workload=workload,
                optimizer=name,
                median_ms=median * 1e3,
                elements_per_s=n / median,
                state_bytes_per_param=state_bytes(opt, n),
                vs_mlx_adamw=reference / median,
                times_ms=[t * 1e3 for t in times],
            )
        )
    return rows


def accuracy(rows: int = 2048, cols: int = 512, steps: int = 100) -> dict[str, float]:
    """:func:`adamkit.bench.accuracy`'s workload (same gradients, torch's generators) in
    MLX: relative L2 error of the total update of each low-bit AdamW against 32-bit."""
    gen = torch.Generator().manual_seed(0)
    scales = torch.logspace(-4, -1, rows)[:, None]
    signal = torch.randn(rows, cols, generator=gen)
    start = mx.array((torch.randn(rows, cols, generator=gen) * 0.02).numpy())
    makers: dict[str, Callable[[], optim.Optimizer]] = {
        "fp32": lambda: AdamW(),
        "adamkit.mlx 8-bit": lambda: AdamW(state_bits=8),
        "adamkit.mlx 4-bit": lambda: AdamW(state_bits=4),
        "mlx affine 8-bit": lambda: AffineAdamW(1e-3),
    }
    opts = {name: make() for name, make in makers.items()}
    params = {name: {"w": start} for name in makers}
    noise = torch.Generator().manual_seed(1)
    for _ in range(steps):
        g = {"w": mx.array((scales * (signal + torch.randn(rows, cols, generator=noise))).numpy())}
        for name, opt in opts.items():
            params[name] = opt.apply_gradients(g, params[name])
        mx.eval([p for p in params.values()], [o.state for o in opts.values()])
    exact = params["fp32"]["w"] - start
    norm = float(mx.sqrt(mx.sum(exact * exact)))
    out = {}
    for name in opts:
        if name != "fp32":
            diff = params[name]["w"] - start - exact
            out[name] = float(mx.sqrt(mx.sum(diff * diff))) / norm
    return out


class AffineAdamW(optim.AdamW):
    """AdamW (torch's math) with both moments stored in MLX's 8-bit affine ``mx.quantize``
    format (groups of 64: a scale and a bias each): what MLX offers for quantized arrays,
    used here to show why optimizer state needs its own codebooks."""

    GROUP = 64

    def __init__(self, learning_rate: float, **kwargs: Any) -> None:
        super().__init__(learning_rate, bias_correction=True, **kwargs)

    def _pack(self, x: mx.array) -> tuple[mx.array, ...]:
        flat = x.reshape(-1)
        pad = (-flat.size) % self.GROUP
        if pad:
            flat = mx.concatenate([flat, mx.zeros((pad,), flat.dtype)])
        return mx.quantize(flat.reshape(-1, self.GROUP), group_size=self.GROUP, bits=8)

    def _unpack(self, packed: tuple[mx.array, ...], like: mx.array) -> mx.array:
        flat = mx.dequantize(*packed, group_size=self.GROUP, bits=8).reshape(-1)
        return flat[: like.size].reshape(like.shape)

    def init_single(self, parameter: mx.array, state: dict) -> None:
        state["m"] = self._pack(mx.zeros_like(parameter))
        state["v"] = self._pack(mx.zeros_like(parameter))

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        inner = {"m": self._unpack(state["m"], parameter), "v": self._unpack(state["v"], parameter)}
        out = super().apply_single(gradient, parameter, inner)
        state["m"], state["v"] = self._pack(inner["m"]), self._pack(inner["v"])
        return out


def convergence(steps: int = 300) -> dict[str, list[float]]:
    """A two-layer regression (64 -> 256 -> 16, targets from a fixed random teacher)
    trained with each optimizer from the same start: the loss every 10 steps."""
    import mlx.nn as nn

    x = mx.random.normal((512, 64), key=mx.random.key(1))
    teacher = mx.random.normal((64, 16), key=mx.random.key(2)) / 8.0
    y = mx.tanh(x @ teacher)
    makers: dict[str, Callable[[], optim.Optimizer]] = {
        "32-bit": lambda: AdamW(1e-3),
        "adamkit.mlx 8-bit": lambda: AdamW(1e-3, state_bits=8),
        "mlx affine 8-bit": lambda: AffineAdamW(1e-3),
    }
    out: dict[str, list[float]] = {}
    for name, make in makers.items():
        mx.random.seed(0)
        model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 16))
        opt = make()
        loss_and_grad = nn.value_and_grad(model, lambda m: mx.mean((m(x) - y) ** 2))
        losses = []
        for step in range(steps):
            loss, grads = loss_and_grad(model)
            opt.update(model, grads)
            mx.eval(model.parameters(), opt.state)
            if step % 10 == 9:
                losses.append(float(loss))
        out[name] = losses
    return out


def run(args: argparse.Namespace) -> int:
    """``adamkit bench --mlx``."""
    from rich.console import Console
    from rich.table import Table

    from ..bench import Progress, write_json

    workloads = args.workloads or (MLX_QUICK_WORKLOADS if args.quick else MLX_WORKLOADS)
    reps = args.reps or (3 if args.quick else 9)
    log = None if getattr(args, "no_log", False) else getattr(args, "log", None)
    progress = Progress(len(workloads) * (reps + 1) * len(contenders()), log)
    meta: dict[str, Any] = {
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "machine": platform.processor() or platform.machine(),
        "reps": reps,
    }
    rows: list[dict[str, Any]] = []
    try:
        if _native.module(start=False) is None and not _native.cached():
            progress.line("building adamkit.mlx's compiled quantized step (once; ~40 s)")
        _native.module(wait=True)  # time the step users get once it is built
        meta["quantized_step"] = "compiled (C++)" if _native.module(start=False) else f"MLX ops ({_native.status})"
        for workload in workloads:
            rows += speed(workload, reps, progress)
        if not args.no_accuracy:
            progress.line("low-bit update error against 32-bit AdamW (MLX)")
            shape = dict(rows=256, cols=512, steps=20) if args.quick else dict(rows=2048, cols=512, steps=100)
            meta["accuracy"] = {"relative_update_error": accuracy(**shape), **shape}
            progress.line("convergence: 32-bit, adamkit 8-bit and affine 8-bit state")
            losses = convergence(100 if args.quick else 300)
            meta["convergence"] = {name: values[-1] for name, values in losses.items()}
        progress.line("done")
    finally:
        progress.close()
    table = Table(title=f"MLX optimizer step, AdamW, median of {reps} ({meta['device']})")
    for col in ("workload", "optimizer", "state B/param", "ms/step", "G el/s", "vs mlx AdamW"):
        table.add_column(col, justify="left" if col in ("workload", "optimizer") else "right")
    for r in rows:
        table.add_row(
            r["workload"],
            r["optimizer"],
            f"{r['state_bytes_per_param']:.3g}",
            f"{r['median_ms']:.2f}",
            f"{r['elements_per_s'] / 1e9:.3f}",
            f"{r['vs_mlx_adamw']:.2f}x",
        )
    console = Console(width=max(110, Console().width))
    console.print(table)
    if "accuracy" in meta:
        errors = ", ".join(f"{k} {v:.3g}" for k, v in meta["accuracy"]["relative_update_error"].items())
        console.print(f"update error vs 32-bit AdamW (relative L2, lower is better): {errors}")
        final = ", ".join(f"{k} {v:.4g}" for k, v in meta["convergence"].items())
        console.print(f"regression loss at the end of training: {final}")
    if args.json:
        write_json(args.json, {"meta": meta, "results": rows}, default=_plain)
    return 0


def _plain(value: Any) -> Any:
    return float(value) if isinstance(value, (np.floating, float)) else str(value)


__all__ = ["AffineAdamW", "accuracy", "contenders", "convergence", "run", "speed", "tree_map"]
