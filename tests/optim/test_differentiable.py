"""``differentiable=True``: a step autograd records, agreeing with torch.optim in float64.

torch's counterpart is ``test/optim/test_optim.py::TestDifferentiableOptimizer``
(gradcheck through one step); here also every configuration of the table for 25 steps
against torch.optim, and gradients through unrolled steps against torch's own
differentiable step.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import pytest
import torch
from helpers import assert_close, assert_state_close, make_params, set_grads
from optim_db import ALL_CONFIG_IDS, ALL_CONFIGS, OPTIM_IDS, OPTIMIZERS, OptimizerInfo
from torch.autograd import gradcheck

import adamkit

STEPS = 25
F64 = dict(dtype=torch.float64)


@contextlib.contextmanager
def float64_default():
    """torch's differentiable step computes bias corrections in the dtype of ``step``:
    float32 unless float64 is the default dtype."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("info,kw", ALL_CONFIGS, ids=ALL_CONFIG_IDS)
def test_matches_torch_float64(info: OptimizerInfo, kw: dict) -> None:
    """The same trajectory as torch.optim (its default path) for every configuration:
    parameters of seven shapes and a complex one, frozen parameters whose step lags."""
    theirs = make_params()
    ours = [p.detach().clone() for p in theirs]  # a differentiable step is in place: no leaves that require grad
    a = info.cls(ours, **copy.deepcopy(kw), differentiable=True)
    b = info.torch_cls(theirs, **copy.deepcopy(kw))
    for step in range(STEPS):
        set_grads([ours, theirs], step)
        a.step()
        b.step()
        assert_close(ours, theirs, torch.float64, f"step {step}")
    assert_state_close(a, b, torch.float64)
    assert not a._plans, "a differentiable step takes no cached plan"


def _unrolled(cls: type, kw: dict, x: list[torch.Tensor], w: list[torch.Tensor], lr: Any, steps: int):
    """Meta-learning's use: ``steps`` steps from parameters ``x`` on gradients made from
    ``w`` (``g = (t+1)·w``; a loss of the parameters would keep values the in-place
    step overwrites), then the gradient of a loss of the final parameters w.r.t. the
    initial ones, ``w`` and a tensor lr."""
    params = [xi.clone() for xi in x]
    opt = cls(params, lr=lr, **kw, differentiable=True)
    for step in range(steps):
        for p, wi in zip(params, w):
            p.grad = (step + 1) * wi
        opt.step()
    outer = sum((p.abs() if p.is_complex() else p).pow(2).sum() for p in params)
    return list(torch.autograd.grad(outer, [*x, *w, *([lr] if isinstance(lr, torch.Tensor) else [])]))


@pytest.mark.parametrize("info,kw", ALL_CONFIGS, ids=ALL_CONFIG_IDS)
def test_gradients_through_steps_match_torchs_differentiable_step(info: OptimizerInfo, kw: dict) -> None:
    """Gradients w.r.t. the initial parameters, the gradients' source and a tensor lr,
    through 3 unrolled Adam steps. Where torch's step keeps state that its next step
    overwrites (AMSGrad's ``v``, Adamax's ``m`` and ``u``; NAdam's backward fails after
    two steps), one step, as adamkit's copies exactly what torch's does; torch's Adamax
    takes no tensor lr there."""
    kw = {k: v for k, v in copy.deepcopy(kw).items() if k != "lr"}
    steps = 1 if kw.get("amsgrad") or info.name in ("Adamax", "NAdam") else 3
    with float64_default():
        x = [p.detach().requires_grad_() for p in make_params(seed=3)]
        w = [p.detach().requires_grad_() for p in make_params(seed=4)]
        lr = 0.01 if info.name == "Adamax" else torch.tensor(0.01, requires_grad=True)
        ours = _unrolled(info.cls, kw, x, w, lr, steps)
        theirs = _unrolled(info.torch_cls, kw, x, w, lr, steps)
    assert_close(ours, theirs, torch.float64, "gradient")


def _one_step(cls: type, kwargs: dict, keys: list[str], p, grad, *state_and_hyper):
    """torch's _diff_fn: one step of a new optimizer on given state; the new parameter and
    state as functions of the old ones, the gradient and tensor hyperparameters."""
    state = dict(zip(keys, state_and_hyper[: len(keys)]))
    hyper = state_and_hyper[len(keys) :]
    if hyper:
        lr, beta1, beta2, weight_decay = hyper
        kwargs = {**kwargs, "lr": lr, "betas": (beta1, beta2), "weight_decay": weight_decay}
    p = p.clone()
    p.grad = grad
    opt = cls([p], **kwargs, differentiable=True)
    history = {k: torch.tensor(v / 2, **F64) for k, v in opt.spec.history.items()}  # NAdam's mu_product
    opt.state[p].update({"step": torch.tensor(10.0, **F64), **history, **{k: v.clone() for k, v in state.items()}})
    opt.step()
    return (p, *(opt.state[p][k] for k in keys))


GRADCHECK_CONFIGS = [
    (info, kw)
    for info in OPTIMIZERS
    for kw in [
        {},
        {"weight_decay": 0.1, "maximize": True},
        {"weight_decay": 0.1, "amsgrad": True},
        {"weight_decay": 0.1, "amsgrad": True, "maximize": True},
    ]
    if not (kw.get("amsgrad") and info.name in ("Adamax", "NAdam"))  # no AMSGrad
]


