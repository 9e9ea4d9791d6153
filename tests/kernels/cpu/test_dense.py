"""Every fused kernel against the reference, in lockstep.

Both optimizers take the same gradients; after every step the kernel's parameters
and state are compared with the reference's and then overwritten with them, so a
discrepancy cannot hide in accumulated drift and every step tests the rule afresh.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import ROOT
from lockstep import (
    CONV_SHAPES,
    MASK_LAYOUTS,
    PLAN_EVENTS,
    SIZES,
    TOL,
    adamw_twins,
    channels_last_lockstep,
    layout,
    lockstep,
    masking_lockstep,
    plan_follows_changes,
    sized_params,
    sr_lockstep,
    step_grads,
    step_twins,
)
from optim_db import ALL_CONFIG_IDS, ALL_CONFIGS, OptimizerInfo

import adamkit
from adamkit.spec import MOMENTS


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("info,kw", ALL_CONFIGS, ids=ALL_CONFIG_IDS)
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


@pytest.mark.parametrize("state_bits", [32, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("info,kw", HALF_CONFIGS, ids=[f"{i.name}-{n}" for n, (i, _) in enumerate(HALF_CONFIGS)])
def test_half_params_match_reference(info: OptimizerInfo, kw: dict, dtype: torch.dtype, state_bits: int) -> None:
    """bf16/fp16 parameters: math in fp32, stores rounded to nearest even, within 1 ulp."""
    fused, params = lockstep(info, {**kw, "state_bits": state_bits}, dtype)
    want = torch.float32 if state_bits == 32 else torch.bfloat16
    moments = [t for p in params if p in fused.state for k, t in fused.state[p].items() if k in MOMENTS]
    assert moments and all(t.dtype == want for t in moments)


@pytest.mark.parametrize("info,kw", ALL_CONFIGS[::3], ids=ALL_CONFIG_IDS[::3])
def test_state_bits_16_with_fp32_params(info: OptimizerInfo, kw: dict) -> None:
    lockstep(info, {**kw, "state_bits": 16}, torch.float32)


@pytest.mark.parametrize("info,kw", ALL_CONFIGS[::4], ids=ALL_CONFIG_IDS[::4])
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
@pytest.mark.parametrize("info,kw", ALL_CONFIGS[::3], ids=ALL_CONFIG_IDS[::3])
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


@pytest.mark.parametrize("event", PLAN_EVENTS)
def test_cached_plan_follows_changes(event: str) -> None:
    """Whatever the user changes between steps, the next step sees it (no stale tables)."""
    plan_follows_changes(event, "numba")


@pytest.mark.parametrize("backend", ["numba", "auto"])
@pytest.mark.parametrize("info,kw", ALL_CONFIGS[::5], ids=ALL_CONFIG_IDS[::5])
def test_channels_last_weights_take_the_fused_kernel(info: OptimizerInfo, kw: dict, backend: str) -> None:
    channels_last_lockstep(info, kw, backend)


def test_channels_last_checkpoints_interoperate_with_torch() -> None:
    """torch's AdamW on channels_last weights keeps channels_last state; adamkit loads
    it, steps it on the fused kernel and agrees with torch in float64, and its
    state_dict loads back into torch."""
    gen = torch.Generator().manual_seed(9)
    base = [torch.randn(s, generator=gen, dtype=torch.float64) for s in CONV_SHAPES]
    ps = [[layout(b).requires_grad_() for b in base] for _ in range(2)]
    theirs, ours = torch.optim.AdamW(ps[0], weight_decay=0.1), adamkit.AdamW(ps[1], weight_decay=0.1)
    for step in range(6):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in CONV_SHAPES]
        for p, q, g in zip(*ps, grads):
            p.grad, q.grad = layout(g), layout(g)
        theirs.step()
        if step == 2:  # torch's checkpoint, taken mid-run
            assert theirs.state[ps[0][0]]["exp_avg"].stride() == ps[0][0].stride()
            ours.load_state_dict(theirs.state_dict())
            with torch.no_grad():
                for p, q in zip(*ps):
                    q.copy_(p)
        elif step > 2:
            ours.step()
            for p, q in zip(*ps):
                torch.testing.assert_close(q, p, **TOL[torch.float64])
    assert 0 in ours._plans
    back = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in ps[1]], weight_decay=0.1)
    back.load_state_dict(ours.state_dict())
    first = back.state[back.param_groups[0]["params"][0]]["exp_avg"]
    torch.testing.assert_close(first, ours.state[ps[1][0]]["exp_avg"], atol=0, rtol=0)


def test_plan_state_checkpoints_round_trip_into_torch() -> None:
    """State held in flat buffers saves as torch's layout and loads into torch.optim.AdamW."""
    from helpers import round_trip

    fp, rp, fo, ro = adamw_twins()
    for seed in range(3):
        step_twins(fp, rp, fo, ro, seed)
    sd = round_trip(fo.state_dict())
    twin = [p.detach().clone().requires_grad_() for p in fp]
    torch_opt = torch.optim.AdamW(twin)
    torch_opt.load_state_dict(sd)
    for p, q in zip(fp, twin):
        g = torch.randn(p.shape)
        p.grad, q.grad = g.clone(), g.clone()
    fo.step()
    torch_opt.step()
    for p, q in zip(fp, twin):
        torch.testing.assert_close(p.detach(), q.detach(), **TOL[torch.float32])


