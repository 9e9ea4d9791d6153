"""MLX checkpoints (tree_flatten + safetensors) and the torch <-> MLX state converter."""

from __future__ import annotations

import math

import pytest

mx = pytest.importorskip("mlx.core")

import torch  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402
from mlx_helpers import ta, tt  # noqa: E402

import adamkit  # noqa: E402
import adamkit.mlx as am  # noqa: E402

WIDTHS = [32, 16, 8, 4]
# torch layouts: a linear weight, a convolution weight (out, in, kh, kw), a bias
TORCH_SHAPES = {"w": (64, 80), "conv": (16, 8, 3, 3), "b": (16,)}
NAMES = list(TORCH_SHAPES)


def _mlx_shape(name: str) -> tuple[int, ...]:
    s = TORCH_SHAPES[name]
    return (s[0], *s[2:], s[1]) if len(s) >= 3 else s


def _to_mlx_layout(name: str, t: torch.Tensor) -> mx.array:
    return ta(t.permute(0, 2, 3, 1).contiguous() if t.dim() == 4 else t)


def _grads(step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(50 + step)
    return {k: torch.randn(s, generator=gen) * 0.1 for k, s in TORCH_SHAPES.items()}


def _start() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return {k: torch.randn(s, generator=gen) * 0.05 for k, s in TORCH_SHAPES.items()}


def _mlx_step(opt, params: dict, step: int) -> dict:
    grads = {k: _to_mlx_layout(k, g) for k, g in _grads(step).items()}
    params = opt.apply_gradients(grads, params)
    mx.eval(params, opt.state)
    return params


def _torch_step(opt, params: dict[str, torch.nn.Parameter], step: int) -> None:
    for k, g in _grads(step).items():
        params[k].grad = g
    opt.step()


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("cls, kw", [(am.AdamW, {"amsgrad": True}), (am.NAdam, {}), (am.Adamax, {})])
def test_safetensors_round_trip_continues_bit_for_bit(tmp_path, cls, kw, bits):
    """``mx.save_safetensors(dict(tree_flatten(opt.state)))``, then ``opt.state =
    tree_unflatten(mx.load(...))`` into a new optimizer: the run continues bit for bit."""
    kw = dict(kw, learning_rate=0.01, state_bits=bits, min_quant_size=0)
    opt = cls(**kw)
    params = {k: _to_mlx_layout(k, v) for k, v in _start().items()}
    for step in range(3):
        params = _mlx_step(opt, params, step)
    path = str(tmp_path / "opt.safetensors")
    mx.save_safetensors(path, dict(tree_flatten(opt.state)))
    twin = cls(**kw)
    twin.state = tree_unflatten(list(mx.load(path).items()))
    twin_params = dict(params)
    for step in range(3, 6):
        params = _mlx_step(opt, params, step)
        twin_params = _mlx_step(twin, twin_params, step)
    for k in params:
        assert mx.array_equal(params[k], twin_params[k]), k
    flat, twin_flat = dict(tree_flatten(opt.state)), dict(tree_flatten(twin.state))
    assert flat.keys() == twin_flat.keys()
    for k, v in flat.items():
        assert mx.array_equal(v, twin_flat[k]), k
    assert int(twin.state["step"]) == 6


#: How far a continuation may drift from the other framework's, per state width, as the
#: relative L2 difference of the parameters' update since the conversion: (after one
#: step, after four), for state that crossed exactly and for re-encoded state (the
#: convolution's quantized state, permuted through its decoded values, takes one more
#: quantization error). 32 bits: float32 rounding.
DRIFT = {
    "exact": {32: (1e-6, 1e-6), 16: (1e-6, 5e-3), 8: (1e-6, 2e-2), 4: (1e-6, 5e-2)},
    "re-encoded": {32: (1e-6, 1e-6), 16: (1e-6, 5e-3), 8: (2e-2, 3e-2), 4: (0.15, 0.2)},
}


def _close_enough(bits: int, got: torch.Tensor, want: torch.Tensor, before: torch.Tensor, how: str, late: bool) -> None:
    """The relative L2 difference of the update since ``before`` within :data:`DRIFT`."""
    share = float((got - want).norm() / (want - before).norm())
    assert share <= DRIFT[how][bits][int(late)], (bits, how, late, share)


def _compare(bits: int, params: dict, torch_params: dict, before: dict, late: bool) -> None:
    for k, p in torch_params.items():
        conv = p.dim() == 4
        want = p.detach().permute(0, 2, 3, 1) if conv else p.detach()
        start = before[k].permute(0, 2, 3, 1) if conv else before[k]
        assert float((want - start).abs().max()) > 0
        how = "re-encoded" if conv and bits in (8, 4) else "exact"
        _close_enough(bits, tt(params[k]), want, start, how, late)


def _continue_both(bits: int, opt_t, torch_params: dict, opt_m, params: dict) -> None:
    """Steps 4-7 in both frameworks from converted state, compared after the first and the last."""
    before = {k: p.detach().clone() for k, p in torch_params.items()}
    for step in range(4, 8):
        _torch_step(opt_t, torch_params, step)
        params = _mlx_step(opt_m, params, step)
        if step in (4, 7):
            _compare(bits, params, torch_params, before, late=step == 7)


@pytest.mark.parametrize("bits", WIDTHS)
def test_torch_to_mlx_continues(bits):
    """adamkit's torch AdamW at ``bits`` for 4 steps, its state_dict into adamkit.mlx (the
    convolution's state permuted OIHW -> OHWI), then 4 more steps in both: the same
    parameters. Codes of parameters whose layout does not change cross exactly."""
    torch_params = {k: torch.nn.Parameter(v.clone()) for k, v in _start().items()}
    opt_t = adamkit.AdamW(list(torch_params.values()), lr=0.01, state_bits=bits, min_quant_size=0)
    for step in range(4):
        _torch_step(opt_t, torch_params, step)
    params = {k: _to_mlx_layout(k, p.detach()) for k, p in torch_params.items()}
    opt_m = am.AdamW(0.01, state_bits=bits, min_quant_size=0)
    opt_m.load_torch_state_dict(opt_t.state_dict(), NAMES, params)
    assert int(opt_m.state["step"]) == 4
    theirs = opt_t.state[torch_params["w"]]
    if bits in (8, 4):
        assert torch.equal(tt(opt_m.state["w"]["exp_avg_codes"]), theirs["exp_avg_codes"])
        assert torch.equal(tt(opt_m.state["w"]["exp_avg_sq_absmax"]), theirs["exp_avg_sq_absmax"])
    else:
        assert torch.equal(tt(opt_m.state["w"]["exp_avg"]), theirs["exp_avg"])
    _continue_both(bits, opt_t, torch_params, opt_m, params)


@pytest.mark.parametrize("bits", WIDTHS)
def test_mlx_to_torch_continues(bits):
    """adamkit.mlx at ``bits`` for 4 steps, ``to_torch_state_dict`` into adamkit's torch
    AdamW at the same width, 4 more steps in both: the same parameters."""
    params = {k: _to_mlx_layout(k, v) for k, v in _start().items()}
    opt_m = am.AdamW(0.01, state_bits=bits, min_quant_size=0)
    for step in range(4):
        params = _mlx_step(opt_m, params, step)
    torch_params = {}
    for k in NAMES:
        t = tt(params[k])
        torch_params[k] = torch.nn.Parameter(t.permute(0, 3, 1, 2).contiguous() if t.dim() == 4 else t)
    opt_t = adamkit.AdamW(list(torch_params.values()), lr=0.01, state_bits=bits, min_quant_size=0)
    opt_t.load_state_dict(opt_m.to_torch_state_dict(NAMES, params))
    if bits in (8, 4):
        assert torch.equal(opt_t.state[torch_params["b"]]["exp_avg_codes"], tt(opt_m.state["b"]["exp_avg_codes"]))
    _continue_both(bits, opt_t, torch_params, opt_m, params)


def test_torch_optim_both_ways():
    """torch.optim.AdamW's state_dict into an 8-bit adamkit.mlx AdamW (quantized on
    loading), and a 32-bit adamkit.mlx AdamW's (``state_bits=32`` export) into
    torch.optim.AdamW, each continuing like the other framework."""
    torch_params = {k: torch.nn.Parameter(v.clone()) for k, v in _start().items()}
    opt_t = torch.optim.AdamW(list(torch_params.values()), lr=0.01, amsgrad=True)
    for step in range(3):
        _torch_step(opt_t, torch_params, step)
    params = {k: _to_mlx_layout(k, p.detach()) for k, p in torch_params.items()}
    opt_m = am.AdamW(0.01, amsgrad=True)
    opt_m.load_torch_state_dict(opt_t.state_dict(), NAMES, params)
    quantized = am.AdamW(0.01, amsgrad=True, state_bits=8, min_quant_size=0)
    quantized.load_torch_state_dict(opt_t.state_dict(), NAMES, params)
    assert "exp_avg_codes" in quantized.state["w"] and "max_exp_avg_sq_codes" in quantized.state["w"]
    back = torch.optim.AdamW(list(torch_params.values()), lr=0.01, amsgrad=True)
    back.load_state_dict(opt_m.to_torch_state_dict(NAMES, params, state_bits=32))
    for k, p in torch_params.items():
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert torch.equal(back.state[p][key], opt_t.state[p][key]), (k, key)
    before = {k: p.detach().clone() for k, p in torch_params.items()}
    for step in range(3, 6):
        _torch_step(opt_t, torch_params, step)
        params = _mlx_step(opt_m, params, step)
    _compare(32, params, torch_params, before, late=True)


def test_nadam_history_and_param_names():
    """NAdam's ``mu_product`` crosses; a state_dict saved with ``param_names`` (an optimizer
    built from ``named_parameters()``) needs no ``names``."""
    model = torch.nn.Linear(5, 3)
    opt_t = torch.optim.NAdam(model.named_parameters(), lr=0.01)
    model(torch.randn(4, 5)).sum().backward()
    opt_t.step()
    params = {"weight": ta(model.weight.detach()), "bias": ta(model.bias.detach())}
    opt_m = am.NAdam(0.01)
    opt_m.load_torch_state_dict(opt_t.state_dict(), None, params)
    assert float(opt_m.state["weight"]["mu_product"]) == float(opt_t.state[model.weight]["mu_product"])
    back = opt_m.to_torch_state_dict(["weight", "bias"], params)
    assert float(back["state"][0]["mu_product"]) == float(opt_t.state[model.weight]["mu_product"])


def test_differing_steps_and_bad_state_dicts_are_refused():
    """Parameters at different steps (one had no gradient for a step), and corrupt
    entries: a clear ValueError, and the MLX optimizer's state unchanged."""
    torch_params = {k: torch.nn.Parameter(v.clone()) for k, v in _start().items()}
    opt_t = adamkit.AdamW(list(torch_params.values()), lr=0.01, state_bits=8, min_quant_size=0)
    _torch_step(opt_t, torch_params, 0)
    torch_params["b"].grad = None
    for k in ("w", "conv"):
        torch_params[k].grad = torch.ones_like(torch_params[k])
    opt_t.step()
    params = {k: _to_mlx_layout(k, p.detach()) for k, p in torch_params.items()}
    opt_m = am.AdamW(0.01, state_bits=8, min_quant_size=0)
    params = _mlx_step(opt_m, params, 0)
    snapshot = {k: mx.array(v) for k, v in tree_flatten(opt_m.state)}
    with pytest.raises(ValueError, match="steps differ: 'b' at 1, 'conv' at 2"):
        opt_m.load_torch_state_dict(opt_t.state_dict(), NAMES, params)
    _torch_step(opt_t, torch_params, 1)  # b at 2, w and conv at 3
    good = adamkit.AdamW(list(torch_params.values()), lr=0.01, state_bits=8, min_quant_size=0)
    _torch_step(good, torch_params, 0)
    sd = good.state_dict()

    def corrupt(fn):
        bad = {"state": {i: dict(s) for i, s in sd["state"].items()}, "param_groups": sd["param_groups"]}
        fn(bad)
        return bad

    cases = [
        (NAMES[:2], sd, "names has 2 paths"),
        (["w", "conv", "nope"], sd, "'nope', which is not a parameter"),
        (NAMES, corrupt(lambda d: d["state"][0].update(exp_avg_codes=torch.zeros(3, dtype=torch.uint8))), "hold 3"),
        (NAMES, corrupt(lambda d: d["state"][0].update(exp_avg_absmax=torch.full((20,), float("nan")))), "non-finite"),
        (NAMES, corrupt(lambda d: d["state"][0].pop("exp_avg_sq_codes")), "exp_avg_sq' is missing"),
        (NAMES, corrupt(lambda d: d["state"][0].update(quant_bits=5)), "bad quantized-state format"),
        (NAMES, {"state": {}}, "state_dict must be"),
    ]  # fmt: skip
    for names, bad, message in cases:
        with pytest.raises(ValueError, match=message):
            opt_m.load_torch_state_dict(bad, names, params)
    for k, v in tree_flatten(opt_m.state):
        assert mx.array_equal(v, snapshot[k]), k


def test_loading_another_format_is_refused():
    opt = am.AdamW(0.01, state_bits=8, min_quant_size=0)
    params = {"w": mx.ones((300,))}
    opt.apply_gradients({"w": mx.ones((300,))}, params)
    other = am.AdamW(0.01, state_bits=4, min_quant_size=0)
    other.state = tree_unflatten(tree_flatten(opt.state))
    with pytest.raises(ValueError, match=r"format \(bits, block, codes\) \(8, 256, 0\)"):
        other.apply_gradients({"w": mx.ones((300,))}, params)
    bad = dict(tree_flatten(opt.state))
    bad["w.exp_avg_absmax"] = mx.array([1.0, math.nan])
    opt.state = tree_unflatten(list(bad.items()))
    with pytest.raises(ValueError, match="'w': exp_avg_absmax holds 1 negative or non-finite"):
        opt.apply_gradients({"w": mx.ones((300,))}, params)
    bad["w.exp_avg_absmax"], bad["quant_format"] = mx.array([1.0, 1.0]), mx.array(8)
    opt.state = tree_unflatten(list(bad.items()))
    with pytest.raises(ValueError, match="quant_format must be an array of 3"):
        opt.apply_gradients({"w": mx.ones((300,))}, params)


def test_adam_state_into_nadam_and_amsgrad_switched_on_before_export():
    """torch Adam state (no ``mu_product``) into NAdam: refused, its history unknown; an
    MLX state exported right after amsgrad is switched on carries a zero maximum."""
    model = torch.nn.Linear(5, 3)
    opt_t = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(4, 5)).sum().backward()
    opt_t.step()
    params = {"weight": ta(model.weight.detach()), "bias": ta(model.bias.detach())}
    with pytest.raises(ValueError, match="'mu_product' is missing"):
        am.NAdam(0.01).load_torch_state_dict(opt_t.state_dict(), ["weight", "bias"], params)
    opt = am.Adam(0.01)
    opt.load_torch_state_dict(opt_t.state_dict(), ["weight", "bias"], params)
    opt.amsgrad = True
    sd = opt.to_torch_state_dict(["weight", "bias"], params)
    assert torch.equal(sd["state"][0]["max_exp_avg_sq"], torch.zeros(3, 5))


