"""Non-finite gradients never silently poison state: mask, skip, propagate, raise."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from helpers import assert_close, assert_unchanged, clone_params, make_params, set_grads, snapshot
from optim_db import OPTIM_IDS, OPTIMIZERS, OptimizerInfo

import adamkit
from adamkit.spec import HISTORY

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
    return {**KW, "amsgrad": True} if info.name in ("Adam", "AdamW") else KW


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
            if key != "step" and key not in HISTORY:  # moments; the history is the step's, as step
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


# ------------------------------------------- every state width, every kernel, edge cases
WIDTHS = [32, 16, 8, 4]
BACKENDS = ["numba", "triton", "reference"]
EDGE = {  # the rules: Adam/AdamW, AMSGrad's maximum, Adamax's infinity norm
    "AdamW": (adamkit.AdamW, dict(weight_decay=0.1)),
    "Adam-amsgrad": (adamkit.Adam, dict(amsgrad=True)),
    "Adamax": (adamkit.Adamax, dict(weight_decay=0.05)),
}
SPOTS = [3, 300, 301, 4100]  # 300 and 301 in one block at 8 and 4 bits


def _needs(backend: str) -> None:
    """The Triton kernels step CPU tensors in Triton's interpreter only."""
    if backend == "triton":
        triton_cuda = pytest.importorskip("adamkit.kernels.cuda.triton_kernels", reason="triton is not installed")
        if not triton_cuda.INTERPRETED:
            pytest.skip("steps CPU tensors: needs Triton's interpreter (TRITON_INTERPRET=1)")


def _edge_opt(case: str, params, state_bits: int, backend: str, nonfinite: str = "mask", **extra):
    cls, kw = EDGE[case]
    return cls(params, lr=0.01, **kw, **extra, state_bits=state_bits, min_quant_size=0, backend=backend,
               nonfinite=nonfinite)  # fmt: skip


def _edge_params(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen).to(dtype).requires_grad_() for n in (5000, 300)]


def _edge_grads(params, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(p.shape, generator=gen) * 0.1).to(p.dtype) for p in params]


def _state(opt, p) -> dict[str, torch.Tensor]:
    return {k: v for k, v in opt.state[p].items() if isinstance(v, torch.Tensor) and k != "step"}


def _decoded(opt, p) -> dict[str, torch.Tensor]:
    """A parameter's state as floats (quantized state decoded)."""
    from adamkit.quant import QuantFormat, dequantize

    st = opt.state[p]
    if "quant_bits" not in st:
        return {k: v.float() for k, v in _state(opt, p).items()}
    fmt = QuantFormat.from_key(st["quant_bits"], st["quant_block"], st.get("quant_dither"))
    keys = [k[: -len("_codes")] for k in st if k.endswith("_codes")]
    step = int(st["step"])
    return {k: dequantize(st[f"{k}_codes"], st[f"{k}_absmax"], fmt, fmt.codebook(k), p.numel(), step) for k in keys}


def _close(a: torch.Tensor, b: torch.Tensor, msg: str) -> None:
    tol = dict(atol=1e-6, rtol=1e-5) if a.dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(a.detach(), b.detach(), **tol, equal_nan=True, msg=msg)


def _same_state(opt, p, ref, r, msg: str) -> None:
    """Dense state within :func:`_close`; quantized: absmax to 2e-6, 8-bit codes within
    one (a tie may round either way), dithered 4-bit codes equal."""
    from adamkit.quant import QuantFormat, unpack

    st, rt = _state(opt, p), _state(ref, r)
    assert st.keys() == rt.keys(), msg
    if "quant_bits" not in opt.state[p]:
        for key, value in st.items():
            _close(value, rt[key], f"{msg} {key}")
        return
    fmt = QuantFormat.from_key(opt.state[p]["quant_bits"], opt.state[p]["quant_block"])
    for key, value in st.items():
        if key.endswith("_codes"):
            d = (unpack(value, fmt, p.numel()) - unpack(rt[key], fmt, p.numel())).abs()
            assert int(d.max()) <= (1 if fmt.bits == 8 else 0) and int(d.sum()) <= 2, f"{msg} {key}"
        else:
            torch.testing.assert_close(value, rt[key], atol=0, rtol=2e-6, msg=f"{msg} {key}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("state_bits", WIDTHS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", EDGE)
