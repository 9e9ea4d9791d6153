"""adamkit.mlx's optimizers against torch.optim, the torch side's reference and codec."""

from __future__ import annotations

import math

import pytest

mx = pytest.importorskip("mlx.core")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402
from mlx_helpers import MLX_CLASSES, float32_tolerance, mlx_kwargs, ta, tt  # noqa: E402
from optim_db import ALL_CONFIG_IDS, ALL_CONFIGS, sweep  # noqa: E402

import adamkit  # noqa: E402
import adamkit.mlx as am  # noqa: E402
from adamkit.mlx import _rules  # noqa: E402

SHAPES = [(33, 17), (5,), (2, 3, 4)]
STEPS = 25


def _grads(step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=gen) for s in SHAPES]


@pytest.mark.parametrize("info, kw", sweep(ALL_CONFIGS, ALL_CONFIG_IDS))
def test_matches_torch_optim_float32(info, kw):
    """Every optim_db configuration, 25 steps from the same gradients: the MLX
    optimizer's parameters equal torch.optim's in float32 (see float32_tolerance)."""
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen) * 0.05 for s in SHAPES]
    ref = [torch.nn.Parameter(p.clone()) for p in start]
    opt_t = info.torch_cls(ref, **kw)
    params = {f"p{i}": ta(p) for i, p in enumerate(start)}
    opt_m = MLX_CLASSES[info.name](**mlx_kwargs(kw))
    path = torch.zeros(len(SHAPES))
    for step in range(STEPS):
        grads = _grads(step)
        before = [p.detach().clone() for p in ref]
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        opt_t.step()
        path += torch.tensor([(p.detach() - b).abs().max() for p, b in zip(ref, before)])
        params = opt_m.apply_gradients({f"p{i}": ta(g) for i, g in enumerate(grads)}, params)
        mx.eval(params, opt_m.state)
    assert int(opt_m.state["step"]) == STEPS
    for i, p in enumerate(ref):
        got, want = tt(params[f"p{i}"]), p.detach()
        err = (got - want).abs()
        assert bool((err <= float32_tolerance(path[i], want)).all()), (i, float(err.max()), float(path[i]))
        if float(path[i]) > 0:  # something moved, so the comparison can fail
            assert float((want - start[i]).abs().max()) > 0


def _torch_twin(algorithm: str, params, **kw):
    cls = {"adam": adamkit.AdamW, "adamax": adamkit.Adamax, "nadam": adamkit.NAdam}[algorithm]
    return cls(params, backend="reference", **kw)


def _mlx_twin(algorithm: str, **kw):
    cls = {"adam": am.AdamW, "adamax": am.Adamax, "nadam": am.NAdam}[algorithm]
    return cls(**kw)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("algorithm, amsgrad", [("adam", False), ("adam", True), ("adamax", False), ("nadam", False)])
def test_quantized_codes_equal_the_reference_codec(algorithm, amsgrad, bits):
    """In lockstep with the torch side's reference step at 8/4 bits (same state in, same
    gradient): the MLX step writes the same codes (ties at most one code apart, and
    rare), the same block scales and parameters to float32 rounding."""
    kw = dict(state_bits=bits, min_quant_size=0, lr=0.01)
    if amsgrad:
        kw["amsgrad"] = True
    gen = torch.Generator().manual_seed(3)
    shapes = [(40, 70), (333,), (1,)]  # whole blocks, a short last block, one element
    ref = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in shapes]
    opt_t = _torch_twin(algorithm, ref, **kw)
    opt_m = _mlx_twin(algorithm, **kw)
    differing = total = 0
    for step in range(12):
        grads = [torch.randn(s, generator=gen) * 10.0 ** float(torch.randint(-4, 1, ())) for s in shapes]
        params = {f"p{i}": ta(p.detach()) for i, p in enumerate(ref)}
        if step:  # the torch side's state in, exactly
            opt_m.load_torch_state_dict(opt_t.state_dict(), [f"p{i}" for i in range(len(ref))], params)
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        opt_t.step()
        params = opt_m.apply_gradients({f"p{i}": ta(g) for i, g in enumerate(grads)}, params)
        mx.eval(params, opt_m.state)
        for i, p in enumerate(ref):
            mine, theirs = opt_m.state[f"p{i}"], opt_t.state[p]
            assert torch.allclose(tt(params[f"p{i}"]), p.detach(), rtol=1e-6, atol=1e-7)
            for key in [k for k in theirs if k.endswith("_codes")]:
                got, want = tt(mine[key]).long(), theirs[key].long()
                if bits == 4:  # compare per element
                    got = torch.stack([got & 15, got >> 4], 1).reshape(-1)
                    want = torch.stack([want & 15, want >> 4], 1).reshape(-1)
                assert int((got - want).abs().max()) <= 1, (step, i, key)
                differing += int((got != want).sum())
                total += got.numel()
                absmax = key.replace("_codes", "_absmax")
                torch.testing.assert_close(tt(mine[absmax]), theirs[absmax], rtol=1e-5, atol=1e-30)
    assert total > 0 and differing <= 0.002 * total, (differing, total)


