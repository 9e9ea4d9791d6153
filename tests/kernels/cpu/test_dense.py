"""The Numba kernels of 32- and 16-bit state (``adamkit/kernels/cpu/dense.py``) against
the reference, in lockstep (``tests/lockstep.py``).

Both optimizers take the same gradients; after every step the kernel's parameters
and state are compared with the reference's and then overwritten with them, so a
discrepancy cannot hide in accumulated drift and every step tests the rule afresh.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from lockstep import (
    MASK_LAYOUTS,
    SIZES,
    TOL,
    lockstep,
    masking_lockstep,
    sized_params,
    sr_lockstep,
    step_grads,
)
from optim_db import ALL_CONFIG_IDS, ALL_CONFIGS, OptimizerInfo, sweep

import adamkit
from adamkit.spec import MOMENTS


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("info,kw", sweep())
def test_numba_matches_reference_in_lockstep(info: OptimizerInfo, kw: dict, dtype: torch.dtype) -> None:
    lockstep(info, kw, dtype)


@pytest.mark.parametrize("mode", ["mask", "propagate"])
@pytest.mark.parametrize("info,kw", [c for c in ALL_CONFIGS if c[1].get("amsgrad") or c[0].name == "Adamax"][:3])
def test_numba_nonfinite_matches_reference(info: OptimizerInfo, kw: dict, mode: str) -> None:
    dtype = torch.float32
    fused_params = sized_params(dtype)
    ref_params = [p.detach().clone().requires_grad_() for p in fused_params]
    fused = info.cls(fused_params, **copy.deepcopy(kw), backend="numba", nonfinite=mode)
    ref = info.cls(ref_params, **copy.deepcopy(kw), backend="reference", nonfinite=mode)
    for step in range(4):
        grads = step_grads(fused_params, step, dtype)
        grads[4][[0, 17, 4096]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        grads[5][40_000] = float("nan")  # in the second chunk
        for p, q, g in zip(fused_params, ref_params, grads):
            p.grad = None if g is None else g.clone()
            q.grad = None if g is None else g.clone()
        with pytest.warns(RuntimeWarning) if (mode == "mask" and step == 0) else _nothing():
            fused.step()
            ref.step()
        for p, q in zip(fused_params, ref_params):
            torch.testing.assert_close(p.detach(), q.detach(), **TOL[dtype], equal_nan=True)
    assert fused.nonfinite_count == ref.nonfinite_count == (16 if mode == "mask" else 0)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


HALF_CONFIGS = [c for c in ALL_CONFIGS if not c[1].get("maximize")][::2]
HALF_IDS = [f"{i.name}-{n}" for n, (i, _) in enumerate(HALF_CONFIGS)]


@pytest.mark.parametrize("state_bits", [32, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("info,kw", sweep(HALF_CONFIGS, HALF_IDS))
def test_half_params_match_reference(info: OptimizerInfo, kw: dict, dtype: torch.dtype, state_bits: int) -> None:
    """bf16/fp16 parameters: math in fp32, stores rounded to nearest even, within 1 ulp."""
    fused, params = lockstep(info, {**kw, "state_bits": state_bits}, dtype)
    want = torch.float32 if state_bits == 32 else torch.bfloat16
    moments = [t for p in params if p in fused.state for k, t in fused.state[p].items() if k in MOMENTS]
    assert moments and all(t.dtype == want for t in moments)


@pytest.mark.parametrize("info,kw", sweep(ALL_CONFIGS[::3], ALL_CONFIG_IDS[::3]))
def test_state_bits_16_with_fp32_params(info: OptimizerInfo, kw: dict) -> None:
    lockstep(info, {**kw, "state_bits": 16}, torch.float32)


@pytest.mark.parametrize("info,kw", sweep(ALL_CONFIGS[::4], ALL_CONFIG_IDS[::4]))
def test_mixed_dtypes_in_one_group(info: OptimizerInfo, kw: dict) -> None:
    """fp32, bf16, fp16 and fp64 parameters in one group: one call per dtype, all right."""
    cycle = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
    fused, params = lockstep(info, kw, [cycle[i % 4] for i in range(len(SIZES))])
    plan = fused._plans[0]
    assert len(plan.segments) == 4


def test_bf16_nonfinite_masking_leaves_elements_unchanged() -> None:
    p = torch.randn(1000).to(torch.bfloat16).requires_grad_()
    opt = adamkit.AdamW([p], lr=0.1, backend="numba")
    before = p.detach().clone()
    p.grad = torch.randn(1000).to(torch.bfloat16)
    p.grad[[3, 500]] = torch.tensor([float("nan"), float("inf")], dtype=torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="2 non-finite"):
        opt.step()
    assert torch.equal(p.detach()[[3, 500]], before[[3, 500]])
    assert not torch.equal(p.detach()[:3], before[:3])
    assert opt.state[p]["exp_avg"][[3, 500]].eq(0).all()


@pytest.mark.parametrize("layout", MASK_LAYOUTS)
@pytest.mark.parametrize("info,kw", sweep(ALL_CONFIGS[::3], ALL_CONFIG_IDS[::3]))
def test_masking_matches_reference(info: OptimizerInfo, kw: dict, layout: str) -> None:
    """Blocks with a non-finite gradient take the kernels' rare path (element by element
    from the first such block of a chunk on); the result is the reference's, the count
    the number of NaN/±inf elements."""
    masking_lockstep(info, kw, layout, "numba", SIZES, steps=4)


# ---------------------------------------------------------------- stochastic rounding
@pytest.mark.parametrize("info,kw", ALL_CONFIGS[::5], ids=ALL_CONFIG_IDS[::5])
def test_stochastic_rounding_matches_reference_bit_for_bit(info: OptimizerInfo, kw: dict) -> None:
    """The kernel draws the reference's random bits (one counter-based stream per tensor):
    within one ulp (the rounded fp32 values themselves may differ in their last bit)."""
    sr_lockstep(info, kw, "numba", SIZES, steps=4, exact=False)


@pytest.mark.parametrize("backend", ["numba", "reference"])
def test_stochastic_rounding_is_unbiased_and_reproducible(backend: str) -> None:
    """Updates far below half a bf16 ulp vanish when rounding to nearest; rounded
    stochastically their mean over many elements matches the exact fp32 result."""
    n, value = 200_000, 1.0  # bf16 ulp at 1.0 is 2^-7 = 0.0078
    results = {}
    for sr in (False, True):
        p = torch.full((n,), value, dtype=torch.bfloat16, requires_grad=True)
        p.grad = torch.ones(n, dtype=torch.bfloat16)
        opt = adamkit.Adam([p], lr=1e-3, backend=backend, stochastic_rounding=sr)  # step 1: exactly -lr
        torch.manual_seed(0)
        opt.step()
        results[sr] = p.detach().clone()
    exact = value - 1e-3
    assert torch.equal(results[False], torch.full((n,), value, dtype=torch.bfloat16))  # lost entirely
    ulp = 2.0**-8  # just below 1.0 the bf16 spacing halves
    sigma = ulp * (0.25 / n) ** 0.5
    mean = results[True].double().mean().item()
    assert abs(mean - exact) < 6 * sigma, (mean, exact, sigma)
    assert set(results[True].unique().tolist()) == {1.0, 1.0 - ulp}
    # reproducible under torch.manual_seed, different under another seed
    again = []
    for seed in (0, 0, 1):
        p = torch.full((n,), value, dtype=torch.bfloat16, requires_grad=True)
        p.grad = torch.ones(n, dtype=torch.bfloat16)
        opt = adamkit.Adam([p], lr=1e-3, backend=backend, stochastic_rounding=True)
        torch.manual_seed(seed)
        opt.step()
        again.append(p.detach().clone())
    assert torch.equal(again[0], results[True]) and torch.equal(again[1], again[0])
    assert not torch.equal(again[2], again[0])


@pytest.mark.parametrize("hardware", [True, False], ids=["cpu-instruction", "integer-path"])
def test_bf16_state_conversion_is_round_to_nearest_even_with_subnormals_flushed(hardware: bool, monkeypatch) -> None:
    """Both ways the kernels store bf16 state (VCVTNEPS2BF16 where the CPU has it, integer
    rounding elsewhere) against torch's conversion after the reference's flush: ties,
    NaNs with any payload, infinities, subnormals, the largest finite values."""
    from numba import njit

    from adamkit.kernels import reference
    from adamkit.kernels.cpu import dense as numba_cpu

    if hardware and not numba_cpu.HW_BF16:
        pytest.skip("this CPU has no AVX512-BF16")
    monkeypatch.setattr(numba_cpu, "HW_BF16", hardware)

    @njit  # compiled here, not cached: the intrinsic picks its path at compile time
    def convert(a, out):
        for i in range(a.size):
            out[i] = numba_cpu._f32_to_bf16_ftz(a[i])

    gen = torch.Generator().manual_seed(0)
    scale = torch.pow(10.0, torch.randint(-45, 39, (100_000,), generator=gen).double()).float()
    special = torch.tensor(
        [0x7F800001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 1, 0x007FFFFF, 0x00800000, 0x80000001, 0x3F808000,
         0x3F818000, 0x7F7FFFFF, 0xFF7F8000, 0x7F800000, 0xFF800000, 0, 0x80000000],
        dtype=torch.int64,
    ).to(torch.int32).view(torch.float32)  # fmt: skip
    values = torch.cat([torch.randn(100_000, generator=gen) * scale, special])
    out = np.empty(values.numel(), dtype=np.uint16)
    convert(values.numpy(), out)
    flushed = values.clone()
    reference.flush_subnormals_([flushed])
    want = flushed.to(torch.bfloat16)
    got = torch.from_numpy(out.view(np.int16)).view(torch.bfloat16)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))  # ±0 included
    assert (got[values.abs() < 2.0**-126] == 0).all()


def test_bf16_state_flushes_subnormal_moments_as_the_reference_does() -> None:
    """A first moment of ~1e-38 (below float32's smallest normal) is stored as zero by
    the kernel and by the reference alike; normal ones are kept."""
    results = {}
    for backend in ("numba", "reference"):
        p = torch.ones(5000, requires_grad=True)
        p.grad = torch.cat([torch.full((2500,), 1e-37), torch.full((2500,), 1e-30)])
        opt = adamkit.AdamW([p], state_bits=16, backend=backend)
        opt.step()
        results[backend] = {k: v.clone() for k, v in opt.state[p].items()}
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(results["numba"][key].view(torch.int16), results["reference"][key].view(torch.int16))
    m = results["numba"]["exp_avg"]
    assert (m[:2500] == 0).all() and (m[2500:] > 0).all()
