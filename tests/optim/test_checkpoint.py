"""state_dict / load_state_dict: torch's layout, both directions, validation before change."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    assert_close,
    assert_unchanged,
    clone_params,
    make_params,
    round_trip,
    set_grads,
    snapshot,
)
from optim_db import ALL_CONFIG_IDS, ALL_CONFIGS, OPTIM_IDS, OPTIMIZERS, OptimizerInfo

import adamkit
from adamkit.spec import HISTORY

HALF, STEPS = 10, 22


def _train(opt, params, steps, others=()):
    for step in steps:
        set_grads([params, *[o[1] for o in others]], step)
        opt.step()
        for o, _ in others:
            o.step()


@pytest.mark.parametrize("direction", ["torch->adamkit", "adamkit->torch"])
@pytest.mark.parametrize("info,kw", ALL_CONFIGS, ids=ALL_CONFIG_IDS)
def test_checkpoint_interoperates_mid_training(info: OptimizerInfo, kw: dict, direction: str) -> None:
    first_cls, second_cls = (info.torch_cls, info.cls) if direction == "torch->adamkit" else (info.cls, info.torch_cls)
    params = make_params()
    first = first_cls(params, **copy.deepcopy(kw))
    _train(first, params, range(HALF))

    # continue twice from the same point: in the first optimizer and in a loaded second one
    resumed = clone_params(params)
    second = second_cls(resumed, **copy.deepcopy(kw))
    second.load_state_dict(round_trip(first.state_dict()))
    _train(first, params, range(HALF, STEPS), others=[(second, resumed)])
    assert_close(resumed, params, torch.float64, direction)


@pytest.mark.parametrize("info,kw", ALL_CONFIGS, ids=ALL_CONFIG_IDS)
def test_save_load_continue_is_bit_identical(info: OptimizerInfo, kw: dict) -> None:
    params = make_params()
    opt = info.cls(params, **copy.deepcopy(kw))
    _train(opt, params, range(HALF))
    resumed = clone_params(params)
    opt2 = info.cls(resumed, **copy.deepcopy(kw))
    opt2.load_state_dict(round_trip(opt.state_dict()))
    _train(opt, params, range(HALF, STEPS), others=[(opt2, resumed)])
    for a, b in zip(resumed, params):
        assert torch.equal(a, b)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPTIM_IDS)
def test_load_keeps_state_dtype_and_copies(info: OptimizerInfo) -> None:
    """float64 state loaded for float32 params stays float64 (torch would cast it)."""
    p64 = make_params(torch.float64, complex_param=False)
    opt64 = info.cls(p64)
    _train(opt64, p64, range(3))
    sd = opt64.state_dict()

    p32 = [p.detach().float().requires_grad_() for p in p64]
    opt32 = info.cls(p32)
    opt32.load_state_dict(sd)
    for p in p32:
        for key, value in opt32.state[p].items():
            if key != "step" and key not in HISTORY:
                assert value.dtype == torch.float64, key
    # the loaded state is a copy: stepping one optimizer does not touch the other's
    before = {k: v.clone() for k, v in opt64.state[p64[0]].items()}
    ref = clone_params(p64)
    opt_ref = info.cls(ref)
    opt_ref.load_state_dict(sd)
    for step in range(3, 6):
        set_grads([ref], step)
        for p, r in zip(p32, ref):
            p.grad = None if r.grad is None else r.grad.float()
        opt32.step()
        opt_ref.step()
    for key, value in opt64.state[p64[0]].items():
        assert torch.equal(value, before[key]), key
    # mixed-dtype stepping (float32 params, float64 moments) follows the float64 run
    assert_close(p32, [r.float() for r in ref], torch.float32, "mixed dtypes")


@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPTIM_IDS)
def test_load_moves_state_to_the_parameters_device(info: OptimizerInfo) -> None:
    """State follows the parameter's device and keeps its dtype (meta stands in for a GPU)."""
    params = make_params(complex_param=False)
    opt = info.cls(params)
    _train(opt, params, range(2))
    on_meta = [torch.empty(p.shape, dtype=torch.float32, device="meta", requires_grad=True) for p in params]
    moved = info.cls(on_meta)
    moved.load_state_dict(opt.state_dict())
    for p in on_meta:
        for key, value in moved.state[p].items():
            if key == "step" or key in HISTORY:  # host scalars
                assert value.device.type == "cpu" and value.dtype == torch.float32
            else:
                assert value.device.type == "meta" and value.dtype == torch.float64, key