def test_accuracy_workload_within_ten_percent_of_the_torch_side():
    """adamkit bench's accuracy workload (scaled down): the MLX 8- and 4-bit AdamW's update
    error against fp32 is within 10 % of the torch side's."""
    from adamkit.bench import accuracy as torch_accuracy
    from adamkit.mlx.bench import accuracy as mlx_accuracy

    shape = dict(rows=512, cols=256, steps=40)
    mine = mlx_accuracy(**shape)
    theirs = torch_accuracy(**shape)
    for bits in (8, 4):
        a, b = mine[f"adamkit.mlx {bits}-bit"], theirs[f"adamkit {bits}-bit"]
        assert 0 < a <= 1.1 * b, (bits, a, b)


@pytest.mark.parametrize("state_bits", [32, 16])
def test_bf16_parameters_and_bf16_state_match_the_torch_side(state_bits):
    """bf16 parameters with float32 (or bf16) state, math in float32, parameters rounded to
    nearest: as the torch side's reference (one bf16 ulp at most, rarely)."""
    gen = torch.Generator().manual_seed(5)
    start = torch.randn(64, 48, generator=gen).bfloat16()
    ref = torch.nn.Parameter(start.clone())
    opt_t = adamkit.AdamW([ref], lr=0.01, backend="reference", state_bits=state_bits)
    opt_m = am.AdamW(0.01, state_bits=state_bits)
    params = {"w": ta(start)}
    for _ in range(10):
        g = torch.randn(64, 48, generator=gen).bfloat16()
        ref.grad = g.clone()
        opt_t.step()
        params = opt_m.apply_gradients({"w": ta(g)}, params)
        mx.eval(params, opt_m.state)
        params = {"w": ta(ref.detach())}  # lockstep: rounding differences do not accumulate
        opt_m.load_torch_state_dict(opt_t.state_dict(), ["w"], params)
    assert params["w"].dtype == mx.bfloat16
    want_dtype = torch.float32 if state_bits == 32 else torch.bfloat16
    assert tt(opt_m.state["w"]["exp_avg"]).dtype == want_dtype
    opt_m.load_torch_state_dict(opt_t.state_dict(), ["w"], params)
    g = torch.randn(64, 48, generator=gen).bfloat16()
    ref.grad = g.clone()
    opt_t.step()
    params = opt_m.apply_gradients({"w": ta(g)}, params)
    got = tt(params["w"])
    ulps = (got.view(torch.int16).int() - ref.detach().view(torch.int16).int()).abs()
    assert int(ulps.max()) <= 1 and float((ulps > 0).float().mean()) < 0.01


def test_state_bytes_per_parameter():
    """≤ 2.05 bytes of state per parameter at 8 bits, ≤ 1.1 at 4 (both moments)."""
    n = 1 << 16
    for bits, limit in ((8, 2.05), (4, 1.1)):
        opt = am.AdamW(state_bits=bits)
        params = {"w": mx.zeros((n,))}
        opt.apply_gradients({"w": mx.ones((n,))}, params)
        size = sum(v.nbytes for _, v in tree_flatten(opt.state["w"]))
        assert size / n <= limit, (bits, size / n)


def test_small_parameters_keep_32_bit_state():
    opt = am.AdamW(state_bits=8, min_quant_size=100)
    params = {"small": mx.zeros((99,)), "big": mx.zeros((100,))}
    opt.apply_gradients({k: mx.ones_like(v) for k, v in params.items()}, params)
    assert sorted(opt.state["small"]) == ["exp_avg", "exp_avg_sq"]
    assert opt.state["small"]["exp_avg"].dtype == mx.float32
    assert sorted(opt.state["big"]) == ["exp_avg_absmax", "exp_avg_codes", "exp_avg_sq_absmax", "exp_avg_sq_codes"]


