"""A short demo: train one small model with each adamkit optimizer beside torch.optim.

Run it with ``python -m adamkit`` (or ``adamkit demo``). Each pair of optimizers starts
from the same weights and sees the same batches, so the losses should agree to many
digits and the parameters to rounding error.
"""

from __future__ import annotations

import time
from functools import partial

import torch

import adamkit

PAIRS = [
    ("Adam", dict(lr=1e-2, weight_decay=1e-4)),
    ("AdamW", dict(lr=1e-2, weight_decay=1e-2)),
    ("Adam", dict(lr=1e-2, amsgrad=True)),
    ("Adamax", dict(lr=2e-2)),
]


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    return net.double()


def train(make_opt, steps: int = 200, seed: int = 0) -> tuple[list[float], torch.nn.Module]:
    """Fit y = sin(x·w) on fixed random data; return the loss curve and the model."""
    model = _model(seed)
    opt = make_opt(model.parameters())
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(512, 16, generator=gen, dtype=torch.float64)
    y = torch.sin(x @ torch.randn(16, 1, generator=gen, dtype=torch.float64))
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model


def main(steps: int = 200) -> int:
    print(f"adamkit {adamkit.__version__} demo: {steps} steps of a 16-64-1 MLP, adamkit vs torch.optim\n")
    print(f"{'optimizer':<28}{'first loss':>12}{'final loss':>14}{'torch final':>14}{'max |Δθ|':>12}{'time':>8}")
    worst = 0.0
    for name, kwargs in PAIRS:
        t0 = time.perf_counter()
        ours, m1 = train(partial(getattr(adamkit, name), **kwargs), steps)
        dt = time.perf_counter() - t0
        theirs, m2 = train(partial(getattr(torch.optim, name), **kwargs), steps)
        diff = max((a - b).abs().max().item() for a, b in zip(m1.parameters(), m2.parameters()))
        worst = max(worst, diff)
        label = name + "".join(f" {k}={v}" for k, v in kwargs.items() if k != "lr")
        print(f"{label:<28}{ours[0]:>12.5f}{ours[-1]:>14.6f}{theirs[-1]:>14.6f}{diff:>12.1e}{dt:>7.2f}s")
    ok = worst < 1e-9
    print(f"\n{'OK' if ok else 'MISMATCH'}: largest parameter difference from torch.optim {worst:.1e} (float64)")
    return 0 if ok else 1
