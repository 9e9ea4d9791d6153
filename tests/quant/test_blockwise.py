"""The reference block-wise codec (``adamkit/quant/blockwise.py``): round trips over
sizes and block sizes, 4-bit nibble order, the dither averaging out across steps,
second moments kept off code 0, non-finite values saturated, subnormal blocks, format
validation."""

from __future__ import annotations

import math

import pytest
import torch

from adamkit.quant import QuantFormat, codebook, dequantize, quantize, unpack


def test_dither_is_unbiased_across_steps() -> None:
    """Dithered codes of one tensor, written at 64 different steps, decode (each with its
    step) to values whose mean is far closer to the tensor than any one decoding: the
    error is fresh each step. Decoding with another step's dither is worse. (The
    second moment's data stay above the map's floor, 1/16 of the block's largest.)"""
    fmt = QuantFormat(4, 128)
    x = torch.randn(4096, generator=torch.Generator().manual_seed(3))
    for key in ("exp_avg", "exp_avg_sq"):
        book = fmt.codebook(key)
        data = x if book.signed else x.abs() + 1.0
        decoded = [dequantize(*quantize(data, fmt, book, t), fmt, book, data.numel(), t) for t in range(64)]
        one = max(float((d - data).norm()) for d in decoded)
        mean = float((torch.stack(decoded).mean(0) - data).norm())
        assert mean < one / 4, (key, mean, one)
        wrong = float((dequantize(*quantize(data, fmt, book, 5), fmt, book, data.numel(), 6) - data).norm())
        assert wrong > 1.3 * float((decoded[5] - data).norm()), key