def test_steps_lag_per_tensor_in_one_call() -> None:
    """Frozen parameters keep their own step count (bias correction) inside one call."""
    fp, rp, fo, ro = adamw_twins()
    for seed in range(4):
        for p, q in zip(fp[1:], rp[1:]):
            p.grad = q.grad = None
        step_twins(fp, rp, fo, ro, seed) if seed % 2 else None
        if seed % 2 == 0:
            gen = torch.Generator().manual_seed(seed)
            for p, q in zip(fp[:1], rp[:1]):
                g = torch.randn(p.shape, generator=gen)
                p.grad, q.grad = g.clone(), g.clone()
            fo.step()
            ro.step()
    assert [float(fo.state[p]["step"]) for p in fp] == [4.0, 2.0, 2.0, 2.0, 2.0]
    assert [float(fo.state[p]["step"]) for p in fp] == [float(ro.state[p]["step"]) for p in rp]


def test_gradients_kept_across_steps_take_the_cached_path() -> None:
    """zero_grad(set_to_none=False)-style training: the same gradient tensors every step,
    refilled in place; then one is replaced by a non-contiguous tensor and one by None."""
    fp, rp, fo, ro = adamw_twins()
    for p, q in zip(fp, rp):
        p.grad, q.grad = torch.zeros_like(p), torch.zeros_like(q)
    for seed in range(6):
        gen = torch.Generator().manual_seed(seed)
        for p, q in zip(fp, rp):
            g = torch.randn(p.shape, generator=gen)
            p.grad.copy_(g)
            q.grad.copy_(g)
        if seed == 4:
            g = torch.randn(2 * fp[2].numel())[::2]
            fp[2].grad, rp[2].grad = g.clone(), g.clone()
        if seed == 5:
            fp[3].grad = rp[3].grad = None
        fo.step()
        ro.step()
        for p, q in zip(fp, rp):
            torch.testing.assert_close(p.detach(), q.detach(), **TOL[torch.float32])
    assert 0 in fo._plans


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


_CARRIER = {"f32": np.float32, "bf16": np.uint16, "f16": np.int16}


def _carried(values: torch.Tensor, kind: str) -> np.ndarray:
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[kind]
    x = values.to(dtype)
    return (x if kind == "f32" else x.view(torch.int16)).numpy().view(_CARRIER[kind]).copy()


@pytest.mark.parametrize("pkind,skind", [("f32", "f32"), ("f32", "bf16"), ("f32", "f16"), ("bf16", "f32"),
                                         ("bf16", "bf16"), ("f16", "f16")])  # fmt: skip
