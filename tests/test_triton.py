"""The Triton kernels against the reference.

Without a GPU they run in Triton's interpreter on CPU tensors (``tests/conftest.py``
switches it on), at small sizes: the interpreter executes each program in numpy. The
tests that need CUDA skip without it.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from optim_db import ALL_CONFIG_IDS, ALL_CONFIGS, OptimizerInfo
from test_kernels import (
    MASK_LAYOUTS,
    _assert_close_any,
    _compare_and_resync,
    _grads,
    _grads_with_nonfinite,
    _lockstep,
    _params,
    _sync,
)
from test_quant import QCONFIGS, QIDS
from test_quant import _lockstep as _quant_lockstep

import adamkit
from adamkit._scalars import adam_scalars
from adamkit.kernels import registry

triton_cuda = pytest.importorskip("adamkit.kernels.triton_cuda", reason="triton is not installed")
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# 0, 1, a ragged program (BLOCK = 1024), several programs, and small tensors
SIZES = [0, 1, 255, 256, 4097] + [
    int(n) for n in torch.randint(1, 64, (12,), generator=torch.Generator().manual_seed(0))
]
QSIZES = [0, 1, 255, 4097, 300]  # quantized: empty, sub-block, ragged blocks
STEPS = 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("info,kw", ALL_CONFIGS, ids=ALL_CONFIG_IDS)
def test_triton_matches_reference_in_lockstep(info: OptimizerInfo, kw: dict, dtype: torch.dtype) -> None:
    _lockstep(info, kw, dtype, steps=STEPS, sizes=SIZES, backend="triton")


HALF = [c for c in ALL_CONFIGS if not c[1].get("maximize")][::3]


@pytest.mark.parametrize("state_bits", [32, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("info,kw", HALF, ids=[f"{i.name}-{n}" for n, (i, _) in enumerate(HALF)])
def test_triton_half_params(info: OptimizerInfo, kw: dict, dtype: torch.dtype, state_bits: int) -> None:
    """bf16/fp16 parameters, fp32 or bf16 state: within 1 ulp of the reference."""
    fused, params = _lockstep(info, {**kw, "state_bits": state_bits}, dtype, STEPS, SIZES, backend="triton")
    want = torch.float32 if state_bits == 32 else torch.bfloat16
    assert all(t.dtype == want for p in params if p in fused.state for k, t in fused.state[p].items() if k != "step")


def test_triton_complex_params() -> None:
    info, kw = ALL_CONFIGS[1]
    _lockstep(info, kw, [torch.complex64] * 3, STEPS, [7, 0, 1100], backend="triton")


@pytest.mark.parametrize("layout", MASK_LAYOUTS)
@pytest.mark.parametrize("info,kw", ALL_CONFIGS[::6], ids=ALL_CONFIG_IDS[::6])
def test_triton_masking_matches_reference(info: OptimizerInfo, kw: dict, layout: str) -> None:
    dtype, state_bits, sr = MASK_LAYOUTS[layout]
    fused_params = _params(dtype, SIZES)
    ref_params = [p.detach().clone().requires_grad_() for p in fused_params]
    kw = {**copy.deepcopy(kw), "state_bits": state_bits, "stochastic_rounding": sr}
    fused = info.cls(fused_params, **kw, backend="triton")
    ref = info.cls(ref_params, **copy.deepcopy(kw), backend="reference")
    expected = 0
    for step in range(3):
        grads = _grads_with_nonfinite(fused_params, step, None)
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
        _compare_and_resync(fused, fused_params, ref, ref_params, step)
    assert expected > 0
    assert fused.nonfinite_count == ref.nonfinite_count == expected


@pytest.mark.parametrize("info,kw", ALL_CONFIGS[::7], ids=ALL_CONFIG_IDS[::7])
def test_triton_stochastic_rounding_matches_reference_bit_for_bit(info: OptimizerInfo, kw: dict) -> None:
    """The numba kernels' and the reference's random bits: bf16 parameters equal to the bit."""
    fused_params = _params(torch.bfloat16, SIZES)
    ref_params = [p.detach().clone().requires_grad_() for p in fused_params]
    fused = info.cls(fused_params, **copy.deepcopy(kw), backend="triton", stochastic_rounding=True)
    ref = info.cls(ref_params, **copy.deepcopy(kw), backend="reference", stochastic_rounding=True)
    for step in range(3):
        for p, q, g in zip(fused_params, ref_params, _grads(fused_params, step, None)):
            p.grad = None if g is None else g.clone()
            q.grad = None if g is None else g.clone()
        torch.manual_seed(step)
        fused.step()
        torch.manual_seed(step)
        ref.step()
        for i, (p, q) in enumerate(zip(fused_params, ref_params)):
            assert torch.equal(p.detach(), q.detach()), f"step {step} param {i}"
        _sync(fused, fused_params, ref, ref_params)


# ------------------------------------------------------------------ quantized state
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("cls,kw", QCONFIGS, ids=QIDS)
def test_triton_quantized_matches_reference(cls, kw, bits) -> None:
    """Codes equal the reference's (8 bits: within one on rounding ties), absmax and
    parameters within float32 rounding, after every step."""
    _quant_lockstep(cls, kw, bits, steps=4, sizes=QSIZES, backend="triton")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [8, 4])
def test_triton_quantized_half_params(dtype, bits) -> None:
    _quant_lockstep(adamkit.AdamW, {}, bits, dtype, steps=3, sizes=QSIZES, backend="triton")


@pytest.mark.parametrize("bits,block", [(8, 64), (8, 100), (8, 2048), (4, 2), (4, 66)])
def test_triton_quantized_other_block_sizes(bits, block) -> None:
    """Blocks that are not powers of two fill part of the tile."""
    _quant_lockstep(adamkit.AdamW, {}, bits, steps=3, sizes=QSIZES, backend="triton", block_size=block)


@pytest.mark.parametrize("bits", [8, 4])
def test_triton_quantized_masks_nonfinite_like_reference(bits) -> None:
    with pytest.warns(RuntimeWarning, match="non-finite"):
        params = _quant_lockstep(adamkit.Adam, QCONFIGS[1][1], bits, steps=3, bad=4097, sizes=QSIZES,
                                 backend="triton")  # fmt: skip
    assert all(torch.isfinite(p).all() for p in params)


def test_triton_quantized_stochastic_rounding_matches_reference() -> None:
    _quant_lockstep(adamkit.AdamW, {}, 8, torch.bfloat16, steps=3, sizes=QSIZES, backend="triton",
                    stochastic_rounding=True)  # fmt: skip


# ---------------------------------------------------------------- launches and AMP
def test_many_tensors_take_one_launch(monkeypatch) -> None:
    """500 small tensors of one dtype: one kernel launch (a pointer table), right results."""
    launches = []
    real = triton_cuda._dense_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(triton_cuda, "_dense_kernel", Spy())
    info, kw = ALL_CONFIGS[1]
    sizes = [int(n) for n in torch.randint(1, 40, (500,), generator=torch.Generator().manual_seed(3))]
    _lockstep(info, kw, torch.float32, steps=2, sizes=sizes, backend="triton")
    assert len(launches) == 2  # one per step
    assert launches[0] == (500,)  # every tensor fits one program


@pytest.mark.parametrize("backend", ["triton", "numba", "reference"])
def test_grad_scaler_steps_like_torch(backend: str) -> None:
    """torch.amp.GradScaler hands the scale and found_inf to step(): the step divides the
    gradients by the scale (leaving them unscaled, as torch's fused kernels do) and
    skips when found_inf is set, matching torch.optim.AdamW under the same scaler."""
    torch.manual_seed(0)
    model, twin = torch.nn.Linear(20, 5), torch.nn.Linear(20, 5)
    twin.load_state_dict(model.state_dict())
    opt = adamkit.AdamW(model.parameters(), lr=1e-2, backend=backend)
    ref = torch.optim.AdamW(twin.parameters(), lr=1e-2)
    scalers = [torch.amp.GradScaler("cpu", init_scale=1024.0) for _ in range(2)]
    x = torch.randn(8, 20)
    for step in range(5):
        for m, o, scaler in ((model, opt, scalers[0]), (twin, ref, scalers[1])):
            o.zero_grad()
            loss = m(x).pow(2).sum() * (float("inf") if step == 2 else 1.0)
            scaler.scale(loss).backward()
            scaler.step(o)
            scaler.update()
        if step != 2:  # both left unscaled (torch's by GradScaler, ours by the step)
            torch.testing.assert_close(model.weight.grad, twin.weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.weight, twin.weight, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(model.bias, twin.bias, atol=1e-6, rtol=1e-5)
    assert scalers[0].get_scale() == scalers[1].get_scale() == 512.0  # halved once, at the inf
    assert float(opt.state[model.weight]["step"]) == 4.0  # the skipped step does not count


def test_grad_scale_divides_and_leaves_unscaled_gradients() -> None:
    p = torch.randn(3000, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    g = torch.randn(3000)
    a, b = adamkit.AdamW([p], backend="triton"), adamkit.AdamW([q], backend="reference")
    p.grad, q.grad = g * 64.0, g.clone()
    a.grad_scale = torch.tensor(64.0)
    a.step()
    b.step()
    torch.testing.assert_close(p.grad, g)
    torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=1e-5)


def test_kernel_skips_when_found_inf_is_set() -> None:
    """The kernels' device-side skip: with found_inf set nothing is written."""
    p = torch.randn(3000)
    g, m, v = torch.randn(3000), torch.zeros(3000), torch.zeros(3000)
    before = [t.clone() for t in (p, g, m, v)]
    s = adam_scalars(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True, step=1.0)
    state = {"exp_avg": [m], "exp_avg_sq": [v]}
    triton_cuda.adam_([p], [g], state, s, amsgrad=False, maximize=False, mask_nonfinite=True,
                      amp=(torch.tensor(2.0), torch.tensor(1.0)))  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip((p, g, m, v), before))
    triton_cuda.adam_([p], [g], state, s, amsgrad=False, maximize=False, mask_nonfinite=True,
                      amp=(torch.tensor(2.0), torch.tensor(0.0)))  # fmt: skip
    torch.testing.assert_close(g, before[1] / 2)
    assert not torch.equal(p, before[0])


