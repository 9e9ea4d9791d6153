"""One table of optimizers x configurations that drives the generic tests.

In the style of torch's ``optim_db`` (torch/testing/_internal/common_optimizers.py):
each entry pairs an adamkit optimizer with the torch.optim class that defines its
math, the state keys it keeps, and the configurations every generic test runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from helpers import fast_share

import adamkit


@dataclass(frozen=True)
class OptimizerInfo:
    name: str
    cls: type[torch.optim.Optimizer]
    torch_cls: type[torch.optim.Optimizer]
    state_keys: Callable[[dict[str, Any]], tuple[str, ...]]
    configs: list[dict[str, Any]] = field(default_factory=list)
    default_lr: float = 1e-3
    default_weight_decay: float = 0.0

    def pairs(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for kw in self.configs:
            yield f"{self.name}-" + ("-".join(f"{k}={_fmt(v)}" for k, v in kw.items()) or "defaults"), kw


def _fmt(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"tensor({v.item():g})"
    if isinstance(v, tuple):
        return "(" + ",".join(_fmt(x) for x in v) + ")"
    return f"{v:g}" if isinstance(v, float) else str(v)


def _adam_keys(kw: dict[str, Any]) -> tuple[str, ...]:
    return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if kw.get("amsgrad") else ("exp_avg", "exp_avg_sq")


NON_DEFAULT = dict(lr=0.02, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
T64 = dict(dtype=torch.float64)

ADAM_CONFIGS = [
    {},
    NON_DEFAULT,
    {**NON_DEFAULT, "amsgrad": True},
    {**NON_DEFAULT, "maximize": True},
    {**NON_DEFAULT, "amsgrad": True, "maximize": True},
    {"lr": torch.tensor(0.01, **T64), "weight_decay": 0.05},
    {"betas": (torch.tensor(0.85, **T64), torch.tensor(0.99, **T64)), "amsgrad": True},
    {"betas": (0.0, 0.0), "eps": 0.0, "lr": 0.01},
    {"lr": 0.0, "weight_decay": 0.3},
]

OPTIMIZERS = [
    OptimizerInfo(
        "Adam",
        adamkit.Adam,
        torch.optim.Adam,
        _adam_keys,
        ADAM_CONFIGS + [{**NON_DEFAULT, "decoupled_weight_decay": True}],
    ),
    OptimizerInfo("AdamW", adamkit.AdamW, torch.optim.AdamW, _adam_keys, ADAM_CONFIGS, default_weight_decay=1e-2),
    OptimizerInfo(
        "Adamax",
        adamkit.Adamax,
        torch.optim.Adamax,
        lambda kw: ("exp_avg", "exp_inf"),
        [
            {},
            NON_DEFAULT,
            {**NON_DEFAULT, "maximize": True},
            {"lr": torch.tensor(0.01, **T64), "weight_decay": 0.05},
            {"betas": (0.0, 0.5), "eps": 1e-3},
        ],
        default_lr=2e-3,
    ),
]

OPTIMIZERS.append(
    OptimizerInfo(
        "NAdam",
        adamkit.NAdam,
        torch.optim.NAdam,
        lambda kw: ("exp_avg", "exp_avg_sq"),
        [
            {},
            NON_DEFAULT,
            {**NON_DEFAULT, "maximize": True},
            {**NON_DEFAULT, "decoupled_weight_decay": True},
            {**NON_DEFAULT, "momentum_decay": 0.05},
            {"lr": torch.tensor(0.01, **T64), "weight_decay": 0.05},
            {"betas": (0.0, 0.0), "eps": 0.0, "lr": 0.01},
            {"lr": 0.0, "weight_decay": 0.3},
        ],
        default_lr=2e-3,
    )
)

OPTIM_IDS = [o.name for o in OPTIMIZERS]
ALL_CONFIGS = [(o, kw) for o in OPTIMIZERS for _, kw in o.pairs()]
ALL_CONFIG_IDS = [cid for o in OPTIMIZERS for cid, _ in o.pairs()]


def sweep(configs: list | None = None, ids: list[str] | None = None) -> list:
    """``configs`` (default: every configuration of the table) with their ``ids`` as
    parameters of a sweep: the full suite runs every one, the fast tier one per optimizer,
    the configuration with the most options (first among equals; see
    :func:`helpers.fast_share`)."""
    configs, ids = (ALL_CONFIGS, ALL_CONFIG_IDS) if configs is None else (configs, ids)
    richest: dict[str, tuple[int, str]] = {}
    for (info, kw), cid in zip(configs, ids):
        if info.name not in richest or len(kw) > richest[info.name][0]:
            richest[info.name] = (len(kw), cid)
    return fast_share(configs, ids, {cid for _, cid in richest.values()})
