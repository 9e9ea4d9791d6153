"""Non-finite gradients never silently poison state: mask, skip, propagate, raise."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from helpers import assert_close, assert_unchanged, clone_params, make_params, set_grads, snapshot
from optim_db import OPTIM_IDS, OPTIMIZERS, OptimizerInfo

NAN, INF = float("nan"), float("inf")
KW = {"lr": 0.02, "weight_decay": 0.1}
ALL = lambda s, i: False  # noqa: E731  every parameter gets a gradient


def _poison(params):
    """NaN, +inf and -inf in five elements of three parameters (one complex); the masks."""
    params[0].grad[1, 2] = NAN
    params[6].grad[[3, 100, 299]] = torch.tensor([INF, -INF, NAN], dtype=torch.float64)
    params[7].grad[0, 1] = complex(NAN, 0.0)
    return {i: ~torch.isfinite(params[i].grad) for i in (0, 6, 7)}


def _kw(info: OptimizerInfo) -> dict:
    return {**KW, "amsgrad": True} if info.name != "Adamax" else KW


@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPTIM_IDS)
def test_mask_leaves_bad_elements_alone_and_updates_the_rest(info: OptimizerInfo) -> None:
    params = make_params()
    clean = clone_params(params)
    opt = info.cls(params, **_kw(info), nonfinite="mask")
    ref = info.torch_cls(clean, **_kw(info))
    for step in range(3):
        set_grads([params, clean], step, frozen=ALL)
        opt.step()
        ref.step()
    before = snapshot(opt, params)
    set_grads([params, clean], 3, frozen=ALL)
    bad = _poison(params)
    for i, m in bad.items():  # torch sees a finite value there; elsewhere both agree
        clean[i].grad[m] = 0
    with pytest.warns(RuntimeWarning, match=r"5 non-finite gradient element\(s\) masked") as rec:
        opt.step()
    ref.step()
    assert opt.nonfinite_count == 5
    assert rec[0].filename == __file__  # the warning points at the caller of step()
    old_params, old_state = before[0], before[1]
    for i, p in enumerate(params):
        m = bad.get(i, torch.zeros(p.shape, dtype=torch.bool))
        torch.testing.assert_close(p.detach()[m], old_params[i][m], atol=0, rtol=0)
        torch.testing.assert_close(p.detach()[~m], clean[i].detach()[~m], atol=1e-12, rtol=1e-12)
        for key, value in opt.state[p].items():
            if key != "step":
                assert torch.isfinite(torch.view_as_real(value) if value.is_complex() else value).all(), (i, key)
                torch.testing.assert_close(value[m], old_state[id(p)][key][m], atol=0, rtol=0)
        assert opt.state[p]["step"].item() == 4
    # warned once: the next bad step only counts
    _poison(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert opt.nonfinite_count == 10


@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPTIM_IDS)
def test_skip_skips_the_whole_step(info: OptimizerInfo) -> None:
    params = make_params()
    clean = clone_params(params)
    opt = info.cls([{"params": params[:4]}, {"params": params[4:], "lr": 0.01}], **_kw(info), nonfinite="skip")
    ref = info.torch_cls([{"params": clean[:4]}, {"params": clean[4:], "lr": 0.01}], **_kw(info))
    set_grads([params, clean], 0, frozen=ALL)
    opt.step()
    ref.step()
    before = snapshot(opt, params)
    set_grads([params], 1, frozen=ALL)
    params[6].grad[5] = INF  # one bad element in the second group skips the first group too
    with pytest.warns(RuntimeWarning, match=r"whole step was skipped"):
        opt.step()
    assert_unchanged(before, snapshot(opt, params))
    assert opt.skipped_steps == 1 and opt.nonfinite_count == 1
    # the next good step is torch's second step
    set_grads([params, clean], 2, frozen=ALL)
    opt.step()
    ref.step()
    assert_close(params, clean, torch.float64, "after a skipped step")
    assert all(opt.state[p]["step"].item() == 2 for p in params)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPTIM_IDS)
def test_skip_before_any_state_creates_none(info: OptimizerInfo) -> None:
    params = make_params()
    opt = info.cls(params, nonfinite="skip")
    set_grads([params], 0, frozen=ALL)
    params[0].grad[0, 0] = NAN
    with pytest.warns(RuntimeWarning):
        opt.step()
    assert len(opt.state) == 0


@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPTIM_IDS)
def test_raise_changes_nothing(info: OptimizerInfo) -> None:
    params = make_params()
    opt = info.cls(params, **_kw(info), nonfinite="raise")
    set_grads([params], 0, frozen=ALL)
    opt.step()
    before = snapshot(opt, params)
    set_grads([params], 1, frozen=ALL)
    params[3].grad[1, 1, 1] = -INF
    with pytest.raises(
        FloatingPointError,
        match=r"1 non-finite gradient element\(s\) in 1 tensor\(s\), the first in param group 0, parameter 3",
    ):
        opt.step()
    assert_unchanged(before, snapshot(opt, params))


@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPTIM_IDS)
def test_propagate_is_torchs_behaviour(info: OptimizerInfo) -> None:
    params = make_params()
    clean = clone_params(params)
    opt = info.cls(params, **_kw(info), nonfinite="propagate")
    ref = info.torch_cls(clean, **_kw(info))
    for step in range(3):
        set_grads([params, clean], step, frozen=ALL)
        _poison(params)
        _poison(clean)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.step()
        ref.step()
    for a, b in zip(params, clean):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-10, rtol=1e-10, equal_nan=True)
    assert not torch.isfinite(params[0]).all()
    assert opt.nonfinite_count == 0


def _public(opt: torch.optim.Optimizer) -> set[str]:
    return {k for k in opt.__dict__ if not k.startswith("_")}


@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPTIM_IDS)
def test_copies_keep_the_policy_and_the_counts(info: OptimizerInfo) -> None:
    """``copy.deepcopy`` and pickling keep ``nonfinite``, the count and ``skipped_steps``,
    and the copy has the original's public attributes, no more (torch's
    test_deepcopy_copies_all_public_attrs); a pickle of adamkit 0.1 still loads."""
    params = make_params()
    opt = info.cls(params, nonfinite="skip")
    set_grads([params], 0, frozen=ALL)
    params[0].grad[0, 0] = NAN
    with pytest.warns(RuntimeWarning):
        opt.step()
    set_grads([params], 1, frozen=ALL)
    opt.step()
    old = opt.__getstate__()
    old["nonfinite_count"] = old.pop("_nonfinite_count")  # adamkit 0.1 pickled it so
    legacy = info.cls.__new__(info.cls)
    legacy.__setstate__(old)
    for twin in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt)), legacy):
        assert _public(twin) == _public(opt)
        assert (twin.nonfinite, twin.nonfinite_count, twin.skipped_steps) == ("skip", 1, 1)
        assert twin.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