@pytest.mark.parametrize("tensor_hyper", [False, True], ids=["float-hyper", "tensor-hyper"])
@pytest.mark.parametrize("info,kw", GRADCHECK_CONFIGS, ids=[f"{i.name}-{kw}" for i, kw in GRADCHECK_CONFIGS])
def test_gradcheck_one_step(info: OptimizerInfo, kw: dict, tensor_hyper: bool) -> None:
    """Analytical against numerical derivatives of one step w.r.t. the parameter, the
    gradient, the state and (tensor_hyper) lr, both betas and the weight decay."""
    keys = list(info.state_keys(kw))
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.rand(10, generator=gen, **F64).requires_grad_() for _ in range(2 + len(keys))]
    if tensor_hyper:
        inputs += [torch.tensor(v, **F64, requires_grad=True) for v in (0.001, 0.9, 0.999, 0.1)]
    kw = {k: v for k, v in kw.items() if not (tensor_hyper and k == "weight_decay")}
    assert gradcheck(lambda *xs: _one_step(info.cls, kw, keys, *xs), inputs)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPTIM_IDS)
def test_masked_elements_stay_as_they_were(info: OptimizerInfo) -> None:
    """``nonfinite="mask"`` (the default) holds for differentiable steps too."""
    params = [p.detach() for p in make_params()]
    opt = info.cls(params, weight_decay=0.1, differentiable=True)
    set_grads([params], 0, frozen=lambda s, i: False)
    opt.step()
    before = [p.clone() for p in params]
    set_grads([params], 1, frozen=lambda s, i: False)
    params[0].grad[1, 2] = float("nan")
    params[7].grad[0, 1] = complex(float("inf"), 0.0)
    with pytest.warns(RuntimeWarning, match=r"2 non-finite gradient element\(s\) masked"):
        opt.step()
    assert opt.nonfinite_count == 2
    assert params[0][1, 2] == before[0][1, 2] and params[7][0, 1] == before[7][0, 1]
    state = opt.state[params[7]]
    assert all(torch.isfinite(torch.view_as_real(state[k])).all() for k in info.state_keys({}))
    assert not torch.equal(params[0], before[0]) and not torch.equal(params[7], before[7])


@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPTIM_IDS)
def test_bf16_parameters_step_in_float32(info: OptimizerInfo) -> None:
    """bf16 parameters with float32 state: the math in float32 and the parameter rounded
    once when stored, as the reference does (the same values to a bf16 ulp)."""
    params = [p.detach().to(torch.bfloat16) for p in make_params(complex_param=False)]
    twins = [p.clone() for p in params]
    a = info.cls(params, weight_decay=0.1, differentiable=True)
    b = info.cls(twins, weight_decay=0.1, fused=False)
    for step in range(5):
        set_grads([params, twins], step)
        a.step()
        b.step()
    for x, y in zip(params, twins):
        torch.testing.assert_close(x, y, atol=0, rtol=2**-7)
    assert_state_close(a, b, torch.float32)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPTIM_IDS)
def test_grad_scaler_unscales_for_a_differentiable_optimizer(info: OptimizerInfo) -> None:
    """As for torch's non-fused optimizers: GradScaler unscales the gradients and skips
    an inf step itself (a differentiable optimizer does not take its grad_scale)."""
    theirs = make_params(complex_param=False)
    ours = [p.detach().clone() for p in theirs]
    a, b = info.cls(ours, differentiable=True), info.torch_cls(theirs)
    assert not a._step_supports_amp_scaling
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2)]
    for step in range(4):
        set_grads([ours, theirs], step, frozen=lambda s, i: False)
        for params, opt, scaler in ((ours, a, scalers[0]), (theirs, b, scalers[1])):
            scaler.scale(torch.ones((), **F64))
            for p in params:
                p.grad.mul_(2.0**10)
                if step == 2:
                    p.grad.fill_(float("inf"))
            scaler.step(opt)
            scaler.update()
    assert_close(ours, theirs, torch.float64, "GradScaler")


def test_a_differentiable_group_beside_a_plain_one() -> None:
    """Only the differentiable group is recorded (torch's base class takes non-leaf
    tensors only when the optimizer's default is differentiable; leaves that do not
    require grad join the graph through their gradients); the other group steps its
    leaves in place on the fused kernels, as always."""
    plain = make_params(complex_param=False)
    params = [torch.zeros(4, **F64), torch.ones(3, 2, **F64)]
    w = [torch.rand(p.shape, **F64, requires_grad=True) for p in params]
    opt = adamkit.Adam([{"params": params, "differentiable": True, "weight_decay": 0.1}, {"params": plain}])
    set_grads([plain], 0, frozen=lambda s, i: False)
    for p, wi in zip(params, w):
        p.grad = wi * 2
    opt.step()
    assert all(p.grad_fn is not None for p in params) and all(p.is_leaf for p in plain)
    sum(p.sum() for p in params).backward()
    assert all(wi.grad is not None and bool(wi.grad.abs().sum() > 0) for wi in w)
