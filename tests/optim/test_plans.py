"""The optimizer's cached per-group plans (``adamkit/optim/_plan.py``) on the Numba
kernels, in lockstep with the reference: every change a user can make between steps
followed, gradients kept across steps, lagging steps in one call, flat-buffer state
saved into torch, and ``channels_last`` weights on the plan (their state laid out as
they are, checkpoints to and from torch). The Triton kernels' share of these cases is
in ``tests/kernels/cuda/test_triton.py``."""

from __future__ import annotations

import pytest
import torch
from lockstep import (
    CONV_SHAPES,
    PLAN_EVENTS,
    TOL,
    adamw_twins,
    channels_last_lockstep,
    layout,
    plan_follows_changes,
    step_twins,
)
from optim_db import ALL_CONFIG_IDS, ALL_CONFIGS, OptimizerInfo

import adamkit


@pytest.mark.parametrize("event", PLAN_EVENTS)
def test_cached_plan_follows_changes(event: str) -> None:
    """Whatever the user changes between steps, the next step sees it (no stale tables)."""
    plan_follows_changes(event, "numba")


@pytest.mark.parametrize("backend", ["numba", "auto"])
@pytest.mark.parametrize("info,kw", ALL_CONFIGS[::5], ids=ALL_CONFIG_IDS[::5])
def test_channels_last_weights_take_the_fused_kernel(info: OptimizerInfo, kw: dict, backend: str) -> None:
    channels_last_lockstep(info, kw, backend)


def test_channels_last_checkpoints_interoperate_with_torch() -> None:
    """torch's AdamW on channels_last weights keeps channels_last state; adamkit loads
    it, steps it on the fused kernel and agrees with torch in float64, and its
    state_dict loads back into torch."""
    gen = torch.Generator().manual_seed(9)
    base = [torch.randn(s, generator=gen, dtype=torch.float64) for s in CONV_SHAPES]
    ps = [[layout(b).requires_grad_() for b in base] for _ in range(2)]
    theirs, ours = torch.optim.AdamW(ps[0], weight_decay=0.1), adamkit.AdamW(ps[1], weight_decay=0.1)
    for step in range(6):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in CONV_SHAPES]
        for p, q, g in zip(*ps, grads):
            p.grad, q.grad = layout(g), layout(g)
        theirs.step()
        if step == 2:  # torch's checkpoint, taken mid-run
            assert theirs.state[ps[0][0]]["exp_avg"].stride() == ps[0][0].stride()
            ours.load_state_dict(theirs.state_dict())
            with torch.no_grad():
                for p, q in zip(*ps):
                    q.copy_(p)
        elif step > 2:
            ours.step()
            for p, q in zip(*ps):
                torch.testing.assert_close(q, p, **TOL[torch.float64])
    assert 0 in ours._plans
    back = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in ps[1]], weight_decay=0.1)
    back.load_state_dict(ours.state_dict())
    first = back.state[back.param_groups[0]["params"][0]]["exp_avg"]
    torch.testing.assert_close(first, ours.state[ps[1][0]]["exp_avg"], atol=0, rtol=0)


def test_plan_state_checkpoints_round_trip_into_torch() -> None:
    """State held in flat buffers saves as torch's layout and loads into torch.optim.AdamW."""
    from helpers import round_trip

    fp, rp, fo, ro = adamw_twins()
    for seed in range(3):
        step_twins(fp, rp, fo, ro, seed)
    sd = round_trip(fo.state_dict())
    twin = [p.detach().clone().requires_grad_() for p in fp]
    torch_opt = torch.optim.AdamW(twin)
    torch_opt.load_state_dict(sd)
    for p, q in zip(fp, twin):
        g = torch.randn(p.shape)
        p.grad, q.grad = g.clone(), g.clone()
    fo.step()
    torch_opt.step()
    for p, q in zip(fp, twin):
        torch.testing.assert_close(p.detach(), q.detach(), **TOL[torch.float32])


def test_steps_lag_per_tensor_in_one_call() -> None:
    """Frozen parameters keep their own step count (bias correction) inside one call."""
    fp, rp, fo, ro = adamw_twins()
    for seed in range(4):
        for p, q in zip(fp[1:], rp[1:]):
            p.grad = q.grad = None
        step_twins(fp, rp, fo, ro, seed) if seed % 2 else None
        if seed % 2 == 0:
            gen = torch.Generator().manual_seed(seed)
            for p, q in zip(fp[:1], rp[:1]):
                g = torch.randn(p.shape, generator=gen)
                p.grad, q.grad = g.clone(), g.clone()
            fo.step()
            ro.step()
    assert [float(fo.state[p]["step"]) for p in fp] == [4.0, 2.0, 2.0, 2.0, 2.0]
    assert [float(fo.state[p]["step"]) for p in fp] == [float(ro.state[p]["step"]) for p in rp]


def test_gradients_kept_across_steps_take_the_cached_path() -> None:
    """zero_grad(set_to_none=False)-style training: the same gradient tensors every step,
    refilled in place; then one is replaced by a non-contiguous tensor and one by None."""
    fp, rp, fo, ro = adamw_twins()
    for p, q in zip(fp, rp):
        p.grad, q.grad = torch.zeros_like(p), torch.zeros_like(q)
    for seed in range(6):
        gen = torch.Generator().manual_seed(seed)
        for p, q in zip(fp, rp):
            g = torch.randn(p.shape, generator=gen)
            p.grad.copy_(g)
            q.grad.copy_(g)
        if seed == 4:
            g = torch.randn(2 * fp[2].numel())[::2]
            fp[2].grad, rp[2].grad = g.clone(), g.clone()
        if seed == 5:
            fp[3].grad = rp[3].grad = None
        fo.step()
        ro.step()
        for p, q in zip(fp, rp):
            torch.testing.assert_close(p.detach(), q.detach(), **TOL[torch.float32])
    assert 0 in fo._plans