@pytest.mark.parametrize("name", ["sqrt_geo4_dither", "geo4_dither"])
def test_4bit_second_moment_maps_never_decode_to_zero(name: str) -> None:
    """The 4-bit maps of second moments have no zero, and a dithered code's half step of
    extrapolation below the lowest value stays above 0: a positive block never decodes
    an element to 0 (root: 0.238² of the absmax at least)."""
    fmt, book = QuantFormat(4, 128), codebook(name)
    n = 4096
    for step in (0, 1, 12345):
        lowest = torch.zeros(n // 2, dtype=torch.uint8)
        back = dequantize(lowest, torch.ones(fmt.blocks(n)), fmt, book, n, step)
        assert float(back.min()) > (0.23**2 if book.root else 0.23)


def test_small_second_moments_keep_a_nonzero_code() -> None:
    """In the unsigned 8-bit map (code 0 is 0, code 1 is 3.25e-7 of the absmax) a value
    above 0 takes code 1 at least, where it would round to 0: a second moment decoded
    as 0 turns ``m / (sqrt(v) + ε)`` into ``m / ε``. bitsandbytes, with the same map,
    keeps a nonzero code too."""
    fmt = QuantFormat(8, 256)
    book = fmt.codebook("exp_avg_sq")
    assert book.name == "udynamic8" and float(book.values[0]) == 0.0
    assert float(book.values[1]) == pytest.approx(3.25e-7, rel=1e-2)
    x = torch.cat([torch.tensor([1.0, 0.0, 1e-7, 1e-30, 1e-45]), torch.logspace(-20, 0, 251)])
    codes, absmax = quantize(x, fmt, book)
    nearest = torch.searchsorted(book.midpoints, x)
    assert torch.equal(codes.long(), torch.where(x > 0, nearest.clamp(min=1), nearest))
    assert codes[1] == 0 and (codes[x > 0] >= 1).all()
    assert torch.equal(dequantize(codes, absmax, fmt, book, x.numel()) > 0, x > 0)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_saturates_nonfinite_values(bits: int) -> None:
    """A NaN or ±inf is stored as ± its block's largest finite magnitude (NaN as +; a
    root codebook's root of -inf is NaN): the absmax stays finite and the rest of the
    block, at 4 bits the neighbouring nibble too, encodes as it would without it."""
    fmt = QuantFormat(bits, 64)
    data = torch.randn(300, generator=torch.Generator().manual_seed(3))
    spots, values = [5, 6, 7, 100, 201, 299], [math.nan, math.inf, -math.inf, math.nan, math.inf, -math.inf]
    for key in ("exp_avg", "exp_avg_sq"):
        book = fmt.codebook(key)
        x = data if book.signed else data.abs()
        poisoned, tame = x.clone(), x.clone()
        poisoned[spots] = torch.tensor(values)
        for i, value in zip(spots, values):
            block = slice(i // 64 * 64, i // 64 * 64 + 64)
            top = poisoned[block][poisoned[block].isfinite()].abs().max()
            tame[i] = top if book.root or not value < 0 else -top
        codes, absmax = quantize(poisoned, fmt, book, step=3)
        assert torch.isfinite(absmax).all()
        want_codes, want_absmax = quantize(tame, fmt, book, step=3)
        assert torch.equal(codes, want_codes) and torch.equal(absmax, want_absmax), key


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_scales_subnormal_blocks_exactly(bits: int) -> None:
    """A block whose absmax is subnormal (``1 / absmax`` would overflow) is encoded as
    the block times 2^64: the same codes, its own absmax, the same relative error."""
    fmt = QuantFormat(bits, 128)
    x = torch.randn(256, generator=torch.Generator().manual_seed(4)) * 1e-40
    assert x.abs().max() < 2.0**-126 and (x != 0).all()
    for key in ("exp_avg", "exp_inf"):  # the signed map and the unsigned one (not a root)
        book = fmt.codebook(key)
        data = x if book.signed else x.abs()
        codes, absmax = quantize(data, fmt, book, step=2)
        up_codes, up_absmax = quantize(data * 2.0**64, fmt, book, step=2)
        assert torch.equal(codes, up_codes) and torch.equal(absmax * 2.0**64, up_absmax)
        back = dequantize(codes, absmax, fmt, book, data.numel(), step=2)
        assert ((back - data).abs() <= (0.3 if bits == 4 else 0.05) * data.abs().max()).all()


@pytest.mark.parametrize("bits,block", [(8, 256), (8, 64), (4, 128), (4, 2), (8, None), (4, None)])
@pytest.mark.parametrize("n", [0, 1, 255, 256, 4097])
def test_codec_round_trip(bits: int, block: int | None, n: int) -> None:
    fmt = QuantFormat(bits, block)
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    for key in ("exp_avg", "exp_avg_sq"):
        book = fmt.codebook(key)
        data = x if book.signed else x.abs()
        codes, absmax = quantize(data, fmt, book)
        assert codes.dtype == torch.uint8 and codes.numel() == fmt.code_bytes(n)
        assert absmax.dtype == torch.float32 and absmax.numel() == fmt.blocks(n)
        back = dequantize(codes, absmax, fmt, book, n)
        if n:
            scale = data.abs().max()
            assert (back - data).abs().max() <= scale * (0.3 if bits == 4 else 0.05)
            # the absmax element decodes exactly (the signed 8-bit map's lowest value is
            # -0.993); dithered, within half the top interval
            rel = 0.15 if book.dither else 1e-2 if book.signed else 1e-6
            assert back.abs().max() == pytest.approx(float(scale), rel=rel)
            # re-encoding decoded values gives the same codes, give or take one where the
            # block's absmax moved (a negative extreme decodes to -0.993 of it)
            again, _ = quantize(back, fmt, book)
            assert (unpack(again, fmt, n) - unpack(codes, fmt, n)).abs().max() <= 1


def test_4bit_packing_order() -> None:
    fmt = QuantFormat(4, 4, dither=False)
    book = fmt.codebook("exp_avg_sq")  # sqrt_linear4: sqrt(x) / absmax -> (i + 1) / 16
    x = torch.tensor([1.0, 4 / 16, 9 / 16, 0.0, 1.0]) ** 2  # roots 1, 1/4, 9/16, 0 | 1
    codes, absmax = quantize(x, fmt, book)
    assert codes.tolist() == [15 | (3 << 4), 8 | (0 << 4), 15]
    assert absmax.tolist() == [1.0, 1.0]


def test_format_validation() -> None:
    with pytest.raises(ValueError, match="block_size must be even"):
        QuantFormat(4, 3)
    with pytest.raises(ValueError, match="block_size must be an int >= 2"):
        QuantFormat(8, 1)
    with pytest.raises(ValueError, match="has \\(8, 4\\) bits"):
        QuantFormat(2, 64)
    with pytest.raises(ValueError, match="True only at 4 bits"):
        QuantFormat(8, 64, dither=True)
    with pytest.raises(ValueError, match="quant_dither must be 0 or 1"):
        QuantFormat.from_key(4, 128, 2)
    assert QuantFormat(4, 128).dither and not QuantFormat(8, 256).dither
    assert QuantFormat.from_key(4, 128) == QuantFormat(4, 128, dither=False)  # a checkpoint of adamkit 0.1
