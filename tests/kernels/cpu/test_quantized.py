"""The Numba kernels of quantized state (``adamkit/kernels/cpu/quantized.py``, state_bits
8 and 4) against the reference codec and optimizer, in lockstep
(``tests/quant_helpers.py``): every rule, half-precision parameters, masking, tiny
moments and subnormal blocks, other block sizes, stochastic rounding; the dithered
4-bit encoder and decoder (SIMD rows and scalar code) bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from quant_helpers import (
    QCONFIGS,
    QIDS,
    any_float_probe,
    quant_lockstep,
    tiny_and_subnormal,
)

import adamkit
from adamkit.quant import QuantFormat, codebook, dequantize, dither_tables, quantize, unpack


def _dither_codecs(simd: bool):
    """(encode, decode) over whole arrays: the ISA's SIMD row functions, or the scalar
    ones (in functions of their own: a SIMD intrinsic compiled in, even behind a branch
    never taken, is an illegal instruction for LLVM on a CPU without it)."""
    from numba import njit

    from adamkit.kernels.cpu import _simd
    from adamkit.kernels.cpu import quantized as nq

    if simd:

        @njit
        def encode(y, table, first, codes, h0):
            _simd.encode_rows_dither4(y.ctypes.data, y.size // _simd.LANES, np.float32(1.0), table.ctypes.data,
                                      codes.ctypes.data, h0)  # fmt: skip

        @njit
        def decode(codes, table, out, h0):
            _simd.decode_rows_dither4(codes.ctypes.data, out.size // _simd.LANES, table.ctypes.data, np.float32(1.0),
                                      False, out.ctypes.data, h0)  # fmt: skip

        return encode, decode

    @njit
    def encode_scalar(y, table, first, codes, h0):
        for i in range(y.size):
            c = nq._encode_dither(y[i], nq._dither_hash(h0, i), table, first)
            codes[i >> 1] |= c << ((i & 1) * 4)

    @njit
    def decode_scalar(codes, table, out, h0):
        for i in range(out.size):
            code = (codes[i >> 1] >> ((i & 1) * 4)) & 15
            out[i] = nq._decode_dither(code, nq._dither_hash(h0, i), table)

    return encode_scalar, decode_scalar


@pytest.mark.parametrize("simd", [True, False], ids=["simd", "portable"])
@pytest.mark.parametrize("name", ["normal4_dither", "geo4_dither"])
def test_dither_codec_kernels_equal_reference(name: str, simd: bool) -> None:
    """The kernels' dithered 4-bit encoder and decoder (the CPU's SIMD rows and the
    scalar code) give the reference's codes and values bit for bit, from any element
    offset and step."""
    from adamkit.kernels.cpu import _simd
    from adamkit.kernels.cpu import quantized as nq
    from adamkit.quant.codebooks import dither_phase

    if simd and not _simd.SIMD:
        pytest.skip("the CPU has neither AVX-512 nor AVX2")
    encode, decode = _dither_codecs(simd)
    book = codebook(name)
    fmt = QuantFormat(4, None)
    table, first = _simd.encoder_constants[name](), dither_tables(name).first
    gen = np.random.default_rng(4)
    L = book.values.numpy()
    y = np.concatenate([[1.0], L, np.nextafter(L, np.float32(2)), np.nextafter(L, np.float32(-2)),
                        gen.uniform(-1, 1, 8000), gen.standard_normal(1000) * 1e-3, [0.0, -0.0]])  # fmt: skip
    y = y.astype(np.float32)
    lanes = _simd.LANES  # the ISA in use: 8 with AVX2, 16 with AVX-512
    y = np.clip(y if book.signed else np.abs(y), -1, 1)[: y.size // (4 * lanes) * (4 * lanes)]
    n, half = y.size, y.size // 2 - lanes  # each part an odd number of vectors of the ISA's width
    for step in (0, 1, 7, 123456789):
        want, absmax = quantize(torch.from_numpy(y), fmt, book, step)
        assert float(absmax) == 1.0  # so that the kernels' y is the reference's
        values = dequantize(want, absmax, fmt, book, n, step).numpy()
        h0 = dither_phase(step)
        h_half = int(nq._dither_hash(h0, half))
        codes = np.zeros(n // 2, dtype=np.uint8)
        encode(y[:half], table, first, codes[: half // 2], h0)
        encode(y[half:], table, first, codes[half // 2 :], h_half)  # a block further in
        np.testing.assert_array_equal(codes, want.numpy())
        out = np.zeros(n, dtype=np.float32)
        decode(codes[: half // 2], table, out[:half], h0)
        decode(codes[half // 2 :], table, out[half:], h_half)
        np.testing.assert_array_equal(out, values)


@pytest.mark.parametrize("simd", [True, False], ids=["simd", "portable"])
@pytest.mark.parametrize("name", ["normal4_dither", "geo4_dither"])
def test_dither_encoders_take_any_float(name: str, simd: bool) -> None:
    """The kernels' dithered 4-bit encoders give every float a code of 0-15 (see
    :func:`any_float_probe`): a stray NaN never spills into the neighbouring nibble.
    (The codec feeds them finite values: it saturates non-finite state first.)"""
    from adamkit.kernels.cpu import _simd
    from adamkit.kernels.cpu import quantized as nq
    from adamkit.quant.codebooks import dither_phase

    if simd and not _simd.SIMD:
        pytest.skip("the CPU has neither AVX-512 nor AVX2")
    encode, _ = _dither_codecs(simd)
    table, first = _simd.encoder_constants[name](), dither_tables(name).first
    for step in (0, 5):
        y, want = any_float_probe(name, step)
        codes = np.zeros(y.size // 2, dtype=np.uint8)
        encode(y, table, first, codes, dither_phase(step))
        np.testing.assert_array_equal(unpack(torch.from_numpy(codes), QuantFormat(4, None), y.size).numpy(), want)
    assert nq  # the scalar encoder is numba_quant._encode_dither


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("cls,kw", QCONFIGS, ids=QIDS)
def test_kernels_match_reference(cls, kw, bits) -> None:
    quant_lockstep(cls, kw, bits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [8, 4])
def test_kernels_half_params(dtype, bits) -> None:
    quant_lockstep(adamkit.AdamW, {}, bits, dtype)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("cls,kw", QCONFIGS[::2], ids=QIDS[::2])
def test_kernels_mask_nonfinite_like_reference(cls, kw, bits) -> None:
    with pytest.warns(RuntimeWarning, match="non-finite"):
        params = quant_lockstep(cls, kw, bits, bad=4097)
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("cls,kw", QCONFIGS[::2], ids=QIDS[::2])
def test_kernels_match_reference_on_tiny_moments(cls, kw, bits) -> None:
    """Second moments 1e-24 of their block's largest, and blocks whose absmax is
    subnormal (the codec scales them by 2^64): the kernels' codes are the reference's."""
    quant_lockstep(cls, kw, bits, scales=tiny_and_subnormal, sizes=[4096, 70_001])


@pytest.mark.parametrize("block", [64, 2048])
def test_kernels_other_block_sizes(block) -> None:
    quant_lockstep(adamkit.AdamW, {}, 8, block_size=block)


@pytest.mark.parametrize("bits", [8, 4])
def test_stochastic_rounding_bit_identical_to_reference(bits: int) -> None:
    torch.manual_seed(0)  # fixed data: a rounding tie (codes one apart) would show as a difference
    p = torch.randn(5000, dtype=torch.bfloat16, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    fused = adamkit.AdamW([p], state_bits=bits, stochastic_rounding=True, backend="numba")
    ref = adamkit.AdamW([q], state_bits=bits, stochastic_rounding=True, backend="reference")
    for step in range(3):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
        torch.manual_seed(step)
        fused.step()
        torch.manual_seed(step)
        ref.step()
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls,kw", QCONFIGS, ids=QIDS)
def test_tapered_kernels_match_reference(cls, kw) -> None:
    """8-bit state in the tapered maps (``quant_map="tapered"``): the kernels step as the
    reference, codes within one on rounding ties."""
    quant_lockstep(cls, kw, 8, quant_map="tapered")


@pytest.mark.parametrize("cls,kw", QCONFIGS[::2], ids=QIDS[::2])
def test_tapered_kernels_mask_and_tiny_moments(cls, kw) -> None:
    with pytest.warns(RuntimeWarning, match="non-finite"):
        quant_lockstep(cls, kw, 8, bad=4097, quant_map="tapered")
    quant_lockstep(cls, kw, 8, scales=tiny_and_subnormal, sizes=[4096, 70_001], quant_map="tapered")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tapered_kernels_half_params(dtype) -> None:
    quant_lockstep(adamkit.AdamW, {}, 8, dtype, quant_map="tapered")


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_groups_take_a_cached_plan(bits: int) -> None:
    """A CPU group with quantized state steps through a cached plan (its tables built
    once; the general path cost ~60 us per tensor per step): quantized and 32-bit
    segments, state views of the plan's flat buffers."""
    params = [torch.randn(n).requires_grad_() for n in (5000, 10, 300)]
    opt = adamkit.AdamW(params, state_bits=bits)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    plan = opt._plans[0]
    assert len(plan.segments) == 2  # quantized (5000) and 32-bit (the small ones)
    st = opt.state[params[0]]
    assert st["quant_bits"] == bits and st["exp_avg_codes"].numel() == 5000 * bits // 8
    opt.step()
    assert opt._plans[0] is plan


