"""What every backend shares (``adamkit/kernels/``): the registry's choice of kernel,
the reference's helpers and its running on any device, the work tables that split
tensors into chunks and units."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import adamkit
from adamkit.kernels import _tables, reference
from adamkit.kernels.cpu import dense as numba_cpu
from adamkit.kernels.registry import resolve


def test_auto_resolution() -> None:
    for algorithm in ("adam", "adamax"):
        assert resolve(algorithm, "cpu", 32).fn is getattr(numba_cpu, f"{algorithm}_")
        assert resolve(algorithm, "cpu", 32, fused=False).fn is getattr(reference, f"{algorithm}_")
        assert resolve(algorithm, "meta", 32).backend == "reference"


def test_nonfinite_indices() -> None:
    ts = [
        torch.ones(3),
        torch.tensor([1.0, float("nan")]),
        torch.empty(0),
        torch.tensor([float("inf")], dtype=torch.float64),
    ]
    assert reference.nonfinite_indices(ts) == [1, 3]
    assert reference.nonfinite_indices([torch.tensor([3e38, 3e38])]) == []  # large but finite


@pytest.mark.parametrize("nonfinite", ["mask", "skip", "raise", "propagate"])
def test_reference_runs_on_the_meta_device(nonfinite: str) -> None:
    """The reference is pure torch: any device works, as far as its ops are implemented.
    Meta tensors have no values: the non-finite screening passes them (as torch, which
    steps meta parameters with ``fused=None``)."""
    p = torch.nn.Parameter(torch.zeros(4, device="meta"))
    p.grad = torch.zeros(4, device="meta")
    opt = adamkit.AdamW([p], nonfinite=nonfinite)
    opt.step()
    assert opt.state[p]["exp_avg"].device.type == "meta" and opt.state[p]["step"].item() == 1


@pytest.mark.parametrize(
    "numels", [[16_777_216], [1000] * 20_000, [5], [40_000, 10, 70_000, 0, 3], [_tables.UNIT] * 3, []]
)
def test_work_units_cover_every_chunk_once_in_runs_of_about_unit_elements(numels) -> None:
    chunks = _tables.chunk_table(numels)
    units = _tables.unit_table(chunks)
    assert units[0] == 0 and units[-1] == chunks.shape[0]
    assert (np.diff(units) > 0).all()  # no empty unit, none claimed twice
    sizes = [int((chunks[a:b, 2] - chunks[a:b, 1]).sum()) for a, b in zip(units[:-1], units[1:])]
    assert sum(sizes) == sum(numels)
    assert all(s <= _tables.UNIT + _tables.CHUNK for s in sizes)
    assert all(s > _tables.UNIT - _tables.CHUNK for s in sizes[:-1])  # only the last one is short