def test_hyperparameter_changes_never_compile_again(monkeypatch):
    """The step is traced at its first call (once per dtype and rank: shapeless; here the
    small parameters are stepped together, flat) and not again when lr, betas, eps or
    weight decay change: they arrive as arrays."""
    calls = []
    original = _rules.RULES["adam"]
    monkeypatch.setitem(_rules.RULES, "adam", lambda *a, **k: calls.append(1) or original(*a, **k))
    _rules.compiled.cache_clear()
    try:
        opt = am.AdamW(1e-3)
        params = {"a": mx.zeros((4, 5)), "b": mx.zeros((6, 7)), "c": mx.zeros((9,))}
        for i in range(4):
            opt.learning_rate = 1e-3 * (i + 1)
            opt.betas = (0.9 - 0.1 * i, 0.99 - 0.001 * i)
            opt.eps, opt.weight_decay = 10.0 ** -(6 + i), 0.1 * i
            params = opt.apply_gradients({k: mx.ones_like(v) for k, v in params.items()}, params)
            mx.eval(params, opt.state)
            if i == 0:
                first = len(calls)
        assert 1 <= first <= 2 and len(calls) == first
    finally:
        _rules.compiled.cache_clear()


def test_schedules_and_lr_alias():
    """``learning_rate`` as an MLX schedule (evaluated at the step before the update, as
    MLX does) and ``lr=`` as torch's name for it."""
    import mlx.optimizers as optim

    schedule = optim.cosine_decay(0.1, 10)
    opt = am.Adam(schedule)
    twin = am.Adam(lr=0.1)
    params = twin_params = {"w": mx.ones((3,))}
    for step in range(3):
        twin.learning_rate = schedule(mx.array(step))
        params = opt.apply_gradients({"w": mx.ones((3,))}, params)
        twin_params = twin.apply_gradients({"w": mx.ones((3,))}, twin_params)
    assert mx.array_equal(params["w"], twin_params["w"])
    with pytest.raises(ValueError, match="Invalid learning rate"):
        am.Adam(-1.0)


def test_update_on_a_model_and_inside_mx_compile():
    """``update(model, grads)`` on an mlx.nn model, and the same steps inside a user's
    ``mx.compile`` with the optimizer state as compile inputs and outputs: equal results."""
    from functools import partial

    import mlx.nn as nn

    def make():
        mx.random.seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    x, y = mx.random.normal((32, 8), key=mx.random.key(1)), mx.random.normal((32, 1), key=mx.random.key(2))

    def loss_fn(model, x, y):
        return mx.mean((model(x) - y) ** 2)

    results = []
    for use_compile in (False, True):
        for bits in (32, 8):
            model = make()
            opt = am.AdamW(0.01, state_bits=bits, min_quant_size=0, nonfinite="skip")
            grad_fn = nn.value_and_grad(model, loss_fn)
            state = [model.state, opt.state]

            def step(x, y, model=model, opt=opt, grad_fn=grad_fn):
                loss, grads = grad_fn(model, x, y)
                opt.update(model, grads)
                return loss

            if use_compile:
                step = partial(mx.compile, inputs=state, outputs=state)(step)
            losses = []
            for _ in range(5):
                losses.append(step(x, y).item())
                mx.eval(state)
            results.append((losses, tree_flatten(model.parameters())))
            assert int(opt.state["step"]) == 5
    for (eager, eager_params), (comp, comp_params) in zip(results[:2], results[2:]):
        assert eager[-1] < eager[0]
        np.testing.assert_allclose(eager, comp, rtol=1e-5)
        for (_, a), (_, b) in zip(eager_params, comp_params):
            np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ non-finite
def _one_step(nonfinite, bad_value, bits=32):
    opt = am.Adam(0.1, nonfinite=nonfinite, state_bits=bits, min_quant_size=0)
    params = {"a": mx.ones((300,)), "b": mx.ones((4,))}
    opt.apply_gradients({"a": mx.ones((300,)), "b": mx.ones((4,))}, params)  # state to protect
    before = {k: mx.array(v) for k, v in tree_flatten(opt.state)}
    grad_a = mx.ones((300,)) * 0.5
    grad_a[7] = bad_value
    return opt, params, before, opt.apply_gradients({"a": grad_a, "b": mx.ones((4,))}, params)


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1e30])
def test_nonfinite_mask(bad, bits):
    """The element's parameter and moments stay; the rest steps; counted (1e30: finite,
    but its square overflows the second moment)."""
    opt, params, before, after = _one_step("mask", bad, bits)
    mx.eval(after, opt.state)
    assert float(after["a"][7]) == 1.0 and bool(mx.all(mx.isfinite(after["a"])))
    assert float(after["a"][8]) != 1.0 and float(after["b"][0]) != 1.0
    if bits == 32:
        assert float(opt.state["a"]["exp_avg"][7]) == float(before["a.exp_avg"][7])
    assert opt.nonfinite_count == 1 and int(opt.state["step"]) == 2