def test_adamw_stays_decoupled_when_loading_an_adam_checkpoint() -> None:
    params = make_params()
    adam = torch.optim.Adam(params, weight_decay=0.1)
    _train(adam, params, range(2))
    ours = adamkit.AdamW(clone_params(params))
    ours.load_state_dict(adam.state_dict())
    assert ours.param_groups[0]["decoupled_weight_decay"] is True
    assert ours.param_groups[0]["weight_decay"] == 0.1


def test_implementation_keys_are_kept_math_keys_are_loaded() -> None:
    params = make_params()
    torch_opt = torch.optim.Adam(params, lr=0.05, amsgrad=True)
    _train(torch_opt, params, range(2))
    sd = torch_opt.state_dict()
    sd["param_groups"][0]["capturable"] = True  # as written by a CUDA-graph run
    sd["param_groups"][0]["initial_lr"] = 0.05  # as a scheduler leaves it
    ours = adamkit.Adam(clone_params(params), lr=1.0, backend="reference")
    ours.load_state_dict(sd)
    g = ours.param_groups[0]
    assert g["capturable"] is False and g["backend"] == "reference" and g["state_bits"] == 32
    assert g["lr"] == 0.05 and g["amsgrad"] is True and g["initial_lr"] == 0.05
    set_grads([ours.param_groups[0]["params"]], 3)
    ours.step()


def test_loading_a_fresh_state_dict_and_state_keyed_by_torchs_ids() -> None:
    params = make_params()
    ours = adamkit.Adam(params)
    ours.load_state_dict(torch.optim.Adam(clone_params(params)).state_dict())
    assert len(ours.state) == 0


# ---------------------------------------------------------------- validation
def _trained(info: OptimizerInfo, **kw):
    params = make_params()
    opt = info.cls(params, **kw)
    _train(opt, params, range(3))
    return params, opt


def _corrupt(sd, how):
    sd = copy.deepcopy(sd)
    how(sd)
    return sd


BAD_STATE_DICTS = {
    "not a mapping": (lambda sd: sd.clear(), r"'state' and 'param_groups'"),
    "extra group": (
        lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0], params=[99])),
        r"2 parameter groups, this optimizer has 1",
    ),
    "missing param": (lambda sd: sd["param_groups"][0]["params"].pop(), r"param group 0: .* 7 parameters.* 8"),
    "wrong shape": (
        lambda sd: sd["state"][0].update(exp_avg=torch.zeros(2, 2, dtype=torch.float64)),
        r"param group 0, parameter 0: state 'exp_avg' has shape \(2, 2\)",
    ),
    "missing key": (lambda sd: sd["state"][3].pop("exp_avg"), r"param group 0, parameter 3: state lacks \['exp_avg'\]"),
    "not a tensor": (
        lambda sd: sd["state"][1].update(exp_avg=[1.0] * 7),
        r"parameter 1: state 'exp_avg' must be a tensor",
    ),
    "bad step": (lambda sd: sd["state"][0].update(step=torch.tensor(float("nan"))), r"'step' must be finite"),
    "int state": (
        lambda sd: sd["state"][0].update(exp_avg=torch.zeros(5, 3, dtype=torch.int64)),
        r"state 'exp_avg' is torch.int64",
    ),
    "real state for complex param": (
        lambda sd: sd["state"][7].update(exp_avg=torch.zeros(3, 2, dtype=torch.float64)),
        r"parameter 7: state 'exp_avg' is torch.float64",
    ),
    "unknown param id": (lambda sd: sd["state"].update({42: {}}), r"parameter id 42"),
    "bad lr": (lambda sd: sd["param_groups"][0].update(lr=-1.0), r"Invalid learning rate: -1.0 \(param group 0"),
}


@pytest.mark.parametrize("case", BAD_STATE_DICTS, ids=list(BAD_STATE_DICTS))
@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPTIM_IDS)
def test_bad_state_dict_raises_and_changes_nothing(info: OptimizerInfo, case: str) -> None:
    params, opt = _trained(info, weight_decay=0.01)
    how, pattern = BAD_STATE_DICTS[case]
    bad = _corrupt(opt.state_dict(), how) if case != "not a mapping" else {}
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=pattern):
        opt.load_state_dict(bad)
    assert_unchanged(before, snapshot(opt, params))