# ---------------------------------------------------------------- backend choice
def test_auto_prefers_triton_on_cuda_and_numba_on_cpu() -> None:
    assert registry.resolve("adam", "cuda", 32).backend == "triton"
    assert registry.resolve("adamax", "cuda", 8).backend == "triton"
    assert registry.resolve("adam", "cpu", 32).backend == "numba"  # the interpreter only when asked
    assert registry.resolve("adam", "cpu", 4).backend == "numba"
    if triton_cuda.INTERPRETED:
        assert registry.resolve("adam", "cpu", 32, "triton").backend == "triton"
    p = torch.zeros(10, requires_grad=True)
    assert adamkit.AdamW([p])._kernel(adamkit.AdamW([p]).param_groups[0], "cuda").backend == "triton"


def test_triton_unsupported_layouts_are_explained() -> None:
    from adamkit.quant import QuantFormat

    assert "block_wise=True" in triton_cuda.unsupported(torch.float32, QuantFormat(8, None), True)
    assert "contiguous" in triton_cuda.unsupported(torch.float32, torch.float32, False)
    assert "float64" in triton_cuda.unsupported(torch.float64, QuantFormat(8, 256), True)
    p = torch.zeros(64, 64)[:, ::2].requires_grad_()
    p.grad = torch.zeros_like(p)
    with pytest.raises(adamkit.KernelUnavailableError, match="contiguous"):
        adamkit.AdamW([p], backend="triton").step()