def test_avx2_stream_is_bit_identical_to_the_numba_loop(pkind: str, skind: str) -> None:
    """The explicit AVX2 loop of Adam/AdamW's 32/16-bit state (``_avx2_adam.adam_stream``)
    against the numba loop it replaces on AVX2 CPUs, bit for bit: both lerp forms,
    maximize and L2, values from 1e-45 to 1e38 (bf16 state flushes subnormals), NaN,
    ±inf and negative second moments (what ``mask_nonfinite=False`` lets through)."""
    from numba import njit

    from adamkit.kernels.cpu import dense as numba_cpu
    from adamkit.kernels.cpu._avx2_adam import adam_stream

    if not numba_cpu.STREAM:
        pytest.skip("the AVX2 loop runs only where AVX2 is the SIMD in use")

    @njit(error_model="numpy")
    def both(p, g, m, v, p2, m2, v2, k):
        low, c1, b2, b2w, eps, decay, l2, gsign, lr_t, inv = k
        done = adam_stream(p.ctypes.data, g.ctypes.data, m.ctypes.data, v.ctypes.data, p.size // 8, low, c1, b2, b2w,
                           eps, decay, l2, gsign, lr_t, inv, p, m)  # fmt: skip
        sc = (low, c1, c1, b2, b2w, eps, lr_t, inv, decay, l2, gsign, False, lr_t * 0)
        numba_cpu._adam_loop(p2, g, m2, v2, v2, 0, sc, numba_cpu._U(0), False, False)
        return done

    gen = torch.Generator().manual_seed(0)
    n = 8 * 600

    def values(low: int, high: int) -> torch.Tensor:
        scale = torch.pow(10.0, torch.randint(low, high, (n,), generator=gen).double()).float()
        x = torch.randn(n, generator=gen) * scale
        x[torch.randint(0, n, (20,), generator=gen)] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])[
            torch.randint(0, 4, (20,), generator=gen)
        ]  # fmt: skip
        return x

    f32 = np.float32
    for low, c1, l2, gsign in ((True, 0.1, 0.0, 1.0), (False, -0.4, 0.01, -1.0)):
        k = (low, f32(c1), f32(0.999), f32(0.001), f32(1e-8), f32(0.99), f32(l2), f32(gsign), f32(1e-3), f32(31.6))
        p, g = _carried(values(-3, 3), pkind), _carried(values(-45, 38), pkind)
        m, v = _carried(values(-45, 38), skind), _carried(values(-45, 38).abs(), skind)
        v[:40] = _carried(-values(-3, 3)[:40].abs(), skind)
        p0, p2, m2, v2 = p.copy(), p.copy(), m.copy(), v.copy()
        assert both(p, g, m, v, p2, m2, v2, k) == n // 8
        for a, b in ((p, p2), (m, m2), (v, v2)):
            assert np.array_equal(a.view(np.uint8), b.view(np.uint8))
        assert (p.view(np.uint8) != p0.view(np.uint8)).mean() > 0.5  # the parameters did move


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


_CACHE_PROBE = """
import torch, adamkit
from adamkit.kernels.cpu import _cache
from adamkit.kernels.cpu import dense as numba_cpu
assert _cache.INSTALLED
p = torch.randn(5000)
p.grad = torch.randn(5000)
adamkit.Adam([p]).step()
stats = [d.stats for d in numba_cpu._KERNELS.values()]
print(sum(sum(s.cache_hits.values()) for s in stats), sum(sum(s.cache_misses.values()) for s in stats))
"""