def test_nonfinite_skip_and_raise_change_nothing():
    opt, params, before, after = _one_step("skip", math.nan)
    mx.eval(after, opt.state)
    assert mx.array_equal(after["a"], params["a"]) and mx.array_equal(after["b"], params["b"])
    assert int(opt.state["step"]) == 1 and opt.skipped_steps == 1 and opt.nonfinite_count == 1
    for key, value in tree_flatten(opt.state):
        if key in before and key not in ("nonfinite_count", "skipped_steps"):
            assert mx.array_equal(value, before[key]), key
    with pytest.raises(FloatingPointError, match="1 gradient element"):
        _one_step("raise", math.inf)
    opt = am.Adam(0.1, nonfinite="raise")
    params = {"w": mx.ones((3,))}
    with pytest.raises(FloatingPointError):
        opt.apply_gradients({"w": mx.array([1.0, math.nan, 1.0])}, params)
    assert "w" not in opt.state  # nothing created or changed


def test_nonfinite_propagate_is_torchs():
    opt, params, before, after = _one_step("propagate", math.nan)
    assert math.isnan(float(after["a"][7])) and math.isfinite(float(after["a"][8]))


def test_raise_inside_compile_is_a_clear_error():
    opt = am.Adam(0.1, nonfinite="raise")
    params = {"w": mx.ones((3,))}

    @mx.compile
    def step(g):
        return opt.apply_gradients({"w": g}, params)["w"]

    with pytest.raises(RuntimeError, match="mx.compile"):
        step(mx.ones((3,)))


# ---------------------------------------------------------------------- errors
def test_bad_input_is_refused_and_changes_nothing():
    opt = am.AdamW(0.1)
    params = {"w": mx.ones((3, 2)), "v": mx.ones((4,))}
    opt.apply_gradients({"w": mx.ones((3, 2)), "v": mx.ones((4,))}, params)
    snapshot = {k: mx.array(v) for k, v in tree_flatten(opt.state)}
    with pytest.raises(ValueError, match="shape"):
        opt.apply_gradients({"w": mx.ones((3, 2)), "v": mx.ones((5,))}, params)
    with pytest.raises(TypeError, match="floating"):
        opt.apply_gradients({"w": mx.ones((3, 2)), "v": mx.ones((4,), mx.int32)}, params)
    with pytest.raises(ValueError, match="beta parameter at index 1"):
        opt.betas = (0.9, 1.5)
    assert opt.betas == (0.9, 0.999)
    for key, value in tree_flatten(opt.state):
        assert mx.array_equal(value, snapshot[key]), key
    for bad in (dict(state_bits=6), dict(nonfinite="ignore"), dict(eps=-1.0), dict(weight_decay=math.nan)):
        with pytest.raises(ValueError):
            am.AdamW(**bad)
    wrong = dict(opt.state)
    wrong["w"] = {"exp_avg": mx.zeros((2, 3)), "exp_avg_sq": mx.zeros((3, 2))}
    opt.state = wrong
    with pytest.raises(ValueError, match="'w': state entry 'exp_avg' is mlx.core.float32 \\(2, 3\\)"):
        opt.apply_gradients({"w": mx.ones((3, 2)), "v": mx.ones((4,))}, params)


def test_amsgrad_switched_on_starts_its_maximum_at_zero():
    opt = am.Adam(0.1)
    params = {"w": mx.ones((4,))}
    params = opt.apply_gradients({"w": mx.ones((4,))}, params)
    opt.amsgrad = True
    opt.apply_gradients({"w": mx.ones((4,))}, params)
    assert "max_exp_avg_sq" in opt.state["w"]


def test_adamkit_does_not_import_mlx():
    """``import adamkit`` stays light: MLX is imported by adamkit.mlx only."""
    from helpers import run_isolated

    done = run_isolated("import sys, adamkit; print('mlx.core' in sys.modules)")
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr


def test_a_rejected_state_stays_rejected_and_unchanged():
    """A loaded state that fails its checks is refused at every step, not only the first,
    and the failed step changes none of it (no state added for other parameters)."""
    opt = am.AdamW(1e-3, state_bits=8, amsgrad=True, min_quant_size=0)
    params = {"a": mx.ones((300,)), "w": mx.ones((300,))}
    grads = {k: mx.ones_like(v) * 0.1 for k, v in params.items()}
    opt.apply_gradients(grads, params)
    bad = dict(tree_flatten(opt.state))
    bad["w.exp_avg_absmax"] = mx.array([math.nan, 1.0])
    del bad["a.max_exp_avg_sq_codes"], bad["a.max_exp_avg_sq_absmax"]
    opt.state = tree_unflatten(list(bad.items()))
    for _ in range(2):
        with pytest.raises(ValueError, match="non-finite block scale"):
            opt.apply_gradients(grads, params)
        assert sorted(opt.state["a"]) == ["exp_avg_absmax", "exp_avg_codes", "exp_avg_sq_absmax", "exp_avg_sq_codes"]


