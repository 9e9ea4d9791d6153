"""A fused backend and the reference side by side, in lockstep: both take the same
gradients; after every step the fused side's parameters and state are compared with
the reference's and then overwritten with them, so a discrepancy cannot hide in
accumulated drift and every step tests the rule afresh. 32- and 16-bit state (the
quantized lockstep is in ``quant_helpers``). Shared by the Numba tests
(``tests/kernels/cpu/``), the Triton tests (``tests/kernels/cuda/``) and the plans' tests."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from optim_db import OptimizerInfo

import adamkit
from adamkit.optim._plan import storage_order

# sizes 0, 1, ragged SIMD tails, > one chunk (32768), and many small tensors
SIZES = [0, 1, 255, 256, 4097, 70_001] + [
    int(n) for n in torch.randint(1, 64, (60,), generator=torch.Generator().manual_seed(0))
]
TOL = {torch.float64: dict(atol=1e-12, rtol=1e-12), torch.float32: dict(atol=1e-6, rtol=1e-5)}
STEPS = 8


def sized_params(dtype, sizes=SIZES):
    """Seeded 1-D parameters of ``sizes``, of one dtype or of a list of dtypes."""
    gen = torch.Generator().manual_seed(1)
    dtypes = dtype if isinstance(dtype, list) else [dtype] * len(sizes)
    return [torch.randn(n, generator=gen).to(dt).requires_grad_() for n, dt in zip(sizes, dtypes)]


def step_grads(params, step, dtype):
    """Step ``step``'s seeded gradients, scales 1e-3 to 10, some missing (lagging steps)."""
    gen = torch.Generator().manual_seed(100 + step)
    out = []
    for i, p in enumerate(params):
        frozen = i % 7 == 3 and step % 3 == 1  # some parameters skip steps: their step lags
        scale = 10.0 ** ((i % 5) - 3)
        out.append(None if frozen else (torch.randn(p.shape, generator=gen) * scale).to(p.dtype))
    return out


def sync(dst_opt, dst_params, src_opt, src_params):
    """Copy the source's parameters and state into the destination's."""
    with torch.no_grad():
        for d, s in zip(dst_params, src_params):
            d.copy_(s)
            for key, value in src_opt.state[s].items():
                dst_opt.state[d][key].copy_(value)


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place between two bf16/fp16 tensors (NaN-free)."""

    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)

    return (ordered(a) - ordered(b)).abs()


def assert_close_any(actual: torch.Tensor, expected: torch.Tensor, msg: str) -> None:
    """Half types within 1 ulp; float32 within its tolerance (complex: as pairs of reals)."""
    assert actual.dtype == expected.dtype, msg
    if actual.is_complex():
        actual, expected = torch.view_as_real(actual), torch.view_as_real(expected)
    if actual.dtype in (torch.bfloat16, torch.float16):
        worst = int(ulps(actual, expected).max()) if actual.numel() else 0
        assert worst <= 1, f"{msg}: {worst} ulps apart"
    else:
        torch.testing.assert_close(actual, expected, **TOL[actual.dtype], msg=msg)


def lockstep(info, kw, dtypes, steps=STEPS, sizes=SIZES, grads=step_grads, backend="numba"):
    """Run a fused backend and the reference side by side, comparing and re-syncing every step."""
    fused_params = sized_params(dtypes, sizes)
    ref_params = [p.detach().clone().requires_grad_() for p in fused_params]
    fused = info.cls(fused_params, **copy.deepcopy(kw), backend=backend)
    ref = info.cls(ref_params, **copy.deepcopy(kw), backend="reference")
    for step in range(steps):
        for p, q, g in zip(fused_params, ref_params, grads(fused_params, step, None)):
            p.grad = None if g is None else g.clone()
            q.grad = None if g is None else g.clone()
        fused.step()
        ref.step()
        compare_and_resync(fused, fused_params, ref, ref_params, step)
    return fused, fused_params


def compare_and_resync(fused, fused_params, ref, ref_params, step):
    """Parameters and every state tensor within tolerance, then the reference's copied back."""
    for i, (p, q) in enumerate(zip(fused_params, ref_params)):
        assert_close_any(p.detach(), q.detach(), f"step {step} param {i} ({p.dtype})")
        for key, value in ref.state[q].items():
            assert_close_any(fused.state[p][key], value, f"step {step} param {i} {key}")
    sync(fused, fused_params, ref, ref_params)


def grads_with_nonfinite(params, step, dtype):
    """step_grads with NaN/±inf at both ends, at block (128) and chunk (32768) boundaries
    and at a place that moves every step."""
    out = step_grads(params, step, dtype)
    bad = [float("nan"), float("inf"), -float("inf")]
    for i, g in enumerate(out):
        if g is None or g.numel() == 0:
            continue
        n = g.numel()
        spots = sorted({0, n - 1, (step * 131 + i) % n, 127 % n, 128 % n, 4096 % n, 32_767 % n, 40_000 % n})
        for k, j in enumerate(spots):
            g[j] = bad[(k + step) % 3]
    return out