def test_tapered_maps_cross_both_ways():
    """``quant_map="tapered"``: adamkit's torch AdamW's tapered 8-bit state into
    adamkit.mlx (codes cross exactly, ``quant_map`` 1 kept), 4 more steps in both alike;
    and back to torch. An MLX optimizer with the dynamic maps refuses the tapered
    state's format record."""
    torch_params = {k: torch.nn.Parameter(v.clone()) for k, v in _start().items()}
    opt_t = adamkit.AdamW(list(torch_params.values()), lr=0.01, state_bits=8, min_quant_size=0, quant_map="tapered")
    for step in range(4):
        _torch_step(opt_t, torch_params, step)
    params = {k: _to_mlx_layout(k, p.detach()) for k, p in torch_params.items()}
    opt_m = am.AdamW(0.01, state_bits=8, min_quant_size=0, quant_map="tapered")
    opt_m.load_torch_state_dict(opt_t.state_dict(), NAMES, params)
    assert torch.equal(tt(opt_m.state["w"]["exp_avg_codes"]), opt_t.state[torch_params["w"]]["exp_avg_codes"])
    back = opt_m.to_torch_state_dict(NAMES, params)
    assert all(s["quant_map"] == 1 for s in back["state"].values() if "quant_bits" in s)
    _continue_both(8, opt_t, torch_params, opt_m, params)
    assert opt_m.state["quant_format"].tolist() == [8, 256, 2]
    with pytest.raises(ValueError, match="quant_map must be one of"):
        am.AdamW(0.01, state_bits=8, quant_map="log")
    dynamic = am.AdamW(0.01, state_bits=8, min_quant_size=0)
    with pytest.raises(ValueError, match="format \\(bits, block, codes\\) \\(8, 256, 2\\)"):
        dynamic.state = opt_m.state
        dynamic.init(params)