def test_a_gradient_whose_moments_overflow_is_masked_like_nan(case, backend, state_bits, dtype) -> None:
    """A finite gradient so large that its moments overflow (1e21 squared in float32;
    bf16 parameters carry 3e38; Adamax's first moment, 3.3e38 after -3.3e38) is masked
    and counted as a NaN is: its element keeps its parameter and state, and the rest of
    its block (quantized) steps as it would, so that a twin given NaN there ends bit for
    bit the same. The kernels agree with the reference."""
    _needs(backend)
    adamax = case == "Adamax"
    huge = 3.3e38 if adamax else 1e21 if dtype == torch.float32 else 3e38
    params = {k: _edge_params(dtype) for k in ("huge", "nan", "ref")}
    opts = {k: _edge_opt(case, ps, state_bits, "reference" if k == "ref" else backend) for k, ps in params.items()}
    for step in range(3):
        for k, ps in params.items():
            grads = _edge_grads(ps, step)
            if step == 0 and adamax:  # a first moment of -3.3e37: the next 3.3e38 overflows g - m
                grads[0][SPOTS] = -huge
            if step == 1:
                grads[0][SPOTS] = float("nan") if k == "nan" else huge
            for p, g in zip(ps, grads):
                p.grad = g
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for opt in opts.values():
                opt.step()
        assert opts["huge"].nonfinite_count == opts["nan"].nonfinite_count == opts["ref"].nonfinite_count
        for p, q, r in zip(params["huge"], params["nan"], params["ref"]):
            assert torch.equal(p, q), f"step {step}"
            for key, value in _state(opts["huge"], p).items():
                assert torch.equal(value, _state(opts["nan"], q)[key]), f"step {step} {key}"
            _close(p, r, f"step {step}: {backend} against the reference")
            _same_state(opts["huge"], p, opts["ref"], r, f"step {step}")
    assert opts["huge"].nonfinite_count == len(SPOTS)
    for p in params["huge"]:
        assert torch.isfinite(p).all()
        assert all(torch.isfinite(v).all() for v in _decoded(opts["huge"], p).values())