MASK_LAYOUTS = {  # (param dtype, state_bits, stochastic rounding)
    "fp32": (torch.float32, 32, False),
    "fp32-state16": (torch.float32, 16, False),
    "bf16": (torch.bfloat16, 32, False),
    "bf16-sr": (torch.bfloat16, 16, True),
    "fp16-state16": (torch.float16, 16, False),
    "fp64": (torch.float64, 32, False),
}


def masking_lockstep(info: OptimizerInfo, kw: dict, layout: str, backend: str, sizes: list[int], steps: int) -> None:
    """A fused backend and the reference in lockstep on gradients with NaN/±inf in many
    places (:func:`grads_with_nonfinite`); equal results and counts."""
    dtype, state_bits, sr = MASK_LAYOUTS[layout]
    fused_params = sized_params(dtype, sizes)
    ref_params = [p.detach().clone().requires_grad_() for p in fused_params]
    kw = {**copy.deepcopy(kw), "state_bits": state_bits, "stochastic_rounding": sr}
    fused = info.cls(fused_params, **kw, backend=backend)
    ref = info.cls(ref_params, **copy.deepcopy(kw), backend="reference")
    expected = 0
    for step in range(steps):
        grads = grads_with_nonfinite(fused_params, step, None)
        expected += sum(int((~torch.isfinite(g)).sum()) for g in grads if g is not None)
        for p, q, g in zip(fused_params, ref_params, grads):
            p.grad = None if g is None else g.clone()
            q.grad = None if g is None else g.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            torch.manual_seed(step)
            fused.step()
            torch.manual_seed(step)
            ref.step()
        compare_and_resync(fused, fused_params, ref, ref_params, step)
    assert expected > 0
    assert fused.nonfinite_count == ref.nonfinite_count == expected


def sr_lockstep(info: OptimizerInfo, kw: dict, backend: str, sizes: list[int], steps: int, exact: bool) -> None:
    """bf16 parameters rounded stochastically by a fused backend and the reference in
    lockstep: equal (``exact``) or within one ulp."""
    fused_params = sized_params(torch.bfloat16, sizes)
    ref_params = [p.detach().clone().requires_grad_() for p in fused_params]
    fused = info.cls(fused_params, **copy.deepcopy(kw), backend=backend, stochastic_rounding=True)
    ref = info.cls(ref_params, **copy.deepcopy(kw), backend="reference", stochastic_rounding=True)
    for step in range(steps):
        for p, q, g in zip(fused_params, ref_params, step_grads(fused_params, step, None)):
            p.grad = None if g is None else g.clone()
            q.grad = None if g is None else g.clone()
        torch.manual_seed(step)
        fused.step()
        torch.manual_seed(step)
        ref.step()
        for i, (p, q) in enumerate(zip(fused_params, ref_params)):
            if exact:
                assert torch.equal(p.detach(), q.detach()), f"step {step} param {i}"
            else:
                assert_close_any(p.detach(), q.detach(), f"step {step} param {i}")
        sync(fused, fused_params, ref, ref_params)


def adamw_twins(n=5, size=300, backend="numba", **kw):
    """``n`` parameters and their copies, with AdamW on ``backend`` and on the reference."""
    fused_params = [torch.randn(size).requires_grad_() for _ in range(n)]
    ref_params = [p.detach().clone().requires_grad_() for p in fused_params]
    return (
        fused_params,
        ref_params,
        adamkit.AdamW(fused_params, backend=backend, **kw),
        adamkit.AdamW(ref_params, backend="reference", **kw),
    )


def step_twins(fp, rp, fo, ro, seed):
    """One step of :func:`adamw_twins` with the same seeded gradients, then compared."""
    gen = torch.Generator().manual_seed(seed)
    for p, q in zip(fp, rp):
        g = torch.randn(p.shape, generator=gen)
        p.grad, q.grad = g.clone(), g.clone()
    fo.step()
    ro.step()
    for p, q in zip(fp, rp):
        torch.testing.assert_close(p.detach(), q.detach(), **TOL[torch.float32])
        for key in ro.state[q]:
            torch.testing.assert_close(fo.state[p][key], ro.state[q][key], **TOL[torch.float32])


#: what a user may change between steps under a cached plan
PLAN_EVENTS = ["replace_state_tensor", "replace_state_dict", "delete_state", "param_data", "noncontiguous_grad",
               "new_param"]  # fmt: skip