@pytest.mark.parametrize("bits", [8, 4])
def test_plan_steps_tensors_at_different_steps_like_reference(bits: int) -> None:
    """Tensors of one plan at different steps (one had no gradient for two steps): each
    is stepped, and its dithered codes written, at its own step, as the reference does."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(n, generator=gen).requires_grad_() for n in (4096, 8192, 5000)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    fused = adamkit.AdamW(params, state_bits=bits, min_quant_size=0)
    ref = adamkit.AdamW(twins, state_bits=bits, min_quant_size=0, backend="reference")
    for step in range(5):
        for i, (p, q) in enumerate(zip(params, twins)):
            if i == 1 and step in (1, 2):
                p.grad = q.grad = None
                continue
            g = torch.randn(p.shape, generator=gen) * 10.0 ** (i - 2)
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        ref.step()
        assert fused._plans.get(0) is not None
        for p, q in zip(params, twins):
            torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=1e-5)
            assert float(fused.state[p]["step"]) == float(ref.state[q]["step"])
            for key in ("exp_avg_codes", "exp_avg_sq_codes"):
                a, b = fused.state[p][key], ref.state[q][key]
                fmt = QuantFormat(bits, None)
                d = (unpack(a, fmt, p.numel()) - unpack(b, fmt, p.numel())).abs()
                assert int(d.max()) <= (1 if bits == 8 else 0), key
            with torch.no_grad():
                q.copy_(p)
            for key, value in fused.state[p].items():
                if isinstance(value, torch.Tensor) and key != "step":
                    ref.state[q][key].copy_(value)


def test_plan_follows_format_options_changed_between_steps() -> None:
    """A parameter that gets its first gradient after ``block_size``, ``quant_map`` or
    ``min_quant_size`` changed, or after a GlobalOptimManager override, gets state in the
    new format (a cached plan creates state for such parameters: it is rebuilt)."""
    from adamkit.bnb import GlobalOptimManager

    def fresh_state(change) -> dict:
        a, b = torch.randn(8192, requires_grad=True), torch.randn(8192, requires_grad=True)
        opt = adamkit.AdamW([a, b], state_bits=8)
        a.grad = torch.randn_like(a)
        opt.step()  # b has no gradient yet
        change(opt, b)
        b.grad = torch.randn_like(b)
        opt.step()
        return opt.state[b]

    st = fresh_state(lambda o, b: o.param_groups[0].update(block_size=64, quant_map="tapered"))
    assert st["quant_block"] == 64 and st["quant_map"] == 1 and st["exp_avg_absmax"].shape == (128,)
    st = fresh_state(lambda o, b: o.param_groups[0].update(min_quant_size=10_000))
    assert "quant_bits" not in st and st["exp_avg"].dtype == torch.float32
    mng = GlobalOptimManager.get_instance()
    try:
        st = fresh_state(lambda o, b: mng.override_config(b, "optim_bits", 32))
        assert "quant_bits" not in st and st["exp_avg"].dtype == torch.float32
    finally:
        mng.initialize()


def test_format_flags_take_numpy_scalars() -> None:
    import numpy as np

    for value in (np.int64(1), np.bool_(True), np.float32(1.0), 1, True, torch.tensor(1)):
        assert QuantFormat.from_key(8, 256, 0, value).tapered
    for value in (np.int64(2), np.float32(0.5), "1", [1]):
        with pytest.raises(ValueError, match="quant_map must be 0 or 1"):
            QuantFormat.from_key(8, 256, 0, value)