@pytest.mark.heavy
def test_numba_cache_follows_every_kernel_source(tmp_path, monkeypatch) -> None:
    """Numba's on-disk cache of adamkit's kernels is keyed on all their sources and the
    SIMD setting (``adamkit.kernels.cpu._cache``), not only on the defining file: a second
    process loads the compiled kernel; one with another ``ADAMKIT_SIMD`` recompiles
    instead of running the other setting's machine code; and a change to a source the
    kernel file does not define changes the key."""
    import os
    import subprocess
    import sys

    from adamkit.kernels.cpu import _cache

    def run(simd: str) -> tuple[int, int]:
        env = {**os.environ, "ADAMKIT_SIMD": simd, "NUMBA_CACHE_DIR": str(tmp_path)}
        done = subprocess.run([sys.executable, "-c", _CACHE_PROBE], env=env, capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        hits, misses = map(int, done.stdout.split())
        return hits, misses

    assert run("auto") == (0, 1)  # compiled and saved
    assert run("auto") == (1, 0)  # loaded
    assert run("none") == (0, 1)  # another setting: compiled again, not loaded
    assert run("none") == (1, 0)
    # the key changes with a file the kernels do not live in (here the SIMD code), on a
    # copy of the sources
    import shutil

    copy = tmp_path / "adamkit"
    shutil.copytree(_cache._PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(_cache, "_PACKAGE", copy)
    try:
        _cache.digest.cache_clear()
        before = _cache.digest()
        for changed in ("kernels/cpu/_avx2_quant.py", "spec.py", "_scalars.py"):  # SIMD code, spec, RuleConsts
            source = copy / changed
            source.write_text(source.read_text() + "\n# changed\n")
            _cache.digest.cache_clear()
            assert _cache.digest() != before, changed
            before = _cache.digest()
    finally:
        monkeypatch.undo()
        _cache.digest.cache_clear()


# ------------------------------------------------------------- other instruction sets
_AVX512_BUILD = """
import sys

import llvmlite.binding as ll

bf16 = sys.argv[1] == "1"
dtypes = sys.argv[2].split(",")
host = ll.get_host_cpu_features


def features():  # what adamkit reads to choose its SIMD code: an AVX-512 CPU's
    f = host()
    for name in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl"):
        f[name] = True
    f["avx512bf16"] = bf16
    return f


ll.get_host_cpu_features = features

import numba
import torch

from adamkit._scalars import adam_scalars
from adamkit.kernels.cpu import _simd
from adamkit.kernels.cpu import dense as numba_cpu
from adamkit.kernels.cpu import quantized as numba_quant
from adamkit.quant import QuantFormat

assert _simd.ISA == "avx512" and numba_cpu.HW_BF16 == bf16, (_simd.ISA, numba_cpu.HW_BF16)
built = []


def build_only(kernel, args, n_units):  # compiled for the target CPU, never run
    kernel.compile(tuple(numba.typeof(a) for a in args))
    built.append((kernel, kernel.signatures[-1]))
    return [0]


numba_cpu.on_threads = build_only
s = adam_scalars(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True, step=2.0)
n = 4096
for dtype in (getattr(torch, d) for d in dtypes):
    p, g = torch.zeros(n, dtype=dtype), torch.zeros(n, dtype=dtype)
    state = {k: [torch.zeros(n, dtype=dtype)] for k in ("exp_avg", "exp_avg_sq")}
    numba_cpu.adam_([p], [g], state, s, amsgrad=False, maximize=False, mask_nonfinite=True)
    for bits in (8, 4):
        fmt = QuantFormat(bits, 256 if bits == 8 else 128)
        state = {}
        for key in ("exp_avg", "exp_avg_sq"):
            state[f"{key}_codes"] = [torch.zeros(fmt.code_bytes(n), dtype=torch.uint8)]
            state[f"{key}_absmax"] = [torch.zeros(fmt.blocks(n))]
        numba_quant.adam_quantized_([p], [g], state, s, fmt=fmt, amsgrad=False, maximize=False, mask_nonfinite=True)
for kernel, sig in built:
    assert "zmm" in kernel.inspect_asm(sig), kernel
print("built", len(built))
"""


@pytest.mark.heavy
@pytest.mark.parametrize(
    "cpu,bf16,dtypes", [("znver4", True, "float32,bfloat16"), ("skylake-avx512", False, "float32")]
)
def test_avx512_kernels_compile_for_an_avx512_cpu(cpu: str, bf16: bool, dtypes: str, tmp_path) -> None:
    """Where the CPU has no AVX-512 its code cannot run, but it must still build: a
    fresh process that reads the features of an AVX-512 CPU (AMD Zen 4's, with
    AVX512-BF16, and Intel's) compiles the fused kernels for it, 32-bit and quantized
    state (fp32 and bf16 parameters on Zen 4), with every AVX-512 intrinsic (the block
    loops, the row encoders and decoders), without running them; their machine code
    uses zmm registers. On an AVX-512 CPU the other tests run this code."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "ADAMKIT_SIMD": "auto", "NUMBA_CPU_NAME": cpu, "NUMBA_CPU_FEATURES": "",
           "NUMBA_CACHE_DIR": str(tmp_path)}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", _AVX512_BUILD, str(int(bf16)), dtypes], env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"built {3 * len(dtypes.split(','))}" in done.stdout


@pytest.mark.heavy
def test_edge_cases_under_every_instruction_set_below_this_cpus() -> None:
    """The non-finite and second-moment edge cases with the numba kernels under the
    SIMD levels below this CPU's (``ADAMKIT_SIMD``: AVX2 on an AVX-512 CPU, and the
    portable loops), each in a fresh process: pytest on a focused subset (AdamW and
    Adam at every state width; the rest of their tests runs at this CPU's level)."""
    import os
    import subprocess
    import sys

    from adamkit.kernels.cpu import _avx2_quant, _simd

    levels = {"avx512": ["avx2", "none"], "avx2": ["none"]}.get(_simd.ISA, [])
    if _simd.ISA == "avx512" and not _avx2_quant.CPU_HAS_AVX2:
        levels = ["none"]
    if not levels:
        pytest.skip("this process runs the portable loops already")
    subset = (  # the code the SIMD level changes: quantized state, and 32/16-bit Adam/AdamW (AVX2's loop)
        "(test_a_gradient_whose_moments_overflow and AdamW-numba and fp32) or (test_propagate_leaves and AdamW-numba)"
        " or (test_an_infinite_parameter and (AdamW-numba or Adam-numba)) or test_dither_encoders_take_any_float"
        " or ((test_kernels_match_reference_on_tiny or test_kernels_mask_nonfinite_like_reference)"
        " and (AdamW-8 or AdamW-4))"
    )
    files = [
        str(ROOT / "tests" / "optim" / "test_nonfinite.py"),
        str(ROOT / "tests" / "kernels" / "cpu" / "test_quantized.py"),
    ]
    for simd in levels:
        env = {**os.environ, "ADAMKIT_SIMD": simd}
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", subset, *files]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, cwd=ROOT)
        assert done.returncode == 0, f"ADAMKIT_SIMD={simd}:\n{done.stdout[-3000:]}"
        assert " passed" in done.stdout and " failed" not in done.stdout, done.stdout[-500:]