def test_loading_an_adamax_checkpoint_into_adam_names_the_missing_key() -> None:
    params = make_params()
    adamax = torch.optim.Adamax(params)
    _train(adamax, params, range(2))
    with pytest.raises(ValueError, match=r"parameter 0: state lacks \['exp_avg_sq'\]"):
        adamkit.Adam(clone_params(params)).load_state_dict(adamax.state_dict())


def test_amsgrad_checkpoint_without_max_exp_avg_sq_starts_the_maximum_at_zero() -> None:
    """A torch checkpoint taken without AMSGrad loads into an AMSGrad optimizer (as
    switching ``amsgrad`` on mid-run does): the running maximum starts at zero, so the
    steps match torch.optim given that zero maximum explicitly."""
    params = make_params()
    plain = torch.optim.Adam(params)
    _train(plain, params, range(2))
    sd = plain.state_dict()
    sd["param_groups"][0]["amsgrad"] = True
    ours = adamkit.Adam(clone_params(params))
    ours.load_state_dict(copy.deepcopy(sd))
    for state in sd["state"].values():
        state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"])
    theirs_params = clone_params(params)
    theirs = torch.optim.Adam(theirs_params)
    theirs.load_state_dict(sd)
    ours_params = ours.param_groups[0]["params"]
    _train(ours, ours_params, range(2, 6), others=[(theirs, theirs_params)])
    assert_close(ours_params, theirs_params, torch.float64, "params")
    assert_close(
        [ours.state[p]["max_exp_avg_sq"] for p in ours_params],
        [theirs.state[p]["max_exp_avg_sq"] for p in theirs_params],
        torch.float64,
        "max_exp_avg_sq",
    )


def test_load_state_dict_hooks_run() -> None:
    params = make_params()
    opt = adamkit.Adam(params)
    seen = []
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append("pre"))
    opt.register_load_state_dict_post_hook(lambda o: seen.append("post"))
    opt.load_state_dict(opt.state_dict())
    assert seen == ["pre", "post"]


@pytest.mark.parametrize(
    "edit,pattern",
    [
        (lambda st: st.pop("mu_product"), r"lacks \['mu_product'\]"),
        (lambda st: st.update(mu_product=torch.tensor(float("nan"))), r"'mu_product' must be finite"),
        (lambda st: st.update(mu_product=torch.ones(3)), r"'mu_product' must be one real number"),
    ],
    ids=["missing", "nan", "shape"],
)
def test_nadam_history_is_validated_on_load(edit, pattern) -> None:
    """NAdam's per-parameter ``mu_product`` is checked like ``step``: a bad one is a
    ValueError naming it, and nothing changes."""
    params = make_params(complex_param=False)
    opt = adamkit.NAdam(params)
    _train(opt, params, range(2))
    sd = opt.state_dict()
    edit(sd["state"][0])
    fresh = adamkit.NAdam(clone_params(params))
    with pytest.raises(ValueError, match=pattern):
        fresh.load_state_dict(sd)
    assert not fresh.state


def test_nadam_mu_product_crosses_to_torch_and_back() -> None:
    """torch.optim.NAdam's checkpoint (its float32 ``mu_product`` included) continues in
    adamkit, and adamkit's in torch, as one uninterrupted run."""
    base = make_params(complex_param=False)
    runs = {}
    for first, second in [(torch.optim.NAdam, adamkit.NAdam), (adamkit.NAdam, torch.optim.NAdam)]:
        params = clone_params(base)
        a = first(params, lr=0.01, weight_decay=0.1)
        _train(a, params, range(3))
        b = second(params, lr=0.01, weight_decay=0.1)
        b.load_state_dict(a.state_dict())
        if second is adamkit.NAdam:  # kept as saved (torch casts it to a float64 parameter's dtype)
            assert b.state[params[0]]["mu_product"].dtype == torch.float32
        _train(b, params, range(3, 6))
        runs[first] = params
    straight = clone_params(base)
    c = torch.optim.NAdam(straight, lr=0.01, weight_decay=0.1)
    _train(c, straight, range(6))
    for params in runs.values():
        assert_close(params, straight, torch.float64, "continued")
