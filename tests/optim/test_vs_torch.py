"""The reference implementation against torch.optim: float64 to 1e-10, float32 to rounding."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers import assert_close, assert_state_close, clone_params, make_params, set_grads
from optim_db import ALL_CONFIG_IDS, ALL_CONFIGS, OPTIM_IDS, OPTIMIZERS, OptimizerInfo

import adamkit

STEPS = 25


def _pair(info: OptimizerInfo, kw: dict, dtype: torch.dtype = torch.float64, **make):
    ours = make_params(dtype, **make)
    theirs = clone_params(ours)
    return (
        ours,
        theirs,
        info.cls(ours, **copy.deepcopy(kw), fused=False),
        info.torch_cls(theirs, **copy.deepcopy(kw)),
    )


@pytest.mark.parametrize("info,kw", ALL_CONFIGS, ids=ALL_CONFIG_IDS)
def test_matches_torch_float64(info: OptimizerInfo, kw: dict) -> None:
    ours, theirs, a, b = _pair(info, kw)
    for step in range(STEPS):
        set_grads([ours, theirs], step)
        a.step()
        b.step()
        assert_close(ours, theirs, torch.float64, f"step {step}")
    assert_state_close(a, b, torch.float64)


@pytest.mark.parametrize("info,kw", ALL_CONFIGS, ids=ALL_CONFIG_IDS)
def test_matches_torch_float32(info: OptimizerInfo, kw: dict) -> None:
    kw = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    ours, theirs, a, b = _pair(info, kw, torch.float32)
    for step in range(STEPS):
        set_grads([ours, theirs], step)
        a.step()
        b.step()
    assert_close(ours, theirs, torch.float32, "after 25 steps")


@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPTIM_IDS)
def test_state_layout_is_torchs(info: OptimizerInfo) -> None:
    ours, theirs, a, b = _pair(info, {})
    set_grads([ours, theirs], 0, frozen=lambda s, i: False)
    a.step()
    b.step()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for k, st in sa["state"].items():
        assert st.keys() == sb["state"][k].keys()
        assert st["step"].dtype == sb["state"][k]["step"].dtype and st["step"].device.type == "cpu"
        for key in st:
            assert st[key].dtype == sb["state"][k][key].dtype and st[key].shape == sb["state"][k][key].shape
    torch_keys = set(sb["param_groups"][0])
    assert torch_keys <= set(sa["param_groups"][0]), torch_keys - set(sa["param_groups"][0])


@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPTIM_IDS)
def test_defaults_match_torch(info: OptimizerInfo) -> None:
    p = [torch.zeros(2, requires_grad=True)]
    ours, theirs = info.cls(p).defaults, info.torch_cls(p).defaults
    for key, value in theirs.items():
        assert ours[key] == value, key
    assert ours["lr"] == info.default_lr and ours["weight_decay"] == info.default_weight_decay


@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPTIM_IDS)
def test_param_groups_and_add_param_group(info: OptimizerInfo) -> None:
    ours, theirs = make_params(), None
    theirs = clone_params(ours)
    extra = {"amsgrad": True}  # Adamax and NAdam ignore it, as torch's do

    def groups(ps):
        return [
            {"params": ps[:3], "lr": 0.05, "betas": (0.7, 0.9), "weight_decay": 0.2, **extra},
            {"params": ps[3:6], "eps": 1e-4, "maximize": True},
        ]

    a = info.cls(groups(ours), lr=0.01, fused=False)
    b = info.torch_cls(groups(theirs), lr=0.01)
    for step in range(STEPS):
        if step == 10:  # a third group joins mid-training
            a.add_param_group({"params": ours[6:], "lr": 0.003, "weight_decay": 0.01})
            b.add_param_group({"params": theirs[6:], "lr": 0.003, "weight_decay": 0.01})
        set_grads([ours, theirs], step)
        a.step()
        b.step()
        assert_close(ours, theirs, torch.float64, f"step {step}")


SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=4, gamma=0.5),
    "OneCycleLR-cycle_momentum": lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=0.05, total_steps=STEPS, cycle_momentum=True, base_momentum=0.8, max_momentum=0.95
    ),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
}


@pytest.mark.parametrize("sched", SCHEDULERS, ids=list(SCHEDULERS))
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPTIM_IDS)
def test_lr_schedulers(info: OptimizerInfo, sched: str, tensor_lr: bool) -> None:
    lr = torch.tensor(0.01, dtype=torch.float64) if tensor_lr else 0.01
    ours, theirs, a, b = _pair(info, {"lr": lr, "weight_decay": 0.05})
    sa, sb = SCHEDULERS[sched](a), SCHEDULERS[sched](b)
    warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
    for step in range(STEPS):
        set_grads([ours, theirs], step)
        a.step()
        b.step()
        sa.step()
        sb.step()
        assert a.param_groups[0]["betas"] == b.param_groups[0]["betas"]
        assert_close(ours, theirs, torch.float64, f"step {step}")


@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPTIM_IDS)
def test_closure_and_zero_grad(info: OptimizerInfo) -> None:
    torch.manual_seed(0)
    models = [torch.nn.Linear(6, 3).double() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randn(16, 6, dtype=torch.float64)
    opts = [info.cls(models[0].parameters(), lr=0.01), info.torch_cls(models[1].parameters(), lr=0.01)]
    calls = [0, 0]

    def closure_for(i):
        def closure():
            calls[i] += 1
            opts[i].zero_grad()
            loss = models[i](x).pow(2).sum()
            loss.backward()
            return loss

        return closure

    for _ in range(STEPS):
        la, lb = opts[0].step(closure_for(0)), opts[1].step(closure_for(1))
        torch.testing.assert_close(la, lb, atol=1e-10, rtol=1e-10)
    assert calls == [STEPS, STEPS]
    assert_close(list(models[0].parameters()), list(models[1].parameters()), torch.float64, "closure")
    opts[0].zero_grad()
    assert all(p.grad is None for p in models[0].parameters())


@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPTIM_IDS)
def test_no_grads_means_no_state(info: OptimizerInfo) -> None:
    params = make_params()
    opt = info.cls(params)
    assert opt.step() is None
    assert len(opt.state) == 0


@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPTIM_IDS)
def test_frozen_param_step_lags(info: OptimizerInfo) -> None:
    ours, theirs, a, b = _pair(info, {})
    for step in range(10):
        set_grads([ours, theirs], step)
        a.step()
        b.step()
    steps = [a.state[p]["step"].item() for p in ours]
    assert steps[0] == 10 and steps[1] == 5 and steps[3] == 5, steps
    assert steps == [b.state[p]["step"].item() for p in theirs]


@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPTIM_IDS)
def test_non_contiguous_params(info: OptimizerInfo) -> None:
    base = torch.randn(8, 6, dtype=torch.float64)
    ours = [base.clone().t().requires_grad_(), base.clone()[:, ::2].requires_grad_()]
    theirs = clone_params(ours)
    a, b = info.cls(ours, lr=0.01, weight_decay=0.1), info.torch_cls(theirs, lr=0.01, weight_decay=0.1)
    for step in range(STEPS):
        set_grads([ours, theirs], step, frozen=lambda s, i: False)
        a.step()
        b.step()
    assert_close(ours, theirs, torch.float64, "non-contiguous")


@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPTIM_IDS)
def test_grad_scaler_and_deepcopy(info: OptimizerInfo) -> None:
    """torch.amp.GradScaler drives the optimizer as it drives torch's; deepcopy works."""
    ours, theirs, a, b = _pair(info, {"lr": 0.01}, complex_param=False)  # GradScaler: no complex on CPU
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2)]
    for step in range(6):
        set_grads([ours, theirs], step, frozen=lambda s, i: False)
        for params, opt, scaler in ((ours, a, scalers[0]), (theirs, b, scalers[1])):
            scaler.scale(torch.ones((), dtype=torch.float64))  # as scaler.scale(loss) would
            for p in params:
                p.grad.mul_(2.0**10)
                if step == 2:
                    p.grad.fill_(float("inf"))  # the scaler must skip this step
            scaler.step(opt)
            scaler.update()
    assert_close(ours, theirs, torch.float64, "GradScaler")
    assert a.state[ours[0]]["step"].item() == 5 and a.nonfinite_count == 0
    c = copy.deepcopy(a)
    assert c.state_dict()["param_groups"] == a.state_dict()["param_groups"] and c.nonfinite == a.nonfinite


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_a_compiled_training_step_steps_as_eager(backend: str) -> None:
    """``torch.compile`` of a whole training step (zero_grad, forward, backward,
    ``step()``): the step runs eagerly behind a graph break (``torch.compiler.disable``)
    instead of dynamo tracing into the kernels (the Numba dispatcher crashed it), and
    the parameters agree with an eager twin's (to float32 rounding: inductor's forward
    and backward round differently from eager's)."""
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [adamkit.AdamW(m.parameters(), lr=0.01, backend=backend) for m in models]
    x = torch.randn(8, 16)

    def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()

    start = [p.detach().clone() for p in models[0].parameters()]
    compiled = torch.compile(train_step)
    for _ in range(3):
        compiled(models[0], opts[0])
        train_step(models[1], opts[1])
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not any(torch.equal(a, s) for a, s in zip(models[0].parameters(), start))  # it did step
    assert float(opts[0].state[models[0][0].weight]["step"]) == 3.0
