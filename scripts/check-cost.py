"""What the cached plans' per-step checks cost: GPT-2's 148 tensors and 20,000 small ones.

Times ``GroupPlan.prepare`` (every check a step makes before its kernels run: each
parameter's and gradient's type, dtype, sizes, strides, device, address and storage)
with the checks in Python and in torch's C++ API (adamkit/optim/_native.py), with
the tensors' metadata in cache and after a 256 MB stream through memory (as in
training, where the step itself evicts it from every cache), beside the whole
AdamW step and torch's fused one. Medians of --reps rounds; one process, round-robin.

    python scripts/check-cost.py [--reps 15]
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import numpy as np
import torch

import adamkit
from adamkit import bench
from adamkit.optim import _native


def measure(shapes: list[tuple[int, ...]], reps: int) -> dict[str, float]:
    params = [torch.zeros(s).requires_grad_() for s in shapes]
    twins = [torch.zeros(s).requires_grad_() for s in shapes]
    for p, q in zip(params, twins):
        p.grad, q.grad = torch.randn(p.shape) * 1e-3, torch.randn(p.shape) * 1e-3
    opt, ref = adamkit.AdamW(params), torch.optim.AdamW(twins, fused=True)
    opt.step()
    ref.step()
    plan = opt._plans[0]
    native = _native.module(wait=True)
    stream = np.ones(1 << 26, dtype=np.float32)  # 256 MB: the step's stream evicts the metadata as this does
    results: dict[str, list[float]] = {}

    def python() -> None:
        with mock.patch.object(_native, "module", lambda start=True, wait=False: None):
            plan.prepare()

    runs = {"checks (Python)": python, "adamkit step": opt.step, "torch fused step": ref.step}
    if native is not None:
        plan.prepare()  # takes the native record
        runs["checks (C++)"] = plan.prepare
    for _ in range(reps):
        for name, run in runs.items():
            for cold in (False, True):
                if cold:
                    stream.sum()
                start = time.perf_counter()
                run()
                results.setdefault(f"{name}, {'cold' if cold else 'warm'}", []).append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1e3 for k, v in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    loaded = _native.module(wait=True) is not None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; native checks loaded: {loaded}")
    for name, workload in (("gpt2 (148 tensors)", "gpt2"), ("small (20,000 tensors)", "small")):
        shapes = bench.WORKLOADS[workload]()
        print(f"\n{name}: ms per step, median of {args.reps}")
        for what, ms in measure(shapes, args.reps).items():
            print(f"  {what:28s} {ms:9.3f}")


if __name__ == "__main__":
    main()
