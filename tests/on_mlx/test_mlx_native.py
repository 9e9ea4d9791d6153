"""adamkit.mlx's compiled quantized step (adamkit/mlx/_native_step.cpp, an MLX primitive)
against the same step in MLX operations, its checks, and its fallbacks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

mx = pytest.importorskip("mlx.core")

import numpy as np  # noqa: E402
from helpers import run_isolated  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

import adamkit.mlx as am  # noqa: E402
from adamkit.mlx import _native  # noqa: E402
from adamkit.quant import QuantFormat  # noqa: E402

CLASSES = {"adam": am.Adam, "adamw": am.AdamW, "adamax": am.Adamax, "nadam": am.NAdam}
#: whole blocks, a short last block, an odd size (4-bit: half a byte), one element, a
#: scalar, and one large enough to be split over two threads
SHAPES = [(40, 64), (333,), (257,), (1,), (), (70001,)]


@pytest.fixture(scope="module")
def native():
    module = _native.module(wait=True)
    if module is None:
        from adamkit._native_build import compiler

        if not compiler() or "nanobind" in _native.status:
            pytest.skip(f"the compiled step cannot be built here: {_native.status}")
        pytest.fail(f"the compiled step did not build: {_native.status}")
    return module


class Calls:
    """The compiled module, counting its steps."""

    def __init__(self, module):
        self.module, self.count = module, 0

    def __getattr__(self, name):
        return getattr(self.module, name)

    def quantized_step(self, *args, **kwargs):
        self.count += 1
        return self.module.quantized_step(*args, **kwargs)


def _run(monkeypatch, module, name, kw, grads, params, compiled=False):
    """Steps of a fresh optimizer with the compiled step (``module``) or without (None):
    (parameters, state, optimizer, compiled steps taken)."""
    calls = Calls(module) if module is not None else None
    with monkeypatch.context() as m:
        m.setattr(_native, "module", lambda start=True, wait=False: calls)
        opt = CLASSES[name](**kw)
        step = opt.apply_gradients
        if compiled:
            state = [opt.state]
            step = mx.compile(opt.apply_gradients, inputs=state, outputs=state)
            opt.init(params)
        for g in grads:
            params = step(g, params)
            mx.eval(params, opt.state)
    return params, opt.state, opt, (calls.count if calls else 0)


def _grads(shapes, steps, seed=0, dtype=mx.float32):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        scale = 10.0 ** rng.integers(-4, 1)
        out.append({f"p{i}": _array(rng, s, scale, dtype) for i, s in enumerate(shapes)})
    return out


def _params(shapes, seed=1, dtype=mx.float32):
    rng = np.random.default_rng(seed)
    return {f"p{i}": _array(rng, s, 0.1, dtype) for i, s in enumerate(shapes)}


def _array(rng, shape, scale, dtype):
    return mx.array(rng.standard_normal(shape).astype(np.float32) * scale).astype(dtype)


def _assert_same(a_params, a_state, b_params, b_state, bits):
    """The two paths agree: parameters to float32 rounding, block scales likewise, codes
    at most one apart and rarely different (ties); on the machines tested they are
    identical, operation for operation."""
    for key, value in tree_flatten(a_params):
        other = dict(tree_flatten(b_params))[key]
        assert value.dtype == other.dtype and value.shape == other.shape, key
        mine, theirs_p = np.array(value.astype(mx.float32)), np.array(other.astype(mx.float32))
        np.testing.assert_allclose(mine, theirs_p, rtol=1e-6, atol=1e-7, err_msg=key)
    theirs = dict(tree_flatten(b_state))
    differing = total = 0
    for key, value in tree_flatten(a_state):
        other = theirs[key]
        assert value.dtype == other.dtype and value.shape == other.shape, key
        if key.endswith("_codes"):
            got, want = np.array(value).astype(np.int64), np.array(other).astype(np.int64)
            if bits == 4:
                got, want = np.stack([got & 15, got >> 4], 1), np.stack([want & 15, want >> 4], 1)
            assert np.abs(got - want).max(initial=0) <= 1, key
            differing += int((got != want).sum())
            total += got.size
        elif value.dtype in (mx.float32, mx.float64):
            np.testing.assert_allclose(np.array(value), np.array(other), rtol=1e-6, atol=1e-30, err_msg=key)
        else:
            assert mx.array_equal(value, other), key
    assert differing <= 0.002 * max(total, 1), (differing, total)


CONFIGS = [
    ("adamw", {}),
    ("adamw", {"amsgrad": True}),
    ("adam", {"weight_decay": 0.1, "maximize": True}),
    ("adamw", {"betas": (0.3, 0.95), "weight_decay": 0.05}),  # torch's lerp from g (1 - β1 >= 1/2)
    ("adamax", {"weight_decay": 0.01}),
    ("nadam", {}),
    ("nadam", {"decoupled_weight_decay": True, "weight_decay": 0.1}),
]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name, extra", CONFIGS)
def test_compiled_step_equals_the_mlx_operations(monkeypatch, native, name, extra, bits):
    """Every algorithm and option at 8 and 4 bits, with short blocks, odd sizes and a
    tensor split over threads: the same parameters, codes and scales as the step in MLX
    operations, over several steps (so decoding what the other wrote is covered)."""
    kw = dict(learning_rate=0.01, state_bits=bits, min_quant_size=0, **extra)
    grads, params = _grads(SHAPES, 6), _params(SHAPES)
    a = _run(monkeypatch, native, name, kw, grads, params)
    b = _run(monkeypatch, None, name, kw, grads, params)
    assert a[3] == 6 * len(SHAPES) and b[3] == 0
    _assert_same(a[0], a[1], b[0], b[1], bits)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("pdtype, gdtype", [("bfloat16", "bfloat16"), ("float16", "float16"), ("float32", "bfloat16")])
def test_low_precision_parameters_and_gradients(monkeypatch, native, pdtype, gdtype, bits):
    shapes = [(300,), (33, 17)]
    kw = dict(learning_rate=0.01, state_bits=bits, min_quant_size=0)
    grads = _grads(shapes, 4, dtype=getattr(mx, gdtype))
    params = _params(shapes, dtype=getattr(mx, pdtype))
    a = _run(monkeypatch, native, "adamw", kw, grads, params)
    b = _run(monkeypatch, None, "adamw", kw, grads, params)
    assert a[3] == 8 and a[0]["p0"].dtype == getattr(mx, pdtype)
    _assert_same(a[0], a[1], b[0], b[1], bits)


def _with_bad(shapes, value, where, steps=3):
    grads = _grads(shapes, steps)
    for g in grads[1:]:
        for i, j in where:
            flat = g[f"p{i}"].reshape(-1)
            flat[j] = value
            g[f"p{i}"] = flat.reshape(shapes[i])
    return grads


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("policy", ["mask", "propagate"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 1e30])
def test_nonfinite_gradients(monkeypatch, native, bad, policy, bits):
    """NaN, ±inf and huge gradient elements in some blocks: masked (the element keeps its
    parameter and state; counted) or propagated, as the step in MLX operations does;
    the other blocks' codes are untouched by the bad ones."""
    shapes = [(1000,), (70001,)]
    grads = _with_bad(shapes, bad, [(0, 3), (0, 999), (1, 40000)])
    kw = dict(learning_rate=0.01, state_bits=bits, min_quant_size=0, nonfinite=policy)
    params = _params(shapes)
    a = _run(monkeypatch, native, "adamw", kw, grads, params)
    b = _run(monkeypatch, None, "adamw", kw, grads, params)
    assert a[3] == 6
    if policy == "mask":
        assert a[2].nonfinite_count == b[2].nonfinite_count == 6
        assert bool(mx.all(mx.isfinite(a[0]["p0"]))) and bool(mx.all(mx.isfinite(a[0]["p1"])))
        _assert_same(a[0], a[1], b[0], b[1], bits)
    else:  # the element's parameter takes the NaN/inf; its block's codes stay saturated, not NaN
        for key, value in tree_flatten(a[1]):
            if key.endswith("_absmax"):
                assert bool(mx.all(mx.isfinite(value))), key
        bad_a = ~mx.isfinite(a[0]["p0"])
        assert mx.array_equal(bad_a, ~mx.isfinite(b[0]["p0"]))
        fine = np.array(~bad_a)
        np.testing.assert_allclose(np.array(a[0]["p0"])[fine], np.array(b[0]["p0"])[fine], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", [8, 4])
def test_inside_mx_compile_with_skip_on_the_device(monkeypatch, native, bits):
    """Inside a user's ``mx.compile`` (state as inputs and outputs) the compiled step is a
    node of the graph; ``nonfinite="skip"`` is decided on the device there, and a step
    with a NaN changes nothing."""
    shapes = [(600,), (20, 30)]
    grads = _with_bad(shapes, math.nan, [(1, 5)], steps=4)[:3]
    grads[2] = _grads(shapes, 1, seed=7)[0]
    kw = dict(learning_rate=0.01, state_bits=bits, min_quant_size=0, nonfinite="skip")
    params = _params(shapes)
    a = _run(monkeypatch, native, "adamw", kw, grads, params, compiled=True)
    b = _run(monkeypatch, None, "adamw", kw, grads, params)
    assert a[3] >= 2  # traced (at least once per parameter)
    assert a[2].skipped_steps == b[2].skipped_steps == 1 and int(a[1]["step"]) == 2
    _assert_same(a[0], a[1], b[0], b[1], bits)


def test_strided_state_and_gradients(monkeypatch, native):
    """State arrays and gradients that are strided views (a loaded state sliced out of a
    larger array, a transposed gradient) give what their contiguous copies give."""
    shape = (48, 40)
    kw = dict(learning_rate=0.01, state_bits=8, min_quant_size=0)
    params = _params([shape])
    grads = _grads([shape], 2)
    opt = am.AdamW(**kw)
    p = opt.apply_gradients(grads[0], params)
    mx.eval(p, opt.state)
    strided = {k: mx.stack([v, v], axis=1)[:, 0] for k, v in opt.state["p0"].items()}
    g_t = grads[1]["p0"].T.T  # same values
    g_view = mx.stack([grads[1]["p0"], grads[1]["p0"]], axis=2)[..., 1]
    results = []
    for state, g in ((dict(opt.state["p0"]), grads[1]["p0"]), (strided, g_view), (strided, g_t)):
        twin = am.AdamW(**kw)
        twin.state["step"] = opt.state["step"]
        twin.init({"p0": p["p0"]})
        twin.state["p0"].update(state)
        out = twin.apply_gradients({"p0": g}, {"p0": p["p0"]})
        mx.eval(out, twin.state)
        results.append((out, twin.state))
    for out, state in results[1:]:
        assert mx.array_equal(out["p0"], results[0][0]["p0"])
        for key in state["p0"]:
            assert mx.array_equal(state["p0"][key], results[0][1]["p0"][key]), key


def test_threads_do_not_change_results(monkeypatch, native):
    """A tensor split over 1, 2 or 3 threads (by whole blocks): identical results."""
    shapes = [(200_001,)]
    grads, params = _grads(shapes, 3), _params(shapes)
    results = []
    for count in ("1", "2", "3"):
        monkeypatch.setenv("ADAMKIT_MLX_STREAMS", count)
        _native.step_fn.cache_clear()
        results.append(_run(monkeypatch, native, "adamw", dict(learning_rate=0.01, state_bits=4), grads, params))
    _native.step_fn.cache_clear()
    for other in results[1:]:
        assert mx.array_equal(other[0]["p0"], results[0][0]["p0"])
        for key, value in tree_flatten(other[1]):
            assert mx.array_equal(value, dict(tree_flatten(results[0][1]))[key]), key


def test_switched_off_or_without_nanobind_the_mlx_path_steps(monkeypatch):
    """``ADAMKIT_MLX_NATIVE=0`` or no nanobind: no compiled step, a status that says why,
    and steps in MLX operations."""
    code = """
import builtins, mlx.core as mx, adamkit.mlx as am
from adamkit.mlx import _native
assert _native.module(wait=True) is None and _native.status == "off (ADAMKIT_MLX_NATIVE=0)", _native.status
opt = am.AdamW(0.01, state_bits=8, min_quant_size=0)
p = opt.apply_gradients({"w": mx.ones((300,))}, {"w": mx.zeros((300,))})
mx.eval(p)
assert abs(float(p["w"][0]) + 0.01) < 1e-6
"""
    done = run_isolated(code, env={"ADAMKIT_MLX_NATIVE": "0"})
    assert done.returncode == 0, done.stderr
    code = """
import sys
sys.modules["nanobind"] = None  # import fails
from adamkit.mlx import _native
assert _native.module(wait=True) is None and "nanobind is not installed" in _native.status, _native.status
"""
    done = run_isolated(code)
    assert done.returncode == 0, done.stderr


def _direct_args(n=1000, bits=8, block=256):
    fmt = QuantFormat(bits, block)
    stored = n if bits == 8 else (n + 1) // 2
    blocks = -(-n // block)
    state = [mx.zeros((stored,), mx.uint8), mx.ones((blocks,)), mx.zeros((stored,), mx.uint8), mx.ones((blocks,))]
    fn_args = dict(
        g=mx.ones((n,)), p=mx.ones((n,)), consts=mx.zeros((15,)), t=mx.array(1, mx.uint32), product=mx.array(0.0)
    )
    return fmt, fn_args, state


HOSTILE = [
    ("codes size", lambda a, s, t: s.__setitem__(0, mx.zeros((999,), mx.uint8))),
    ("codes size", lambda a, s, t: s.__setitem__(0, mx.zeros((1000,), mx.int32))),
    ("absmax size", lambda a, s, t: s.__setitem__(1, mx.ones((3,)))),
    ("absmax size", lambda a, s, t: s.__setitem__(3, mx.ones((4,), mx.float16))),
    ("gradient and parameter sizes", lambda a, s, t: a.__setitem__("g", mx.ones((999,)))),
    ("dtypes", lambda a, s, t: a.__setitem__("p", mx.ones((1000,), mx.int32))),
    ("dtypes", lambda a, s, t: a.__setitem__("g", mx.ones((1000,), mx.float64))),
    ("consts", lambda a, s, t: a.__setitem__("consts", mx.zeros((14,)))),
    ("step", lambda a, s, t: a.__setitem__("t", mx.array(1, mx.int32))),
    ("product", lambda a, s, t: a.__setitem__("product", mx.zeros((2,)))),
    ("8-bit table", lambda a, s, t: t.__setitem__(1, t[1][:-1])),
    ("8-bit values", lambda a, s, t: t.__setitem__(0, t[0][:16])),
    ("tables", lambda a, s, t: t.pop()),
    ("state entries", lambda a, s, t: s.pop()),
]


@pytest.mark.heavy
def test_the_primitive_refuses_what_it_cannot_step():
    """Direct calls with wrong sizes, dtypes, tables or attributes: ValueError naming what
    is wrong, before anything runs (in a child process: a crash fails only this test)."""
    here = Path(__file__).resolve().parent
    code = f"""
import sys
sys.path[:0] = [{str(here.parent)!r}, {str(here)!r}]
import mlx.core as mx
from adamkit.mlx import _native
from test_mlx_native import HOSTILE, _direct_args, _attributes
module = _native.module(wait=True)
assert module is not None, _native.status
fmt, args, state = _direct_args()
tables, attrs = _attributes(fmt)
out = module.quantized_step(**args, state=state, tables=tables, **attrs)
mx.eval(out)
assert out[0].shape == (1000,) and out[-1].item() == 0
for what, spoil in HOSTILE:
    fmt, args, state = _direct_args()
    tables, attrs = _attributes(fmt)
    spoil(args, state, tables)
    try:
        mx.eval(module.quantized_step(**args, state=state, tables=tables, **attrs))
    except ValueError as err:
        assert what in str(err), (what, str(err))
    else:
        raise AssertionError(f"accepted: {{what}}")
for key, value in [("block", 0), ("block", 255), ("block", 8192), ("threads", 0), ("bits", [8, 5]),
                   ("algorithm", 3), ("bits", [8]), ("layout", [0, 0, 40, 1]), ("dither", [1, 0])]:
    fmt, args, state = _direct_args()
    tables, attrs = _attributes(fmt)
    attrs[key] = value
    try:
        mx.eval(module.quantized_step(**args, state=state, tables=tables, **attrs))
    except ValueError:
        pass
    else:
        raise AssertionError(f"accepted: {{key}}={{value}}")
print("ok")
"""
    done = run_isolated(code)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


def _attributes(fmt):
    """The tables and attributes :func:`adamkit.mlx._native.step_fn` passes, for direct calls."""
    books = [fmt.codebook(k) for k in ("exp_avg", "exp_avg_sq")]
    return _native.tables_for(books), _native.attributes("adam", books, fmt, False, False, False)
