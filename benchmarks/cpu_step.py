"""Interim CPU benchmark until `adamkit bench` lands: adamkit vs torch AdamW, fp32.

Times one optimizer step of each contender round-robin in one process (the machine
is shared and noisy), reports medians and the ratio against torch's fused AdamW.

    python benchmarks/cpu_step.py            # flat-16M and small (20,000 x 1,000)
    python benchmarks/cpu_step.py --reps 30
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import adamkit

WORKLOADS = {"flat-16M": [(16 * 1024 * 1024,)], "small-20000x1000": [(1000,)] * 20000}


def _params(shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    ps = [torch.zeros(s).requires_grad_() for s in shapes]
    for p in ps:
        p.grad = torch.randn_like(p) * 1e-3
    return ps


def run(shapes: list[tuple[int, ...]], reps: int) -> dict[str, float]:
    contenders = {
        "adamkit (auto)": adamkit.AdamW(_params(shapes)),
        "torch fused": torch.optim.AdamW(_params(shapes), fused=True),
        "torch foreach": torch.optim.AdamW(_params(shapes), foreach=True),
    }
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for rep in range(reps + 2):  # two warm-up rounds (compilation, first-touch)
        for name, opt in contenders.items():
            t0 = time.perf_counter()
            opt.step()
            if rep >= 2:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 AdamW, median of {args.reps}")
    print(f"{'workload':<18}{'optimizer':<16}{'ms/step':>10}{'G el/s':>9}{'vs fused':>10}")
    for workload, shapes in WORKLOADS.items():
        n = sum(torch.Size(s).numel() for s in shapes)
        med = run(shapes, args.reps)
        for name, t in med.items():
            ratio = med["torch fused"] / t
            print(f"{workload:<18}{name:<16}{t * 1e3:>10.2f}{n / t / 1e9:>9.2f}{ratio:>9.2f}x")


if __name__ == "__main__":
    main()
