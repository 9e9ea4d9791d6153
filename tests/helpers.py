"""Shared test machinery: parameters, gradient streams, lockstep comparison, snapshots."""

from __future__ import annotations

import io
from collections.abc import Callable, Collection, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

#: The repository's root (this file is tests/helpers.py): the README, docs/, scripts/, examples/.
ROOT = Path(__file__).resolve().parent.parent

# Shapes every generic test steps: scalars, odd sizes, an empty tensor, a complex one.
SHAPES: list[tuple[int, ...]] = [(5, 3), (7,), (), (2, 3, 4), (0,), (1,), (300,)]
COMPLEX_SHAPE = (3, 2)

TOLERANCES = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=2e-6, rtol=1e-5)}


def make_params(dtype: torch.dtype = torch.float64, seed: int = 0, complex_param: bool = True) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]
    if complex_param:
        cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        params.append(torch.randn(COMPLEX_SHAPE, generator=gen, dtype=cdtype))
    return [p.requires_grad_() for p in params]


def clone_params(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_(p.requires_grad) for p in params]


def default_frozen(step: int, index: int) -> bool:
    """Param 1 gets no gradient on steps 3-7, param 3 only on even steps: steps lag."""
    return (index == 1 and 3 <= step <= 7) or (index == 3 and step % 2 == 1)


def set_grads(
    param_sets: Sequence[Sequence[torch.Tensor]],
    step: int,
    frozen: Callable[[int, int], bool] = default_frozen,
    seed: int = 1234,
) -> None:
    """Give every parameter set the same gradient (or None), varying scale per tensor."""
    gen = torch.Generator().manual_seed(seed + step)
    ref = param_sets[0]
    for i, p in enumerate(ref):
        scale = 10.0 ** ((i % 5) - 3)
        g = None if frozen(step, i) else torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale
        for ps in param_sets:
            ps[i].grad = None if g is None else g.clone()


def _prefix(prefix: str, message: str) -> str:
    return f"{prefix}: {message}"


def assert_close(
    actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor], dtype: torch.dtype, msg: str
) -> None:
    assert len(actual) == len(expected), (len(actual), len(expected))
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(
            a.detach(), e.detach(), **TOLERANCES[dtype], msg=partial(_prefix, f"{msg}, param {i}")
        )


def assert_state_close(opt_a: torch.optim.Optimizer, opt_b: torch.optim.Optimizer, dtype: torch.dtype) -> None:
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys(), (k, sa[k].keys(), sb[k].keys())
        for key in sa[k]:
            torch.testing.assert_close(sa[k][key], sb[k][key], **TOLERANCES[dtype], check_dtype=False)


def round_trip(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Save and load through bytes with weights_only=True, as a checkpoint would."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def snapshot(opt: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> Any:
    """A deep copy of everything an optimizer step could change."""
    state = {
        id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()}
        for p in params
        if p in opt.state
    }
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return [p.detach().clone() for p in params], state, [len(g["params"]) for g in opt.param_groups], repr(groups)


def assert_unchanged(before: Any, after: Any) -> None:
    pb, sb, nb, gb = before
    pa, sa, na, ga = after
    for x, y in zip(pb, pa):
        torch.testing.assert_close(x, y, atol=0, rtol=0, equal_nan=True)
    assert sb.keys() == sa.keys()
    for k in sb:
        assert sb[k].keys() == sa[k].keys()
        for key in sb[k]:
            torch.testing.assert_close(sb[k][key], sa[k][key], atol=0, rtol=0, equal_nan=True)
    assert nb == na and gb == ga


def fast_share(cases: Sequence[tuple], ids: Sequence[str], keep: Collection[str]) -> list[Any]:
    """The parameter sets ``cases`` (named ``ids``) for ``pytest.mark.parametrize``, every
    one not named in ``keep`` marked ``heavy``: the fast tier (``-m "not slow and not
    heavy"``) runs the share in ``keep``, the full suite all of them, under the same ids."""
    unknown = set(keep) - set(ids)
    assert keep and not unknown, unknown
    return [pytest.param(*c, id=i, marks=() if i in keep else pytest.mark.heavy) for c, i in zip(cases, ids)]


def run_isolated(code: str, timeout: float = 300, env: dict[str, str] | None = None) -> Any:
    """Run ``code`` in a fresh Python process (a crash or hang there fails the caller's
    test instead of ending the run): the ``subprocess.CompletedProcess``."""
    import os
    import subprocess
    import sys

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=timeout)
