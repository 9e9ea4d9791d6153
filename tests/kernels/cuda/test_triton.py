"""The Triton kernels against the reference.

Without a GPU they run in Triton's interpreter on CPU tensors (``tests/conftest.py``
switches it on), at small sizes: the interpreter executes each program in numpy. The
tests that need CUDA skip without it.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import ROOT
from lockstep import (
    MASK_LAYOUTS,
    PLAN_EVENTS,
    assert_close_any,
    channels_last_lockstep,
    lockstep,
    masking_lockstep,
    plan_follows_changes,
    sr_lockstep,
)
from optim_db import ALL_CONFIG_IDS, ALL_CONFIGS, OptimizerInfo
from quant_helpers import (
    QCONFIGS,
    QIDS,
    any_float_probe,
    encoder_probe,
    quant_lockstep,
    save_load_continue,
    tiny_and_subnormal,
)

import adamkit
from adamkit._scalars import adam_scalars
from adamkit.kernels import registry
from adamkit.spec import MOMENTS

triton_cuda = pytest.importorskip("adamkit.kernels.cuda.triton_kernels", reason="triton is not installed")
CUDA = torch.cuda.is_available()
if triton_cuda.INTERPRETED and tuple(map(int, triton_cuda.triton.__version__.split(".")[:2])) < (3, 9):
    pytest.skip(
        f"Triton {triton_cuda.triton.__version__}'s interpreter rounds tl.fma twice (the GPU, and 3.9's interpreter, "
        "once): the lockstep tests need triton>=3.9, as the test extra asks",
        allow_module_level=True,
    )


@pytest.fixture(autouse=True)
def _interpreter_for_cpu_tensors(request):
    """The tests on CPU tensors need Triton's interpreter; with a GPU (and the
    interpreter off) only the ``cuda`` ones run."""
    if not triton_cuda.INTERPRETED and request.node.get_closest_marker("cuda") is None:
        pytest.skip("steps CPU tensors: needs Triton's interpreter (TRITON_INTERPRET=1)")


# 0, 1, a ragged program (BLOCK = 1024), several programs, and small tensors
SIZES = [0, 1, 255, 256, 4097] + [
    int(n) for n in torch.randint(1, 64, (12,), generator=torch.Generator().manual_seed(0))
]
QSIZES = [0, 1, 255, 4097, 300]  # quantized: empty, sub-block, ragged blocks
STEPS = 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("info,kw", ALL_CONFIGS, ids=ALL_CONFIG_IDS)
def test_triton_matches_reference_in_lockstep(info: OptimizerInfo, kw: dict, dtype: torch.dtype) -> None:
    lockstep(info, kw, dtype, steps=STEPS, sizes=SIZES, backend="triton")


HALF = [c for c in ALL_CONFIGS if not c[1].get("maximize")][::3]


@pytest.mark.parametrize("state_bits", [32, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("info,kw", HALF, ids=[f"{i.name}-{n}" for n, (i, _) in enumerate(HALF)])
def test_triton_half_params(info: OptimizerInfo, kw: dict, dtype: torch.dtype, state_bits: int) -> None:
    """bf16/fp16 parameters, fp32 or bf16 state: within 1 ulp of the reference."""
    fused, params = lockstep(info, {**kw, "state_bits": state_bits}, dtype, STEPS, SIZES, backend="triton")
    want = torch.float32 if state_bits == 32 else torch.bfloat16
    moments = [t for p in params if p in fused.state for k, t in fused.state[p].items() if k in MOMENTS]
    assert moments and all(t.dtype == want for t in moments)


def test_triton_complex_params() -> None:
    info, kw = ALL_CONFIGS[1]
    lockstep(info, kw, [torch.complex64] * 3, STEPS, [7, 0, 1100], backend="triton")


@pytest.mark.parametrize("layout", MASK_LAYOUTS)
@pytest.mark.parametrize("info,kw", ALL_CONFIGS[::6], ids=ALL_CONFIG_IDS[::6])
def test_triton_masking_matches_reference(info: OptimizerInfo, kw: dict, layout: str) -> None:
    masking_lockstep(info, kw, layout, "triton", SIZES, steps=3)


@pytest.mark.parametrize("info,kw", ALL_CONFIGS[::10], ids=ALL_CONFIG_IDS[::10])
def test_triton_channels_last_weights_take_the_kernel(info: OptimizerInfo, kw: dict) -> None:
    """channels_last convolution weights (as CNNs on GPUs keep them): the Triton kernel
    steps them as flat arrays beside their gradients and state (see the numba test)."""
    channels_last_lockstep(info, kw, "triton")


@pytest.mark.parametrize("info,kw", ALL_CONFIGS[::7], ids=ALL_CONFIG_IDS[::7])
def test_triton_stochastic_rounding_matches_reference_bit_for_bit(info: OptimizerInfo, kw: dict) -> None:
    """The numba kernels' and the reference's random bits: bf16 parameters equal to the bit."""
    sr_lockstep(info, kw, "triton", SIZES, steps=3, exact=True)


@pytest.mark.parametrize("bits", [32, 8])
def test_stochastic_rounding_keeps_the_device_tables(monkeypatch, bits: int) -> None:
    """Each step's random seed travels with the constants, not in the address table:
    after the first step, stochastic-rounding steps copy only their scalars to the
    device (before, every step built and copied new address and work tables, 7 ms of
    host time a step for GPT-2's shapes), and gradients at new addresses copy a new
    address table but keep the work items."""
    params = [torch.randn(n, dtype=torch.bfloat16, requires_grad=True) for n in (5000, 300, 1)]
    opt = adamkit.AdamW(params, backend="triton", state_bits=bits, stochastic_rounding=True, min_quant_size=0)
    copies = []
    real = triton_cuda._to_device
    monkeypatch.setattr(triton_cuda, "_to_device", lambda host, device: copies.append(host.size) or real(host, device))
    for p in params:
        p.grad = torch.randn(p.shape, dtype=torch.bfloat16)
    opt.step()
    first = len(copies)
    for _ in range(3):
        opt.step()
    assert first >= 3 and len(copies) == first + 3  # address table, work items, then one copy per step
    scalars = copies[-1]
    for p in params:
        p.grad = p.grad.clone()  # the same sizes at new addresses
    opt.step()
    assert copies[-2:] == [len(params) * triton_cuda._COLS, scalars]


# ------------------------------------------------------------------ quantized state
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("cls,kw", QCONFIGS, ids=QIDS)
def test_triton_quantized_matches_reference(cls, kw, bits) -> None:
    """Codes equal the reference's (8 bits: within one on rounding ties), absmax and
    parameters within float32 rounding, after every step."""
    quant_lockstep(cls, kw, bits, steps=4, sizes=QSIZES, backend="triton")


@pytest.mark.parametrize("cls,kw", QCONFIGS[::2], ids=QIDS[::2])
def test_triton_tapered_matches_reference(cls, kw) -> None:
    """8-bit state in the tapered maps: the same codes (within one on ties), tiny moments too."""
    quant_lockstep(cls, kw, 8, steps=3, sizes=QSIZES, backend="triton", quant_map="tapered")
    quant_lockstep(cls, kw, 8, steps=2, sizes=[4097, 300], backend="triton", scales=tiny_and_subnormal,
                   quant_map="tapered")  # fmt: skip


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("cls,kw", QCONFIGS[::2], ids=QIDS[::2])
def test_triton_quantized_matches_reference_on_tiny_moments(cls, kw, bits) -> None:
    """Second moments far below their block's largest (8-bit codes keep them above 0)
    and subnormal absmax values, as in the Numba kernels' test of tiny moments."""
    quant_lockstep(cls, kw, bits, steps=3, sizes=[4097, 300], backend="triton", scales=tiny_and_subnormal)


@pytest.mark.parametrize("bits", [8, 4])
def test_triton_quantized_plan_saves_loads_and_continues_bit_identically(bits) -> None:
    """Quantized state in a cached plan's flat buffers (codes and absmax as views):
    checkpoints round trip and training continues bit for bit."""
    save_load_continue(bits, QSIZES, "triton")


def test_triton_quantized_state_lives_in_the_plan() -> None:
    params = [torch.randn(n).requires_grad_() for n in (5000, 10, 300)]
    opt = adamkit.AdamW(params, backend="triton", state_bits=4)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    plan = opt._plans[0]
    assert len(plan.segments) == 2  # quantized (5000) and 32-bit (the small ones)
    st = opt.state[params[0]]
    assert st["exp_avg_codes"].shape == (2500,) and st["exp_avg_sq_absmax"].shape == (40,)
    assert st["quant_bits"] == 4 and st["quant_dither"] == 1
    assert st["exp_avg_codes"].untyped_storage().data_ptr() == plan._held[0].untyped_storage().data_ptr()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [8, 4])
