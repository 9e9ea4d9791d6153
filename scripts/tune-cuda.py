"""Time the Triton kernels' launch settings on a GPU, for choosing them from timings.

For the dense kernel (fp32 AdamW) it sweeps ``BLOCK`` and the warps per program; for
the quantized one (8-bit AdamW) the tile, the tiles a program steps, the warps and the
register cap given to ptxas. Each variant steps one flat tensor with ``adamkit.AdamW``
(the first step compiles it and is not timed), timed by CUDA events over ``--steps``
steps, several rounds in turn with torch's fused AdamW and a device-to-device copy of
the same bytes, so that a slow spell of a shared GPU shows in both. Reported: median
ms per step, bandwidth, and the ratio to torch fused in the same rounds; the settings
in use now are marked.

    python scripts/tune-cuda.py                      # on a GPU (scripts/gpu-check.sh runs it)
    python scripts/tune-cuda.py --device cpu --n 5000 --quick   # the same code path, in
                                                     # Triton's interpreter: no timings worth reading

It ends with the ``adamkit.kernels.cuda.triton_kernels.launch_settings(...)`` call that sets
each kernel's fastest settings (a program runs it before its first step), when they
beat those in use by 3 % against torch fused in the same rounds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import adamkit  # noqa: E402
import adamkit.kernels.cuda.triton_kernels as tc  # noqa: E402

#: (name, bytes moved per element, optimizer keywords)
DENSE = ("dense fp32 AdamW", 28, {})
QUANT = ("8-bit AdamW", 16, {"state_bits": 8, "min_quant_size": 0})
KNOBS = ("BLOCK", "DENSE_WARPS", "QUANT_TILE", "QUANT_TILES", "QUANT_WARPS", "QUANT_MAXNREG")


def variants(quick: bool) -> list[tuple[tuple[str, int, dict[str, Any]], dict[str, Any]]]:
    """(kernel, settings) pairs: each kernel's settings in use now first, then the sweep."""
    now = {k: getattr(tc, k) for k in KNOBS}
    dense = [{"BLOCK": b, "DENSE_WARPS": w} for b, w in itertools.product((512, 1024, 2048, 4096), (4, 8))]
    quant = [
        {"QUANT_TILE": t, "QUANT_TILES": n, "QUANT_WARPS": w, "QUANT_MAXNREG": r}
        for t, n, w, r in itertools.product((512, 1024), (1, 2, 4), (4, 8), (None, 96, 80))
        if not (w == 8 and t == 512)  # 2 elements per thread: too few for 16-byte accesses
    ]
    if quick:
        dense, quant = dense[:2], quant[:2]
    out = []
    for kernel, sweep, keys in ((DENSE, dense, KNOBS[:2]), (QUANT, quant, KNOBS[2:])):
        current = {k: now[k] for k in keys}
        out += [(kernel, current)] + [(kernel, s) for s in sweep if s != current]
    return out