# ------------------------------------------------------------------ on a GPU
@needs_cuda
@pytest.mark.parametrize("bits", [32, 16, 8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference(bits: int, dtype: torch.dtype) -> None:
    """On a GPU: the compiled kernels against the reference on the same device."""
    sizes = [0, 1, 255, 4097, 1 << 20, *range(1, 300, 7)]
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=gen).to("cuda", dtype).requires_grad_() for n in sizes]
    twins = [p.detach().clone().requires_grad_() for p in params]
    kw = dict(state_bits=bits, min_quant_size=0, weight_decay=0.1)
    a, b = adamkit.AdamW(params, backend="triton", **kw), adamkit.AdamW(twins, backend="reference", **kw)
    for _ in range(5):
        for p, q in zip(params, twins):
            g = torch.randn(p.shape, device="cuda").to(dtype)
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
        for p, q in zip(params, twins):
            _assert_close_any(p.detach(), q.detach(), "cuda")
            with torch.no_grad():
                q.copy_(p)
            for key, value in a.state[p].items():
                if isinstance(value, torch.Tensor) and key != "step":
                    b.state[q][key].copy_(value)
    assert a.nonfinite_count == 0


@pytest.mark.parametrize("state_bits", [32, 16])
def test_triton_adamax_equals_reference_to_the_bit(state_bits: int) -> None:
    """The rule rounds as torch's CPU ops do (fused add(alpha=), addcdiv's order, the
    lerp's FMA): Adamax, which takes no square root, matches the reference bit for bit
    (Adam differs in an element now and then: torch's CPU ``sqrt`` is not always
    correctly rounded, the kernels' is)."""
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(n, generator=gen).requires_grad_() for n in (1, 255, 4097)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    kw = dict(weight_decay=0.05, maximize=True, state_bits=state_bits)
    a, b = adamkit.Adamax(params, backend="triton", **kw), adamkit.Adamax(twins, backend="reference", **kw)
    for _ in range(4):
        for p, q in zip(params, twins):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
        for p, q in zip(params, twins):
            assert torch.equal(p, q)
            assert all(torch.equal(a.state[p][k], b.state[q][k]) for k in ("exp_avg", "exp_inf"))