def test_float64_parameters_step_in_float64():
    """float64 parameters: float64 state and math, the step's constants in float64 (only
    the learning rate is MLX's float32 array): torch.optim in float64 to 1e-7 of the path."""
    gen = torch.Generator().manual_seed(2)
    start = torch.randn(40, dtype=torch.float64)
    for torch_cls, cls in ((torch.optim.Adam, am.Adam), (torch.optim.NAdam, am.NAdam)):
        ref = torch.nn.Parameter(start.clone())
        opt_t = torch_cls([ref], lr=0.01, weight_decay=0.1)
        opt_m = cls(0.01, weight_decay=0.1)
        params = {"w": ta(start)}
        assert params["w"].dtype == mx.float64
        path = 0.0
        for _ in range(20):
            g = torch.randn(40, generator=gen, dtype=torch.float64)
            before = ref.detach().clone()
            ref.grad = g.clone()
            opt_t.step()
            path += float((ref.detach() - before).abs().max())
            params = opt_m.apply_gradients({"w": ta(g)}, params)
        assert opt_m.state["w"]["exp_avg"].dtype == mx.float64
        err = float((tt(params["w"]) - ref.detach()).abs().max())
        assert err <= 1e-7 * path, (cls.__name__, err, path)
        twin = cls(0.01, weight_decay=0.1)  # torch's float64 state loads as float64 and steps
        twin.load_torch_state_dict(opt_t.state_dict(), ["w"], params)
        assert twin.state["w"]["exp_avg"].dtype == mx.float64
        twin.apply_gradients({"w": params["w"] * 0}, params)


def test_compiled_step_sees_hyperparameter_changes_and_loaded_state():
    """Inside ``mx.compile`` (state as inputs and outputs): a weight-decay change after the
    step was traced takes effect, and so does a state loaded with load_torch_state_dict."""
    from functools import partial

    opt = am.AdamW(0.1, weight_decay=0.0)
    eager = am.AdamW(0.1, weight_decay=0.0)
    holder = {"w": mx.ones((5,))}
    state = [holder, opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(g):
        holder["w"] = opt.apply_gradients({"w": g}, {"w": holder["w"]})["w"]

    eager_params = {"w": mx.ones((5,))}
    for i in range(4):
        if i == 2:
            opt.weight_decay = eager.weight_decay = 0.5
        g = mx.full((5,), 0.1 * (i + 1))
        step(g)
        mx.eval(state)
        eager_params = eager.apply_gradients({"w": g}, eager_params)
        np.testing.assert_allclose(np.array(holder["w"]), np.array(eager_params["w"]), rtol=1e-6)
    sd = eager.to_torch_state_dict(["w"], eager_params)
    sd["state"][0]["exp_avg"] = sd["state"][0]["exp_avg"] * 0 + 7.0
    opt.load_torch_state_dict(sd, ["w"], {"w": holder["w"]})
    step(mx.zeros((5,)))
    mx.eval(state)
    assert float(opt.state["w"]["exp_avg"][0]) == pytest.approx(7.0 * 0.9)
    assert int(opt.state["step"]) == 5


def test_a_parameter_first_seen_later_gets_state():
    """A parameter absent from the first steps' gradients (a layer unfrozen later) gets
    fresh state when it first arrives."""
    opt = am.AdamW(0.1)
    params = {"a": mx.ones((3,)), "b": mx.ones((4,))}
    params = {**params, **opt.apply_gradients({"a": mx.ones((3,))}, params)}
    params = {**params, **opt.apply_gradients({"a": mx.ones((3,)), "b": mx.ones((4,))}, params)}
    assert sorted(opt.state["b"]) == ["exp_avg", "exp_avg_sq"] and float(params["b"][0]) < 1.0


def test_hyperparameters_as_arrays_and_numpy_scalars():
    opt = am.AdamW(mx.array(1e-3), betas=(np.float32(0.9), 0.99), eps=np.float64(1e-8))
    assert opt.betas == (pytest.approx(0.9), 0.99)
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        opt.nonfinite = "ignore"
