"""The generic tests driven by torch's own table: the ``optim_db`` that ships in the
wheel (``torch.testing._internal.common_optimizers``), imported, not copied.

Its Adam, AdamW and Adamax entries' CPU configurations, with the implementation flags
torch's tests add there (``fused``, ``differentiable``; ``foreach`` is for other
devices), against torch.optim in float64; and their error inputs, each raising the
same error type with a matching message (or warning) and changing nothing.
``scripts/torch-optim-suite.py`` runs torch's test file itself on the same entries.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from helpers import assert_close, assert_state_close, assert_unchanged, make_params, set_grads, snapshot
from optim_db import OPTIMIZERS

pytest.importorskip("expecttest", reason="torch's test helpers import expecttest (the test extra installs it)")
from torch.testing._internal import common_optimizers as co  # noqa: E402

STEPS = 25
OURS = {info.name: info for info in OPTIMIZERS}
TORCH_INFOS = [info for info in co.optim_db if info.name in OURS]


def _inputs() -> list[tuple[str, str, dict]]:
    """(optimizer, description, kwargs) of every CPU configuration, flags included."""
    out = []
    for info in TORCH_INFOS:
        for oi in co._get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float64, info):
            out.append((info.name, oi.desc, oi.kwargs))
    return out


INPUTS = _inputs()


def test_the_wheel_has_our_entries() -> None:
    assert sorted(info.name for info in TORCH_INFOS) == sorted(OURS)
    assert len(INPUTS) >= 30  # 5 configurations each, times the flags


@pytest.mark.parametrize("name,desc,kw", INPUTS, ids=[f"{n}-{d}" for n, d, _ in INPUTS])
def test_matches_torch_float64(name: str, desc: str, kw: dict) -> None:
    """adamkit's class with torch's configuration against torch's class with the same
    one, 25 steps, after every step at 1e-10, then the state. The parameters are
    make_params' seven shapes, a complex one (not with ``fused=True``: torch's fused
    kernels and adamkit's take no complex tensors) and lagging ones; with
    ``differentiable=True`` they are not leaves that require grad (a differentiable step
    is in place on them, in torch as in adamkit), and float64 is the default dtype:
    torch's differentiable Adam computes its bias corrections in the dtype of ``step``,
    float32 otherwise (adamkit's in float64 always)."""
    info = OURS[name]
    theirs = make_params(complex_param=not kw.get("fused"))
    if kw.get("differentiable"):
        theirs = [p.detach() for p in theirs]
    ours = [p.detach().clone().requires_grad_(p.requires_grad) for p in theirs]
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64 if kw.get("differentiable") else default)
    try:
        a, b = info.cls(ours, **copy.deepcopy(kw)), info.torch_cls(theirs, **copy.deepcopy(kw))
        for step in range(STEPS):
            set_grads([ours, theirs], step)
            a.step()
            b.step()
            assert_close(ours, theirs, torch.float64, f"{desc}, step {step}")
    finally:
        torch.set_default_dtype(default)
    assert_state_close(a, b, torch.float64)


def _error_inputs() -> list[tuple[str, co.ErrorOptimizerInput]]:
    return [
        (info.name, error)
        for info in TORCH_INFOS
        for error in info.optim_error_inputs_func(device="cpu", dtype=torch.float64)
    ]


ERROR_INPUTS = _error_inputs()


@pytest.mark.parametrize(
    "name,error", ERROR_INPUTS, ids=[f"{n}-{e.optimizer_error_input.desc}" for n, e in ERROR_INPUTS]
)
def test_error_inputs(name: str, error: co.ErrorOptimizerInput) -> None:
    """The error type and message torch's test_errors expects from torch's class."""
    info, oi = OURS[name], error.optimizer_error_input
    params = oi.params
    tensors = [p for p in (params if isinstance(params, list) else []) if isinstance(p, torch.Tensor)]
    before = [p.detach().clone() for p in tensors]

    def act() -> None:
        opt = info.cls(params, **copy.deepcopy(oi.kwargs))
        if error.error_on == co.OptimizerErrorEnum.STEP_ERROR:
            state = snapshot(opt, tensors)
            try:
                opt.step()
            finally:
                assert_unchanged(state, snapshot(opt, tensors))

    if issubclass(error.error_type, Warning):
        with pytest.warns(error.error_type, match=error.error_regex):
            act()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # none besides the error
            with pytest.raises(error.error_type) as raised:
                act()
        assert re.search(error.error_regex, str(raised.value)), (error.error_regex, str(raised.value))
    for p, old in zip(tensors, before):
        assert torch.equal(p.detach(), old)