def test_triton_quantized_half_params(dtype, bits) -> None:
    quant_lockstep(adamkit.AdamW, {}, bits, dtype, steps=3, sizes=QSIZES, backend="triton")


@pytest.mark.parametrize("bits,block", [(8, 64), (8, 100), (8, 2048), (4, 2), (4, 66)])
def test_triton_quantized_other_block_sizes(bits, block) -> None:
    """Blocks that are not powers of two fill part of the tile."""
    quant_lockstep(adamkit.AdamW, {}, bits, steps=3, sizes=QSIZES, backend="triton", block_size=block)


@pytest.mark.parametrize("bits", [8, 4])
def test_triton_quantized_masks_nonfinite_like_reference(bits) -> None:
    with pytest.warns(RuntimeWarning, match="non-finite"):
        params = quant_lockstep(adamkit.Adam, QCONFIGS[1][1], bits, steps=3, bad=4097, sizes=QSIZES,
                                 backend="triton")  # fmt: skip
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("name", ["dynamic8", "udynamic8", "tapered8", "utapered8"])
def test_triton_8bit_encoder_equals_binary_search(name: str) -> None:
    """``_encode8`` (one load from the packed table) gives ``torch.searchsorted``'s code
    over the midpoints for random magnitudes over 18 decades, every midpoint and its
    neighbours, ±0, ±1, values beyond ±1 and ±inf, subnormals, and NaN of either sign
    (255)."""
    import numpy as np
    import triton
    import triton.language as tl

    @triton.jit
    def encode(y_ptr, book, out, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out + offs, triton_cuda._encode8(tl.load(y_ptr + offs), book + triton_cuda._ENC_BASE))

    beyond = [np.inf, -np.inf, 2.0, -2.0, np.nextafter(1, 2), -np.nextafter(1, 2), 1e-45, -1e-45, np.nan, -np.nan]
    y = np.concatenate([encoder_probe(name), np.array(beyond, dtype=np.float32)])
    y = torch.from_numpy(np.pad(y, (0, -y.size % 4096)))
    out = torch.empty(y.shape, dtype=torch.int32)
    encode[(y.numel() // 4096,)](y, triton_cuda._books((name,) * 3, 8, y.device), out, BLOCK=4096)
    expected = torch.searchsorted(adamkit.quant.codebook(name).midpoints, y)
    assert torch.equal(out.long(), expected)
    assert (out[torch.isnan(y)] == 255).all() and torch.isnan(y).sum() == 2


@pytest.mark.parametrize("name", ["normal4_dither", "geo4_dither"])
def test_triton_4bit_encoder_takes_any_float(name: str) -> None:
    """``_encode4`` gives the reference's codes, and any float a code of 0-15 (NaN as
    the lowest value, +inf code 15): see ``quant_helpers.any_float_probe``."""
    import numpy as np
    import triton
    import triton.language as tl

    from adamkit.quant.codebooks import DITHER_ALONG, dither_phase

    @triton.jit
    def encode(y_ptr, h_ptr, book, out, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(out + offs, triton_cuda._encode4(tl.load(y_ptr + offs), tl.load(h_ptr + offs).to(tl.uint32), book))

    for step in (0, 5):
        y, want = any_float_probe(name, step)
        h = (np.arange(y.size, dtype=np.int64) * DITHER_ALONG + dither_phase(step)) & 0xFFFFFFFF
        out = torch.empty(y.size, dtype=torch.int32)
        encode[(1,)](torch.from_numpy(y), torch.from_numpy(h), triton_cuda._books((name,) * 3, 4, "cpu"), out,
                     BLOCK=y.size)  # fmt: skip
        assert out.tolist() == want.tolist()


@pytest.mark.parametrize("bits", [8, 4])
def test_triton_quantized_full_tiles_are_aligned(monkeypatch, bits: int) -> None:
    """Work items of whole power-of-two blocks take the unmasked path with 16-byte
    accesses (ALIGNED) when every address allows it, and ragged ones the masked path,
    both in lockstep with the reference."""
    flags = _spy_on_launches(monkeypatch, "_quant_kernel", lambda grid, kw: kw["ALIGNED"])
    quant_lockstep(adamkit.Adam, QCONFIGS[1][1], bits, steps=2, sizes=[6000, 4097, 700], backend="triton")
    assert flags and all(flags)  # plan buffers are 16-byte aligned; 6000 has whole tiles and a tail
    flags.clear()
    quant_lockstep(adamkit.AdamW, {}, bits, steps=2, sizes=[6000], backend="triton", block_size=96)
    assert flags and not any(flags)  # a block that is not a power of two


@pytest.mark.parametrize(
    "settings",
    [{"QUANT_TILE": 1024, "QUANT_TILES": 1}, {"QUANT_TILE": 512, "QUANT_TILES": 4}, {"QUANT_TILE": 256},
     {"BLOCK": 512}, {"BLOCK": 4096}],
    ids=["tile-1024x1", "tile-512x4", "tile-256x2", "block-512", "block-4096"],
)  # fmt: skip
def test_triton_launch_settings_the_tuner_sweeps(monkeypatch, settings: dict) -> None:
    """Every tile and block size ``scripts/tune-cuda.py`` may choose steps as the
    reference does: whole and ragged tiles, several tensors per launch, 8 and 4 bits,
    one absmax per tensor (rows, tiles and work items all follow the settings)."""
    for name, value in settings.items():
        monkeypatch.setattr(triton_cuda, name, value)
    if "BLOCK" in settings:
        info, kw = ALL_CONFIGS[1]
        lockstep(info, kw, torch.float32, steps=2, sizes=[0, 1, 511, 4097, 9000, 300], backend="triton")
        return
    sizes = [6000, 4097, 700, 1, 2049]
    for bits in (8, 4):
        quant_lockstep(adamkit.Adam, QCONFIGS[1][1], bits, steps=2, sizes=sizes, backend="triton")
    quant_lockstep(adamkit.AdamW, {}, 8, steps=2, sizes=sizes, backend="triton", block_wise=False)


def _spy_on_launches(monkeypatch, name: str = "_dense_kernel", note=lambda grid, kw: grid) -> list:
    """What ``note(grid, keywords)`` says of each launch of kernel ``name`` from now on
    (by default its grid); the launches still run."""
    notes: list = []
    real = getattr(triton_cuda, name)

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                notes.append(note(grid, kw))
                return real[grid](*args, **kw)

            return launch

    monkeypatch.setattr(triton_cuda, name, Spy())
    return notes


@pytest.mark.parametrize(
    "changes,error",
    [({"BLOCK": 1000}, ValueError), ({"BLOCK": 2048.0}, ValueError), ({"DENSE_WARPS": True}, ValueError),
     ({"QUANT_MAXNREG": 300}, ValueError), ({"QUANT_TILES": 0}, ValueError), ({"TILE": 512}, TypeError)],
    ids=["not-pow2", "float", "bool", "maxnreg", "tiles", "unknown"],
)  # fmt: skip
def test_launch_settings_are_checked_before_any_changes(changes: dict, error: type) -> None:
    """``launch_settings`` refuses a bad value, or an unknown name, naming it, and then
    changes none of the settings, not even the good ones given beside it."""
    before = triton_cuda.launch_settings()
    with pytest.raises(error, match=next(iter(changes))):
        triton_cuda.launch_settings(QUANT_TILE=1024, **changes)
    after = triton_cuda.launch_settings(**before)  # restored, should a bug have changed them
    assert after == before


def test_launch_settings_take_effect_and_come_back(monkeypatch) -> None:
    """Changed settings reach the next launch (a program per BLOCK elements: 4097
    elements are 9 programs of 512) and the call returns the old ones, which restore
    them; numpy ints are taken as ints."""
    import numpy as np

    before = triton_cuda.launch_settings()
    grids = _spy_on_launches(monkeypatch)
    p = torch.zeros(4097, requires_grad=True)
    p.grad = torch.ones(4097)
    opt = adamkit.AdamW([p], backend="triton")
    try:
        assert triton_cuda.launch_settings(BLOCK=np.int64(512), DENSE_WARPS=8) == before
        assert type(triton_cuda.BLOCK) is int
        opt.step()
    finally:
        assert triton_cuda.launch_settings(**before)["BLOCK"] == 512
    assert triton_cuda.launch_settings() == before
    assert grids == [(9,)]
    assert torch.allclose(p.detach(), torch.full((4097,), -1e-3))


def test_tuner_proposes_only_clear_wins() -> None:
    """``scripts/tune-cuda.py`` proposes a kernel's fastest settings against torch
    fused only where they beat those in use by its margin, and skips failed variants."""
    import importlib.util

    path = ROOT / "scripts" / "tune-cuda.py"
    spec = importlib.util.spec_from_file_location("tune_cuda", path)
    tune = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tune)
    dense = [
        {"kernel": "dense", "BLOCK": 1024, "DENSE_WARPS": 4, "current": True, "ms": 1.0, "vs_torch_fused": 1.00},
        {"kernel": "dense", "BLOCK": 2048, "DENSE_WARPS": 8, "current": False, "ms": 0.9, "vs_torch_fused": 1.10},
        {"kernel": "dense", "BLOCK": 4096, "DENSE_WARPS": 8, "error": "CompilationError"},
    ]
    quant = [
        {"kernel": "8-bit", "QUANT_TILE": 512, "QUANT_TILES": 2, "current": True, "ms": 1.0, "vs_torch_fused": 1.50},
        {"kernel": "8-bit", "QUANT_TILE": 1024, "QUANT_TILES": 1, "current": False, "ms": 0.97, "vs_torch_fused": 1.52},
    ]
    assert tune.fastest(dense + quant) == {"BLOCK": 2048, "DENSE_WARPS": 8}
    assert tune.fastest(quant) == {}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("cls,kw", QCONFIGS, ids=QIDS)
def test_triton_one_absmax_per_tensor_matches_reference(cls, kw, bits: int) -> None:
    """``block_wise=False``: two launches (the tensor's new absmax, then the step),
    in lockstep with the reference, non-finite gradients masked; the second pass
    decodes with the old absmax that block 0's row overwrites meanwhile."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the masked elements' warning
        quant_lockstep(cls, kw, bits, steps=3, bad=4097, sizes=QSIZES, backend="triton",
                        block_wise=False)  # fmt: skip


def test_one_absmax_per_tensor_found_inf_skips() -> None:
    p = torch.randn(5000, requires_grad=True)
    opt = adamkit.AdamW([p], backend="triton", state_bits=8, block_wise=False)
    p.grad = torch.randn(5000)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
    q = p.detach().clone()
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
    opt.step()
    assert torch.equal(p, q) and all(torch.equal(opt.state[p][k], v) for k, v in before.items())


def test_triton_quantized_stochastic_rounding_matches_reference() -> None:
    quant_lockstep(adamkit.AdamW, {}, 8, torch.bfloat16, steps=3, sizes=QSIZES, backend="triton",
                    stochastic_rounding=True)  # fmt: skip


# ---------------------------------------------------------------- launches and AMP
def test_many_tensors_take_one_launch(monkeypatch) -> None:
    """500 small tensors of one dtype: one kernel launch (a pointer table) from the
    group's cached plan, right results."""
    launches = _spy_on_launches(monkeypatch)
    info, kw = ALL_CONFIGS[1]
    sizes = [int(n) for n in torch.randint(1, 40, (500,), generator=torch.Generator().manual_seed(3))]
    opt, _ = lockstep(info, kw, torch.float32, steps=2, sizes=sizes, backend="triton")
    assert len(launches) == 2  # one per step
    assert launches[0] == (500,)  # every tensor fits one program
    assert len(opt._plans) == 1  # through a cached plan (flat state, address tables), as numba's


@pytest.mark.parametrize("bits", [32, 8])
def test_kernels_launch_with_their_tensors_device_current(monkeypatch, bits: int) -> None:
    """Triton launches on the current CUDA device's stream, whatever device the tensors
    are on: every launch runs with its tensors' device made current (``_device_guard``,
    spied on here; CPU tensors), from a plan and on the general path (a gradient
    missing), capturable or not. On a GPU the guard is ``torch.cuda.device``."""
    import contextlib

    current: list[torch.device] = []

    @contextlib.contextmanager
    def guard(device):
        current.append(device)
        try:
            yield
        finally:
            current.pop()

    cuda1 = triton_cuda._device_guard(torch.device("cuda", 1))  # made, not entered: no GPU needed
    assert isinstance(cuda1, torch.cuda.device) and cuda1.idx == 1
    monkeypatch.setattr(triton_cuda, "_device_guard", guard)
    guarded = [
        _spy_on_launches(monkeypatch, name, lambda grid, kw: tuple(current))
        for name in ("_dense_kernel", "_quant_kernel")
    ]
    for capturable in (False, True):
        params = [torch.randn(n, requires_grad=True) for n in (300, 5000, 7)]
        opt = adamkit.AdamW(params, backend="triton", state_bits=bits, min_quant_size=0, capturable=capturable)
        for step in range(3):
            for k, p in enumerate(params):
                p.grad = None if step == 2 and k == 1 else torch.randn(p.shape)
            opt.step()
    seen = guarded[0] + guarded[1]
    assert len(seen) >= 6 and all(s == (torch.device("cpu"),) for s in seen)


@pytest.mark.parametrize("event", PLAN_EVENTS)
def test_triton_plan_follows_changes(event: str) -> None:
    """The cached plans (numba's machinery) with the Triton kernels: no stale tables."""
    plan_follows_changes(event, "triton")


@pytest.mark.parametrize("backend", ["triton", "numba", "reference"])
def test_grad_scaler_steps_like_torch(backend: str) -> None:
    """torch.amp.GradScaler hands the scale and found_inf to step(): the step divides the
    gradients by the scale (leaving them unscaled, as torch's fused kernels do) and
    skips when found_inf is set, matching torch.optim.AdamW under the same scaler, on
    the group's cached plan (numba: the gradients divided first; triton: in the
    kernel) as on the general path (reference)."""
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
    assert bool(opt._plans) == (backend != "reference")  # the cached plan takes AMP steps too


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

    assert triton_cuda.unsupported(torch.float32, QuantFormat(8, None), True) is None  # block_wise=False: 2 passes
    assert "dithered" in triton_cuda.unsupported(torch.float32, QuantFormat(4, 128, dither=False), True)
    assert "contiguous" in triton_cuda.unsupported(torch.float32, torch.float32, False)
    assert "float64" in triton_cuda.unsupported(torch.float64, QuantFormat(8, 256), True)
    p = torch.zeros(64, 64)[:, ::2].requires_grad_()
    p.grad = torch.zeros_like(p)
    with pytest.raises(adamkit.KernelUnavailableError, match="contiguous"):
        adamkit.AdamW([p], backend="triton").step()


# ------------------------------------------------------------------ compiled for a GPU
def test_kernels_compile_for_sm90_with_correct_rounding() -> None:
    """Triton's real compiler (not the interpreter) builds every kind of kernel for an
    H100/H200 without a GPU, and the PTX divides and takes square roots correctly
    rounded (no ``div.full``/``sqrt.approx``): ``scripts/compile_sm90.py`` in a fresh
    process without TRITON_INTERPRET."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = ROOT / "scripts" / "compile_sm90.py"
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "26 kernel variants compiled for sm_90, 0 problems" in done.stdout


# ------------------------------------------------------------------ on a GPU
CUDA_CONFIGS = [
    (adamkit.AdamW, dict(weight_decay=0.1)),
    (adamkit.Adam, dict(amsgrad=True, maximize=True, weight_decay=0.1)),
    (adamkit.Adamax, dict(weight_decay=0.05)),
]


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits", [32, 16, 8, 4, "8-one-absmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls,kw", CUDA_CONFIGS, ids=["AdamW", "Adam-ams-max", "Adamax"])
def test_cuda_matches_reference(cls, kw, bits: int | str, dtype: torch.dtype) -> None:
    """On a GPU: the compiled kernels against the reference on the same device, NaN and
    inf gradients masked alike; with one absmax per tensor, a 1M-element tensor's
    programs run concurrently while block 0's row overwrites the absmax."""
    if bits == "8-one-absmax":
        bits, kw = 8, {**kw, "block_wise": False}
    sizes = [0, 1, 255, 4097, 1 << 20, *range(1, 300, 7)]
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=gen).to("cuda", dtype).requires_grad_() for n in sizes]
    twins = [p.detach().clone().requires_grad_() for p in params]
    kw = dict(state_bits=bits, min_quant_size=0, **kw)
    a, b = cls(params, backend="triton", **kw), cls(twins, backend="reference", **kw)
    for step in range(5):
        for p, q in zip(params, twins):
            g = torch.randn(p.shape, device="cuda").to(dtype)
            if step == 2 and g.numel() > 300:
                g[[0, 299]] = torch.tensor([float("nan"), float("inf")], device="cuda", dtype=dtype)
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
        for p, q in zip(params, twins):
            assert_close_any(p.detach(), q.detach(), "cuda")
            with torch.no_grad():
                q.copy_(p)
            for key, value in a.state[p].items():
                if isinstance(value, torch.Tensor) and key != "step":
                    b.state[q][key].copy_(value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert a.nonfinite_count == b.nonfinite_count == 4


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


# ------------------------------------------------------------------ capturable
CAPTURABLE = [
    (adamkit.AdamW, dict(weight_decay=0.1)),
    (adamkit.Adam, dict(amsgrad=True, weight_decay=0.1, maximize=True)),
    (adamkit.Adamax, dict(weight_decay=0.05)),
]


@pytest.mark.parametrize("state_bits", [32, 16, 8, 4, "8-one-absmax"])
@pytest.mark.parametrize("cls,kw", CAPTURABLE, ids=["AdamW", "Adam-ams-max", "Adamax"])
def test_capturable_equals_the_host_path(cls, kw, state_bits: int | str) -> None:
    """capturable=True computes the step scalars on the device from device ``step``
    counters and a device ``lr`` (a scheduler writing it in place): bit for bit what
    the host path computes, including lagging steps (the general path) and, with every
    gradient present, through the group's cached plan (at 8/4 bits two segments: the
    small tensors keep 32-bit state)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=gen).requires_grad_() for n in (1, 300, 5000)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    if state_bits == "8-one-absmax":  # block_wise=False: two launches, a scratch table made on the device
        state_bits, kw = 8, {**kw, "block_wise": False}
    common = dict(backend="triton", state_bits=state_bits, min_quant_size=1000, **kw)
    a = cls(params, lr=torch.tensor(0.01), capturable=True, **common)
    b = cls(twins, lr=torch.tensor(0.01), **common)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, 2, 0.5) for o in (a, b)]
    for step in range(6):
        for i, (p, q) in enumerate(zip(params, twins)):
            g = None if (i == 1 and step in (2, 3)) else torch.randn(p.shape, generator=gen)
            p.grad, q.grad = (None, None) if g is None else (g.clone(), g.clone())
        a.step()
        b.step()
        for s in schedulers:
            s.step()
        for p, q in zip(params, twins):
            assert torch.equal(p, q), f"step {step}"
            assert torch.equal(a.state[p]["step"], b.state[q]["step"])
            assert a.state[p]["step"].device == p.device
    assert float(a.state[params[1]]["step"]) == 4.0
    plan = a._plans[0]  # the last steps had every gradient: the plan path
    assert plan.capturable and len(plan.segments) == (2 if state_bits in (8, 4) else 1)
    steps = a.state[params[2]]["step"]
    assert steps.untyped_storage().data_ptr() == plan.steps.untyped_storage().data_ptr()


def test_capturable_step_reads_nothing_on_the_host(monkeypatch) -> None:
    """After a warm-up step, a capturable step (GradScaler's scale and found_inf
    included) never turns a tensor into a Python number: nothing waits for the GPU, and
    the step can be captured in a CUDA graph."""
    params = [torch.randn(n).requires_grad_() for n in (10, 5000)]
    opt = adamkit.AdamW(params, lr=torch.tensor(1e-3), backend="triton", capturable=True, state_bits=8,
                        min_quant_size=0)  # fmt: skip
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()  # warm-up: state and tables made
    opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(0.0)

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor was read on the host during a capturable step")

    from adamkit.optim._plan import _Launch

    planned = []
    real = _Launch.buckets
    monkeypatch.setattr(_Launch, "buckets", lambda self, *a, **k: planned.append(1) or real(self, *a, **k))
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__float__", "__int__", "__bool__", "__index__"):
            m.setattr(torch.Tensor, name, host_read)
        opt.step()  # the group's plan
        params[0].grad = None
        opt.step()  # a gradient missing: the general path
    assert planned == [1]
    assert [float(opt.state[p]["step"]) for p in params] == [2.0, 3.0]


def test_capturable_found_inf_skips_on_the_device() -> None:
    params = [torch.randn(n).requires_grad_() for n in (10, 5000)]
    opt = adamkit.AdamW(params, backend="triton", capturable=True)
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    before = [p.detach().clone() for p in params]
    opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(1.0)
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert float(opt.state[params[0]]["step"]) == 1.0  # not advanced
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    assert float(opt.state[params[0]]["step"]) == 2.0
    assert not torch.equal(params[1], before[1])


def test_capturable_counts_masked_elements_on_the_device() -> None:
    p = torch.randn(3000, requires_grad=True)
    opt = adamkit.AdamW([p], backend="triton", capturable=True)
    p.grad = torch.randn(3000)
    p.grad[[5, 2999]] = torch.tensor([float("nan"), float("inf")])
    before = p.detach().clone()
    opt.step()
    with pytest.warns(RuntimeWarning, match="2 non-finite"):
        assert opt.nonfinite_count == 2
    assert torch.equal(p[[5, 2999]], before[[5, 2999]])


def test_tables_a_captured_graph_reads_are_never_evicted(monkeypatch) -> None:
    """A CUDA graph's replays read the device tables its capture found: they stay, however
    many other tables later eager steps make (the cache keeps 64 others); a capture that
    meets tensors without tables says to run a warm-up step. CUDA faked: the cache's
    logic only."""
    import numpy as np

    monkeypatch.setattr(triton_cuda, "_TABLES", {})
    monkeypatch.setattr(triton_cuda, "_CAPTURED", {})
    monkeypatch.setattr(triton_cuda, "_to_device", lambda host, device: torch.from_numpy(host.copy()))
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    cuda = torch.device("cuda")
    table = triton_cuda._device_tables(np.arange(5), cuda, capturable=True)  # a warm-up step makes it
    capturing[0] = True
    assert triton_cuda._device_tables(np.arange(5), cuda, capturable=True) is table  # the capture finds it
    with pytest.raises(RuntimeError, match="warm-up step"):
        triton_cuda._device_tables(np.arange(6), cuda, capturable=True)
    capturing[0] = False
    for k in range(2 * triton_cuda._TABLES_KEPT):  # later eager steps on other tensors
        triton_cuda._device_tables(np.arange(k + 10), cuda)
    assert len(triton_cuda._TABLES) == triton_cuda._TABLES_KEPT
    assert triton_cuda._device_tables(np.arange(5), cuda, capturable=True) is table  # still the graph's


def test_graph_capture_needs_capturable(monkeypatch) -> None:
    """As torch's optimizers: a step inside a CUDA graph capture with a group that is not
    capturable raises (its host-side scalars would be frozen into the graph) and changes
    nothing; a capturable one steps. CUDA faked: the check only."""
    params = [torch.randn(100, requires_grad=True), torch.randn(10, requires_grad=True)]
    for p in params:
        p.grad = torch.randn(p.shape)
    before = [p.detach().clone() for p in params]
    opt = adamkit.AdamW([{"params": params[:1], "capturable": True}, {"params": params[1:]}], backend="triton")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="capturable is False"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and not opt.state
    opt.param_groups[1]["capturable"] = True
    opt.step()
    assert not any(torch.equal(p, b) for p, b in zip(params, before))


def test_capturable_rejects_what_needs_the_host() -> None:
    p = [torch.randn(10, requires_grad=True)]
    with pytest.raises(ValueError, match="nonfinite='mask' or 'propagate'"):
        adamkit.AdamW(p, backend="triton", capturable=True, nonfinite="skip")
    with pytest.raises(ValueError, match="stochastic_rounding"):
        adamkit.AdamW(p, backend="triton", capturable=True, stochastic_rounding=True)
    with pytest.raises(ValueError, match="percentile_clipping"):
        adamkit.AdamW(p, backend="triton", capturable=True, percentile_clipping=90)
    with pytest.raises(NotImplementedError, match="needs the triton kernels"):
        adamkit.AdamW(p, backend="numba", capturable=True)


def test_capturable_checkpoint_round_trip() -> None:
    """A capturable optimizer's checkpoint (device steps) loads into a host-path one and
    into torch.optim.AdamW, and back."""
    params = [torch.randn(n).requires_grad_() for n in (10, 5000)]
    opt = adamkit.AdamW(params, backend="triton", capturable=True)
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    sd = opt.state_dict()
    twin = adamkit.AdamW([p.detach().clone().requires_grad_() for p in params], backend="triton")
    twin.load_state_dict(sd)
    torch_opt = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in params])
    torch_opt.load_state_dict(sd)
    back = adamkit.AdamW([p.detach().clone().requires_grad_() for p in params], backend="triton", capturable=True)
    back.load_state_dict(torch_opt.state_dict())
    for st in (twin.state, back.state):
        assert all(float(s["step"]) == 1.0 for s in st.values())


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("capturable", [False, True], ids=["host", "capturable"])
@pytest.mark.parametrize("bits", [32, 8])
def test_cuda_parameters_on_another_gpu_than_the_current_one(bits: int, capturable: bool) -> None:
    """Parameters on the last GPU while the first is current (no ``set_device``): the
    kernels run there and match the reference there, a NaN's masked count arrives, and
    a GradScaler-style step whose scale and found_inf live on the first GPU (a
    GradScaler keeps them on the device of the loss it scaled) unscales right."""
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    torch.cuda.set_device(0)
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=gen).to(device).requires_grad_() for n in (4097, 300, 1)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    kw = dict(state_bits=bits, min_quant_size=0)
    a = adamkit.AdamW(params, backend="triton", capturable=capturable, **kw)
    b = adamkit.AdamW(twins, backend="reference", **kw)
    for step in range(4):
        scale = 4.0 if step == 3 else 1.0
        for p, q in zip(params, twins):
            g = torch.randn(p.shape, generator=gen).to(device) * scale
            if step == 1 and p.numel() == 300:
                g[7] = float("nan")
            p.grad, q.grad = g.clone(), g.clone()
        for opt in (a, b):
            if step == 3:
                opt.grad_scale = torch.full((), scale, device="cuda:0")
                opt.found_inf = torch.zeros((), device="cuda:0")
            opt.step()
            if step == 3:
                del opt.grad_scale, opt.found_inf
        for p, q in zip(params, twins):
            assert_close_any(p.detach(), q.detach(), "cuda")
            with torch.no_grad():  # lockstep: no drift from codes a rounding tie apart
                q.copy_(p)
            for key, value in a.state[p].items():
                if isinstance(value, torch.Tensor) and key != "step":
                    b.state[q][key].copy_(value)
    assert torch.cuda.current_device() == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert a.nonfinite_count == b.nonfinite_count == 1


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits", [32, 8])
def test_cuda_graph_captures_a_training_step(bits: int) -> None:
    """A whole training step (forward, backward, GradScaler-free AdamW with a device lr)
    captured in a CUDA graph and replayed matches the same steps run eagerly."""
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64)).cuda()
              for _ in range(2)]  # fmt: skip
    models[1].load_state_dict(models[0].state_dict())
    kw = dict(lr=torch.tensor(1e-3, device="cuda"), capturable=True, state_bits=bits, min_quant_size=0)
    opts = [adamkit.AdamW(m.parameters(), **kw) for m in models]
    x, y = torch.randn(32, 64, device="cuda"), torch.randn(32, 64, device="cuda")

    def train_step(model, opt):
        opt.zero_grad(set_to_none=False)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up, as torch's CUDA-graph recipe asks
            train_step(models[0], opts[0])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step(models[0], opts[0])
    for _ in range(3):
        train_step(models[1], opts[1])
    for _ in range(5):
        graph.replay()
        train_step(models[1], opts[1])
    torch.cuda.synchronize()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