def _timer(device: torch.device) -> Callable[[Callable[[], Any], int], float]:
    """Seconds per call of ``fn``, timed over ``steps`` calls (CUDA events on a GPU)."""

    def cuda(fn: Callable[[], Any], steps: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / steps

    def host(fn: Callable[[], Any], steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        return (time.perf_counter() - t0) / steps

    return cuda if device.type == "cuda" else host


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--n", type=int, default=1 << 24, help="elements of the flat tensor (default 16M)")
    parser.add_argument("--steps", type=int, default=10, help="steps per timing")
    parser.add_argument("--rounds", type=int, default=5, help="timings per variant (median)")
    parser.add_argument("--budget", type=float, default=150.0, help="seconds; later variants are left out")
    parser.add_argument("--quick", action="store_true", help="two variants per kernel")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("tune-cuda: torch sees no CUDA GPU here (--device cpu runs the interpreter)")
    timer = _timer(device)
    gen = torch.Generator().manual_seed(0)
    grad = (torch.randn(args.n, generator=gen) * 1e-3).to(device)

    def stepper(make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]) -> Callable[[], Any]:
        p = torch.zeros(args.n, device=device, requires_grad=True)
        p.grad = grad
        return make([p]).step

    torch_fused = stepper(lambda ps: torch.optim.AdamW(ps, fused=device.type == "cuda"))
    src = torch.ones(7 * args.n // 2, device=device)
    dst = torch.empty_like(src)
    torch_fused()
    saved = {k: getattr(tc, k) for k in KNOBS}
    began = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for (name, per_element, kw), settings in variants(args.quick):
        if time.perf_counter() - began > args.budget:
            print(f"tune-cuda: budget of {args.budget:.0f} s spent; later variants left out", file=sys.stderr)
            break
        tc.launch_settings(**{**saved, **settings})
        try:
            step = stepper(lambda ps: adamkit.AdamW(ps, backend="triton", **kw))  # noqa: B023 - used at once
            step()  # compiles
        except Exception as exc:  # noqa: BLE001 - a variant the compiler refuses is reported, not fatal
            rows.append({"kernel": name, **settings, "error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        ours, theirs, copy = [], [], []
        for _ in range(args.rounds):
            ours.append(timer(step, args.steps))
            theirs.append(timer(torch_fused, args.steps))
            copy.append(timer(lambda: dst.copy_(src), args.steps))
        t = statistics.median(ours)
        rows.append({
            "kernel": name, **settings, "current": settings == {k: saved[k] for k in settings},
            "ms": t * 1e3, "GBps": per_element * args.n / t / 1e9,
            "copy_GBps": 28 * args.n / statistics.median(copy) / 1e9,
            "vs_torch_fused": statistics.median(a / b for a, b in zip(theirs, ours)),
        })  # fmt: skip
    tc.launch_settings(**saved)
    _print(rows, device)
    best = fastest(rows)
    if best:
        call = ", ".join(f"{k}={v}" for k, v in best.items())
        print(f"fastest settings here: adamkit.kernels.cuda.triton_kernels.launch_settings({call})")
    else:
        print("the settings in use now are the fastest here")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": _device_name(device), "n": args.n, "rows": rows, "fastest": best}, f, indent=2)
    return 0


#: How much faster than the settings in use (against torch fused, in the same rounds)
#: others must be to be proposed: less is within a GPU's run-to-run noise.
MARGIN = 1.03


def fastest(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per kernel, the settings of the row fastest against torch fused in the same
    rounds (a slow spell of the GPU slows both), where they beat those in use by
    ``MARGIN``."""
    out: dict[str, Any] = {}
    for kernel in dict.fromkeys(r["kernel"] for r in rows):
        timed = [r for r in rows if r["kernel"] == kernel and "error" not in r]
        now = [r["vs_torch_fused"] for r in timed if r["current"]]
        if timed and now:
            best = max(timed, key=lambda r: r["vs_torch_fused"])
            if best["vs_torch_fused"] >= MARGIN * now[0]:
                out.update({k: best[k] for k in KNOBS if k in best})
    return out


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton's interpreter)"


def _print(rows: list[dict[str, Any]], device: torch.device) -> None:
    table = Table(title=f"Triton launch settings on {_device_name(device)} (median ms per step; * = in use now)")
    for col in ("kernel", "settings", "ms", "GB/s", "copy GB/s", "vs torch fused"):
        table.add_column(col, justify="left" if col in ("kernel", "settings") else "right")
    for r in rows:
        settings = ", ".join(f"{k}={r[k]}" for k in KNOBS if k in r)
        if "error" in r:
            table.add_row(r["kernel"], settings, r["error"], "", "", "")
            continue
        mark = "* " if r["current"] else ""
        table.add_row(r["kernel"], mark + settings, f"{r['ms']:.3f}", f"{r['GBps']:.0f}", f"{r['copy_GBps']:.0f}",
                      f"{r['vs_torch_fused']:.2f}x")  # fmt: skip
    Console(width=140).print(table)


if __name__ == "__main__":
    sys.exit(main())
