"""Bad input gets a clear error (matched by regex) before anything changes."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_unchanged, make_params, set_grads, snapshot
from optim_db import OPTIM_IDS, OPTIMIZERS, OptimizerInfo

import adamkit

NAN, INF = float("nan"), float("inf")

BAD_HYPERPARAMETERS = [
    (dict(lr=-1e-3), r"Invalid learning rate: -0.001"),
    (dict(lr=NAN), r"Invalid learning rate: nan"),
    (dict(lr=INF), r"Invalid learning rate: inf"),
    (dict(lr=torch.tensor([1e-3, 2e-3])), r"Tensor lr must be 1-element"),
    (dict(betas=(-0.1, 0.999)), r"Invalid beta parameter at index 0: -0.1"),
    (dict(betas=(0.9, 1.0)), r"Invalid beta parameter at index 1: 1.0"),
    (dict(betas=(NAN, 0.9)), r"Invalid beta parameter at index 0: nan"),
    (dict(betas=(0.9,)), r"betas must be a pair"),
    (dict(eps=-1e-8), r"Invalid epsilon value: -1e-08"),
    (dict(eps=NAN), r"Invalid epsilon value: nan"),
    (dict(weight_decay=-0.1), r"Invalid weight_decay value: -0.1"),
    (dict(weight_decay=NAN), r"Invalid weight_decay value: nan"),
    (dict(nonfinite="ignore"), r"nonfinite must be one of"),
    (dict(backend="cuda"), r"backend must be 'auto' or one of"),
    (dict(state_bits=7), r"state_bits must be one of \(32, 16, 8, 4\), got 7"),
    (dict(fused=False, backend="numba"), r"fused=False contradicts backend='numba'"),
    (dict(fused=True, backend="reference"), r"fused=True contradicts backend='reference'"),
    (dict(fused=True, foreach=True), r"`fused` and `foreach` cannot be `True` together"),
]


@pytest.mark.parametrize("kw,pattern", BAD_HYPERPARAMETERS, ids=[p for _, p in BAD_HYPERPARAMETERS])
@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPTIM_IDS)
def test_bad_hyperparameters(info: OptimizerInfo, kw: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        info.cls(make_params(), **kw)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPTIM_IDS)
def test_hyperparameters_are_checked_before_the_parameters_are_read(info: OptimizerInfo) -> None:
    """As torch: a bad lr is reported even when params is not a list of tensors."""
    with pytest.raises(ValueError, match=r"Invalid learning rate: -1.0"):
        info.cls(None, lr=-1.0)
    with pytest.raises(ValueError, match=r"Invalid epsilon value: -1.0"):  # torch's order: lr, eps, betas
        info.cls(None, eps=-1.0, betas=(2.0, 0.9))
    with pytest.raises(TypeError, match=r"params argument given to the optimizer should be an iterable"):
        info.cls(torch.zeros(2, requires_grad=True))


ADAM_TENSOR_COMBINATIONS = [
    (dict(betas=(0.9, torch.tensor(0.99))), r"betas must be either both floats or both Tensors"),
    (dict(betas=(torch.tensor(0.9), 0.99)), r"betas must be either both floats or both Tensors"),
    (dict(lr=torch.tensor(1e-3), foreach=True), r"lr as a Tensor is not supported for capturable=False and foreach"),
    (
        dict(betas=(torch.tensor(0.9), torch.tensor(0.99)), foreach=True),
        r"betas\[0\] as a Tensor is not supported for capturable=False and foreach=True",
    ),
]


@pytest.mark.parametrize("kw,pattern", ADAM_TENSOR_COMBINATIONS, ids=[p for _, p in ADAM_TENSOR_COMBINATIONS])
@pytest.mark.parametrize("cls", [adamkit.Adam, adamkit.AdamW], ids=["Adam", "AdamW"])
def test_adams_tensor_hyperparameter_combinations(cls: type, kw: dict, pattern: str) -> None:
    """torch.optim.Adam's checks, at construction (params=None: before they are read) and
    by add_param_group, which then adds nothing."""
    with pytest.raises(ValueError, match=pattern):
        cls(None, **kw)
    params = make_params()
    opt = cls(params[:3])
    with pytest.raises(ValueError, match=pattern + r".*\(param group 1\)"):
        opt.add_param_group({"params": params[3:], **kw})
    assert len(opt.param_groups) == 1


def test_a_scheduler_may_mix_float_and_tensor_betas_between_steps() -> None:
    """The combination checks are torch's constructor checks, not repeated at each step:
    OneCycleLR writes a float beta1 beside a tensor beta2, which torch steps."""
    params = make_params()
    opt = adamkit.Adam(params, betas=(torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.99, dtype=torch.float64)))
    opt.param_groups[0]["betas"] = (0.85, opt.param_groups[0]["betas"][1])
    set_grads([params], 0)
    opt.step()


@pytest.mark.parametrize(
    "option,pattern",
    [("capturable", r"capturable=True needs the triton kernels .* 'cpu' tensors get the numba kernels")],
)
@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPTIM_IDS)
def test_unsupported_options_name_themselves(info: OptimizerInfo, option: str, pattern: str) -> None:
    if info.name == "NAdam":  # its scalars need the host's mu_product, on any device
        pattern = r"NAdam: capturable=True is not supported: .* history kept on the host \(\['mu_product'\]\)"
    with pytest.raises(NotImplementedError, match=pattern):
        info.cls(make_params(), **{option: True})


DIFFERENTIABLE_REFUSALS = [
    (dict(fused=True), RuntimeError, r"`fused` does not support `differentiable` \(param group 0\)"),
    (dict(backend="numba"), ValueError, r"differentiable=True steps the reference rule .* not with backend='numba'"),
    (dict(state_bits=16), ValueError, r"not with state_bits=16"),
    (dict(state_bits=8), ValueError, r"not with state_bits=8"),
    (dict(stochastic_rounding=True), ValueError, r"not with stochastic_rounding=True"),
    (dict(percentile_clipping=95), ValueError, r"not with percentile_clipping=95"),
    (dict(capturable=True), ValueError, r"not with capturable=True"),
]


@pytest.mark.parametrize("kw,error,pattern", DIFFERENTIABLE_REFUSALS, ids=[p for _, _, p in DIFFERENTIABLE_REFUSALS])
@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPTIM_IDS)
def test_differentiable_refuses_what_is_not_differentiable(
    info: OptimizerInfo, kw: dict, error: type, pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        info.cls(make_params(), differentiable=True, **kw)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPTIM_IDS)
def test_differentiable_refuses_a_step_count_that_requires_grad(info: OptimizerInfo) -> None:
    params = [p.detach() for p in make_params(complex_param=False)]  # leaves that require grad: no in-place step
    opt = info.cls(params, differentiable=True)
    set_grads([params], 0, frozen=lambda s, i: False)
    opt.step()
    opt.state[params[-1]]["step"].requires_grad_()
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"`requires_grad` is not supported for `step` in differentiable mode"):
        opt.step()
    assert_unchanged(before, snapshot(opt, params))


@pytest.mark.parametrize(
    "kw,pattern",
    [
        (dict(backend="triton"), r"no triton kernel for .* on 'meta' with state_bits=32"),
        (dict(state_bits=8, backend="triton"), r"no triton kernel for .* on 'meta' with state_bits=8"),
        (dict(backend="numba"), r"no numba kernel for .* on 'meta' with state_bits=32"),
        (
            dict(fused=True),
            r"`fused=True` requires all the params to be floating point Tensors of supported devices: .*"
            r"no triton or numba kernel for .* on 'meta'",
        ),
    ],
)
@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPTIM_IDS)
def test_unavailable_kernels_raise_clearly_at_the_step(info: OptimizerInfo, kw: dict, pattern: str) -> None:
    """Meta parameters are placeholders (shapes without values): as in torch, a fused
    kernel is asked for when they step, not when the optimizer is made."""
    p = torch.zeros(5000, device="meta", requires_grad=True)  # large enough for 8-bit state
    opt = info.cls([p], **kw)
    p.grad = torch.zeros(5000, device="meta")
    with pytest.raises(adamkit.KernelUnavailableError, match=pattern):
        opt.step()
    assert not opt.state[p]


@pytest.mark.parametrize(
    "kw,spoil,pattern",
    [
        (dict(fused=True), None, r"take .* parameters, not torch.complex128 \(param group 0, parameter 7\)"),
        (
            dict(backend="numba"),
            "transpose",
            r"contiguous, or all three laid out alike .* \(param group 0, parameter 0\)",
        ),
        (
            dict(backend="numba", state_bits=16),
            None,
            r"state of torch.float64 parameters in \['torch.float64'\], not torch.bfloat16 "
            r"\(param group 0, parameter 0\)",
        ),
    ],
)
@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPTIM_IDS)
def test_forced_fused_kernel_that_cannot_take_a_tensor(info: OptimizerInfo, kw: dict, spoil: str, pattern: str) -> None:
    """A forced backend says why it cannot take a tensor, before anything changes."""
    params = make_params()
    if spoil == "transpose":
        params[0] = params[0].detach().t().requires_grad_()
    opt = info.cls(params, **kw)
    set_grads([params], 0, frozen=lambda s, i: False)
    before = snapshot(opt, params)
    with pytest.raises(adamkit.KernelUnavailableError, match=pattern):
        opt.step()
    assert_unchanged(before, snapshot(opt, params))


@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPTIM_IDS)
def test_empty_parameter_list(info: OptimizerInfo) -> None:
    with pytest.raises(ValueError, match=r"empty parameter list"):
        info.cls([])


@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPTIM_IDS)
def test_bad_param_group_adds_nothing(info: OptimizerInfo) -> None:
    params = make_params()
    opt = info.cls(params[:3])
    with pytest.raises(ValueError, match=r"Invalid learning rate: -1.0 \(param group 1\)"):
        opt.add_param_group({"params": params[3:], "lr": -1.0})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match=r"Invalid beta parameter at index 1: 2.0 \(param group 1\)"):
        info.cls([{"params": params[:3]}, {"params": params[3:], "betas": (0.9, 2.0)}])


def _trained(info: OptimizerInfo):
    params = make_params()
    opt = info.cls(params, weight_decay=0.01)
    for step in range(3):
        set_grads([params], step, frozen=lambda s, i: False)
        opt.step()
    set_grads([params], 3, frozen=lambda s, i: False)
    return params, opt


@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPTIM_IDS)
def test_sparse_gradient_changes_nothing(info: OptimizerInfo) -> None:
    params, opt = _trained(info)
    params[5].grad = params[5].grad.to_sparse()  # the params before it must stay untouched too
    before = snapshot(opt, params)
    with pytest.raises(
        RuntimeError, match=rf"{info.name} does not support sparse gradients \(param group 0, parameter 5\)"
    ):
        opt.step()
    assert_unchanged(before, snapshot(opt, params))


@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPTIM_IDS)
def test_grad_shape_mismatch_changes_nothing(info: OptimizerInfo) -> None:
    params, opt = _trained(info)
    fresh = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    opt.add_param_group({"params": [fresh]})
    fresh.grad = torch.ones(4, 4, dtype=torch.float64)
    fresh.data = torch.zeros(3, dtype=torch.float64)  # the grad no longer fits
    before = snapshot(opt, params)
    with pytest.raises(
        RuntimeError,
        match=r"gradient shape \(4, 4\) differs from parameter shape \(3,\) \(param group 1, parameter 0\)",
    ):
        opt.step()
    assert_unchanged(before, snapshot(opt, params))


@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPTIM_IDS)
def test_resized_param_with_old_state_changes_nothing(info: OptimizerInfo) -> None:
    params, opt = _trained(info)
    params[6].data = torch.zeros(10, dtype=torch.float64)
    params[6].grad = torch.ones(10, dtype=torch.float64)
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"state 'exp_avg' has shape \(300,\) .*parameter 6.*resized"):
        opt.step()
    assert_unchanged(before, snapshot(opt, params))


@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPTIM_IDS)
def test_invalid_hyperparameter_set_between_steps_changes_nothing(info: OptimizerInfo) -> None:
    params, opt = _trained(info)
    opt.param_groups[0]["eps"] = -1.0
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=r"Invalid epsilon value: -1.0 \(param group 0\)"):
        opt.step()
    assert_unchanged(before, snapshot(opt, params))
