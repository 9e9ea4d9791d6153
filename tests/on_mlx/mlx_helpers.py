"""Shared machinery of the MLX tests: optim_db's configurations in MLX's terms, arrays
both ways, and the tolerance of "equal to torch.optim in float32"."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np
import torch

import adamkit.mlx as am

#: The MLX class of each optim_db entry.
MLX_CLASSES = {"Adam": am.Adam, "AdamW": am.AdamW, "Adamax": am.Adamax, "NAdam": am.NAdam}


def mlx_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    """A torch configuration as MLX arguments: tensor hyperparameters as floats (MLX's
    ``learning_rate`` is an array or a schedule; its betas floats)."""
    out: dict[str, Any] = {}
    for key, value in kw.items():
        if isinstance(value, torch.Tensor):
            value = float(value)
        elif isinstance(value, tuple):
            value = tuple(float(v) for v in value)
        out["learning_rate" if key == "lr" else key] = value
    return out


def to_np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a)


def tt(a: mx.array) -> torch.Tensor:
    """An MLX array as a torch tensor (bf16 exactly)."""
    return am.convert.to_torch(a)


def ta(t: torch.Tensor) -> mx.array:
    return am.convert.to_mx(t)


def float32_tolerance(path_length: torch.Tensor | float, params: torch.Tensor) -> torch.Tensor:
    """What "equal to torch.optim in float32" allows each element after a run: 1e-6 of
    the update path (the sum over steps of the largest update), plus four float32 ulps of
    the parameter (the two frameworks round each step's ``θ - Δ`` on their own)."""
    ulp = torch.finfo(torch.float32).eps * params.abs()
    return 1e-6 * path_length + 4 * ulp
