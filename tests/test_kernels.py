"""Every fused kernel against the reference, in lockstep.

Both optimizers take the same gradients; after every step the kernel's parameters
and state are compared with the reference's and then overwritten with them, so a
discrepancy cannot hide in accumulated drift and every step tests the rule afresh.
"""

from __future__ import annotations

import copy

import pytest
import torch
from optim_db import ALL_CONFIG_IDS, ALL_CONFIGS, OptimizerInfo

# sizes 0, 1, ragged SIMD tails, > one chunk (32768), and many small tensors
SIZES = [0, 1, 255, 256, 4097, 70_001] + [
    int(n) for n in torch.randint(1, 64, (60,), generator=torch.Generator().manual_seed(0))
]
TOL = {torch.float64: dict(atol=1e-12, rtol=1e-12), torch.float32: dict(atol=1e-6, rtol=1e-5)}
STEPS = 8


def _params(dtype):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(n, generator=gen, dtype=dtype).requires_grad_() for n in SIZES]


def _grads(params, step, dtype):
    gen = torch.Generator().manual_seed(100 + step)
    out = []
    for i, p in enumerate(params):
        frozen = i % 7 == 3 and step % 3 == 1  # some parameters skip steps: their step lags
        scale = 10.0 ** ((i % 5) - 3)
        out.append(None if frozen else torch.randn(p.shape, generator=gen, dtype=dtype) * scale)
    return out


def _sync(dst_opt, dst_params, src_opt, src_params):
    with torch.no_grad():
        for d, s in zip(dst_params, src_params):
            d.copy_(s)
            for key, value in src_opt.state[s].items():
                dst_opt.state[d][key].copy_(value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("info,kw", ALL_CONFIGS, ids=ALL_CONFIG_IDS)
def test_numba_matches_reference_in_lockstep(info: OptimizerInfo, kw: dict, dtype: torch.dtype) -> None:
    fused_params = _params(dtype)
    ref_params = [p.detach().clone().requires_grad_() for p in fused_params]
    fused = info.cls(fused_params, **copy.deepcopy(kw), backend="numba")
    ref = info.cls(ref_params, **copy.deepcopy(kw), backend="reference")
    for step in range(STEPS):
        for p, q, g in zip(fused_params, ref_params, _grads(fused_params, step, dtype)):
            p.grad = None if g is None else g.clone()
            q.grad = None if g is None else g.clone()
        fused.step()
        ref.step()
        for i, (p, q) in enumerate(zip(fused_params, ref_params)):
            torch.testing.assert_close(p.detach(), q.detach(), **TOL[dtype], msg=f"step {step} param {i}")
            for key, value in ref.state[q].items():
                torch.testing.assert_close(fused.state[p][key], value, **TOL[dtype], msg=f"step {step} param {i} {key}")
        _sync(fused, fused_params, ref, ref_params)


@pytest.mark.parametrize("mode", ["mask", "propagate"])
@pytest.mark.parametrize("info,kw", [c for c in ALL_CONFIGS if c[1].get("amsgrad") or c[0].name == "Adamax"][:3])
def test_numba_nonfinite_matches_reference(info: OptimizerInfo, kw: dict, mode: str) -> None:
    dtype = torch.float32
    fused_params = _params(dtype)
    ref_params = [p.detach().clone().requires_grad_() for p in fused_params]
    fused = info.cls(fused_params, **copy.deepcopy(kw), backend="numba", nonfinite=mode)
    ref = info.cls(ref_params, **copy.deepcopy(kw), backend="reference", nonfinite=mode)
    for step in range(4):
        grads = _grads(fused_params, step, dtype)
        grads[4][[0, 17, 4096]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        grads[5][40_000] = float("nan")  # in the second chunk
        for p, q, g in zip(fused_params, ref_params, grads):
            p.grad = None if g is None else g.clone()
            q.grad = None if g is None else g.clone()
        with pytest.warns(RuntimeWarning) if (mode == "mask" and step == 0) else _nothing():
            fused.step()
            ref.step()
        for p, q in zip(fused_params, ref_params):
            torch.testing.assert_close(p.detach(), q.detach(), **TOL[dtype], equal_nan=True)
    assert fused.nonfinite_count == ref.nonfinite_count == (16 if mode == "mask" else 0)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