@pytest.mark.parametrize("state_bits", WIDTHS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", EDGE)
def test_propagate_leaves_a_nan_in_its_own_element(case, backend, state_bits) -> None:
    """Under ``nonfinite="propagate"`` NaN and ±inf gradients turn only their own
    elements' parameters into NaN, as torch's do: quantized state takes the block's
    largest finite magnitude as absmax and stores the non-finite values saturated, so
    the NaN spreads neither through the absmax nor into a neighbouring nibble."""
    _needs(backend)
    params, twins = _edge_params(torch.float32), _edge_params(torch.float32)
    theirs = [p.detach().double().requires_grad_() for p in params]
    cls, kw = EDGE[case]
    ours, ref = (_edge_opt(case, ps, state_bits, b, "propagate") for ps, b in ((params, backend), (twins, "reference")))
    torch_opt = {"AdamW": torch.optim.AdamW, "Adam-amsgrad": torch.optim.Adam, "Adamax": torch.optim.Adamax}[case]
    torch_opt = torch_opt(theirs, lr=0.01, **kw)
    for step in range(4):
        grads = _edge_grads(params, step)
        if step == 1:
            grads[0][[3, 300, 301]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        for ps in (params, twins, theirs):
            for p, g in zip(ps, grads):
                p.grad = g.to(p.dtype)
        for opt in (ours, ref, torch_opt):
            opt.step()
        for p, r, t in zip(params, twins, theirs):
            _close(p, r, f"step {step}: {backend} against the reference")
            _same_state(ours, p, ref, r, f"step {step}")
            assert torch.equal(p.isnan(), t.isnan()), f"step {step}"
    assert ours.nonfinite_count == 0
    assert not torch.isfinite(params[0][[3, 300, 301]]).any()
    assert torch.isfinite(params[0][[0, 1, 2, 4, 299, 302, 4100]]).all() and torch.isfinite(params[1]).all()
    if state_bits < 16:
        for p in params:
            st = ours.state[p]
            assert all(torch.isfinite(v).all() for k, v in st.items() if k.endswith("_absmax"))
            assert all(torch.isfinite(v).all() for v in _decoded(ours, p).values())


@pytest.mark.parametrize("state_bits", WIDTHS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "cls,kw",
    [(adamkit.AdamW, dict(weight_decay=0.1)), (adamkit.Adam, {}), (adamkit.Adam, dict(amsgrad=True)),
     (adamkit.Adamax, {})],
    ids=["AdamW", "Adam", "Adam-amsgrad", "Adamax"],
)  # fmt: skip
def test_an_infinite_parameter_keeps_finite_moments(cls, kw, backend, state_bits) -> None:
    """An infinite parameter stays infinite and its moments finite, as torch's (no rule
    multiplies the parameter by an L2 coefficient of 0: 0·inf is NaN); the kernels
    agree with the reference."""
    _needs(backend)
    params, twins = _edge_params(torch.float32), _edge_params(torch.float32)
    for ps in (params, twins):
        with torch.no_grad():
            ps[0][[3, 300]] = torch.tensor([float("inf"), -float("inf")])
    common = dict(lr=0.01, state_bits=state_bits, min_quant_size=0, **kw)
    ours, ref = cls(params, backend=backend, **common), cls(twins, backend="reference", **common)
    for step in range(3):
        for ps in (params, twins):
            for p, g in zip(ps, _edge_grads(ps, step)):
                p.grad = g
        ours.step()
        ref.step()
        for p, r in zip(params, twins):
            _close(p, r, f"step {step}: {backend} against the reference")
            assert all(torch.isfinite(value).all() for value in _decoded(ours, p).values()), step
            _same_state(ours, p, ref, r, f"step {step}")
    assert torch.equal(params[0][[3, 300]], torch.tensor([float("inf"), -float("inf")]))
    assert ours.nonfinite_count == 0


@pytest.mark.parametrize("state_bits", WIDTHS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_infinite_parameter_under_l2_is_not_masked(backend, state_bits) -> None:
    """With Adam's L2 term an infinite parameter makes its moments infinite, as in
    torch: not masked (its gradient is small), though a NaN gradient in its block sends
    the block to the masking path; its parameter turns NaN, the rest of its block
    steps on (quantized: the state saturated)."""
    _needs(backend)
    params, twins = _edge_params(torch.float32), _edge_params(torch.float32)
    for ps in (params, twins):
        with torch.no_grad():
            ps[0][3] = float("inf")
    common = dict(lr=0.01, weight_decay=0.1, state_bits=state_bits, min_quant_size=0)
    ours, ref = adamkit.Adam(params, backend=backend, **common), adamkit.Adam(twins, backend="reference", **common)
    for step in range(2):
        for ps in (params, twins):
            grads = _edge_grads(ps, step)
            grads[0][5] = float("nan")
            for p, g in zip(ps, grads):
                p.grad = g
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ours.step()
            ref.step()
        for p, r in zip(params, twins):
            _close(p, r, f"step {step}: {backend} against the reference")
    assert ours.nonfinite_count == ref.nonfinite_count == 2  # the NaN gradients
    assert params[0][3].isnan() and params[0][:3].isfinite().all() and params[0][4:].isfinite().all()


@pytest.mark.parametrize("info", OPTIMIZERS, ids=OPTIM_IDS)
def test_reference_keeps_an_infinite_parameters_moments_finite_as_torch(info: OptimizerInfo) -> None:
    """torch.optim in float64 keeps the moments of an infinite parameter finite when no
    L2 term touches the gradient (AdamW; Adam and Adamax without weight decay)."""
    kw = {"weight_decay": 0.1} if info.name == "AdamW" else {}
    params = make_params(complex_param=False)
    with torch.no_grad():
        params[0][1, 2] = float("inf")
        params[6][5] = -float("inf")
    clean = clone_params(params)
    opt, ref = info.cls(params, **kw, backend="reference"), info.torch_cls(clean, **kw)
    for step in range(4):
        set_grads([params, clean], step, frozen=ALL)
        opt.step()
        ref.step()
    for p, q in zip(params, clean):
        assert torch.equal(p.isinf(), q.isinf())
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-10, rtol=1e-10)
        for key, value in ref.state[q].items():
            if key != "step":
                assert torch.isfinite(value).all(), key
                torch.testing.assert_close(opt.state[p][key], value, atol=1e-10, rtol=1e-10)