def plan_follows_changes(event: str, backend: str) -> None:
    """Whatever the user changes between steps (one of :data:`PLAN_EVENTS`), the next
    step of ``backend``'s cached plan sees it (no stale tables): in lockstep with the
    reference before and after."""
    fp, rp, fo, ro = adamw_twins(backend=backend)
    for seed in range(3):
        step_twins(fp, rp, fo, ro, seed)
    assert 0 in fo._plans
    for opt, params in ((fo, fp), (ro, rp)):
        p = params[1]
        if event == "replace_state_tensor":
            opt.state[p]["exp_avg"] = torch.full_like(p, 0.5)
        elif event == "replace_state_dict":
            opt.state[p] = {k: v.clone() * 2 for k, v in opt.state[p].items()}
        elif event == "delete_state":
            del opt.state[p]
        elif event == "param_data":
            with torch.no_grad():
                p.data = torch.randn(p.shape)
        elif event == "new_param":
            opt.param_groups[0]["params"].append(torch.randn(7).requires_grad_())
    if event == "param_data":
        for p, q in zip(fp, rp):
            q.data = p.detach().clone()
    if event == "new_param":
        fp.append(fo.param_groups[0]["params"][-1])
        rp.append(ro.param_groups[0]["params"][-1])
        with torch.no_grad():
            rp[-1].copy_(fp[-1])
    for seed in range(3, 6):
        if event == "noncontiguous_grad" and seed == 3:
            for p, q in zip(fp, rp):
                g = torch.randn(2 * p.numel())[::2]
                p.grad, q.grad = g.clone(), g.clone()
            fo.step()
            ro.step()
            continue
        step_twins(fp, rp, fo, ro, seed)


#: a convolution net's parameters: 4-D weights (1x1 kernels and a size-1 dimension
#: among them) and contiguous matrices and biases, in one group
CONV_SHAPES = [(8, 4, 3, 3), (16, 8, 1, 1), (6, 1, 5, 5), (5, 3, 2, 7), (10, 12), (10,), (1, 3, 3, 3)]


def layout(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t``, channels_last if it is 4-D."""
    return t.clone(memory_format=torch.channels_last) if t.dim() == 4 else t.clone()


def channels_last_lockstep(info: OptimizerInfo, kw: dict, backend: str, dtype: torch.dtype = torch.float32) -> None:
    """4-D weights in ``channels_last`` (gradients laid out alike, as autograd makes
    them) stepped by ``backend`` beside contiguous twins on the reference, in lockstep:
    on the group's plan, on the general path (a gradient missing), with a gradient
    laid out otherwise than its parameter, and after a parameter's data is replaced
    by a contiguous tensor. The fused kernel takes the channels_last weights (not the
    reference), and their state is laid out as they are, as torch's is."""
    gen = torch.Generator().manual_seed(5)
    base = [torch.randn(s, generator=gen, dtype=dtype) for s in CONV_SHAPES]
    params = [layout(b).requires_grad_() for b in base]
    twins = [b.clone().requires_grad_() for b in base]
    assert not params[0].is_contiguous() and params[0].grad is None
    fused = info.cls(params, **copy.deepcopy(kw), backend=backend)
    ref = info.cls(twins, **copy.deepcopy(kw), backend="reference")
    group = fused.param_groups[0]
    expected = "numba" if backend == "auto" else backend
    general = []  # steps that took the general path
    real = fused._buckets  # buckets made now: the cached plan did not fit
    fused._buckets = lambda *a, **k: general.append(1) or real(*a, **k)
    for step in range(7):
        grads = [torch.randn(s, generator=gen, dtype=dtype) for s in CONV_SHAPES]
        for k, (p, q, g) in enumerate(zip(params, twins, grads)):
            p.grad, q.grad = layout(g), g.clone()
            if step == 2 and k == 1:
                p.grad = q.grad = None  # the general path
        if step == 3:  # a gradient laid out unlike its channels_last parameter
            params[0].grad = grads[0].clone()
            if backend != "auto":  # a forced fused kernel cannot take it: it says so, and nothing changes
                before = [p.detach().clone() for p in params]
                with pytest.raises(adamkit.KernelUnavailableError, match="laid out alike"):
                    fused.step()
                assert all(torch.equal(p, b) for p, b in zip(params, before))
                params[0].grad = layout(grads[0])
        if step == 5:
            with torch.no_grad():
                params[2].data = params[2].detach().contiguous()  # the layout changes under the plan
        general.clear()
        fused.step()
        ref.step()
        compare_and_resync(fused, params, ref, twins, step)
        if step in (1, 6):  # the plan's steps: the fused kernel, state laid out as its weight
            assert 0 in fused._plans and not general
            for p in params:
                st = fused.state[p]
                assert storage_order(st["exp_avg"]) == storage_order(p)  # strides, size-1 dimensions aside
                chosen = fused._kernel(group, p.device.type, fused._layout(p, p.grad, st, group))
                assert chosen.backend == expected, (p.shape, p.stride())
