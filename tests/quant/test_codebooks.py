"""The codebooks (``adamkit/quant/codebooks.py``): the 8-bit maps' facts (bitsandbytes'
``create_dynamic_map``), the 4-bit maps, the dithered maps' 32-cell interval tables,
the search-free encoder tables and the decade encoder's numpy model against a binary
search."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from quant_helpers import encoder_probe

from adamkit.quant import CODEBOOKS, codebook, dither_tables, encoder_table
from adamkit.quant.codebooks import _LOW_BITS, _ONE_BITS, TABLE_BITS, TAPERED8, TAPERED_BITS, UNDITHERED4

#: The nearest-code codebooks (8-bit, the tapered maps, adamkit 0.1's 4-bit ones, the
#: 4-bit dynamic map).
BOOKS = sorted(set(CODEBOOKS[8]) | set(TAPERED8) | set(UNDITHERED4) | {"dynamic4"})
DITHERED = sorted(set(CODEBOOKS[4]))


def test_dynamic8_is_bitsandbytes_map() -> None:
    """Facts of bitsandbytes' create_dynamic_map(signed=True/False) (0.49): 256 sorted
    values, 0 and 1 included, smallest magnitude 10^-6·0.55, largest negative -0.99297."""
    signed, unsigned = codebook("dynamic8").values, codebook("udynamic8").values
    for v in (signed, unsigned):
        assert v.numel() == 256 and bool((v[1:] >= v[:-1]).all()) and v.max() == 1.0
    assert signed.min().item() == pytest.approx(-0.99296875, abs=1e-7)
    assert (signed == 0).sum() == 1 and (unsigned == 0).sum() == 1
    assert signed[signed > 0].min().item() == pytest.approx(5.5e-7, rel=1e-5)
    assert unsigned[1].item() == pytest.approx(3.25e-7, rel=1e-5)  # 2 fraction items in the lowest decade
    assert signed.sum().item() == pytest.approx(0.99296875 - 0.99296875 + 1.0, abs=1e-5)  # symmetric but for +1


def test_4bit_maps() -> None:
    normal, linear = codebook("normal4").values, codebook("sqrt_linear4").values
    assert normal.numel() == 16 and normal[0] == -1 and normal[-1] == 1 and (normal == 0).sum() == 1
    assert torch.equal(linear, torch.arange(1, 17, dtype=torch.float32) / 16)
    assert codebook("sqrt_linear4").root and not codebook("linear4").root
    assert codebook("normal4").zero_code == 7
    assert CODEBOOKS[4] == ("normal4_dither", "sqrt_geo4_dither", "geo4_dither")
    assert torch.equal(codebook("normal4_dither").values, normal)
    geo = codebook("sqrt_geo4_dither").values.double()
    assert geo[0] == pytest.approx(0.25, rel=1e-6) and geo[-1] == 1.0
    ratios = geo[1:] / geo[:-1]
    assert float(ratios.max() - ratios.min()) < 1e-6 and float(ratios[0]) == pytest.approx(4 ** (1 / 15), rel=1e-6)
    assert codebook("sqrt_geo4_dither").root and not codebook("geo4_dither").root
    assert all(codebook(n).dither for n in DITHERED) and not any(codebook(n).dither for n in BOOKS)


@pytest.mark.parametrize("name", DITHERED)
def test_dither_cells_find_the_interval(name: str) -> None:
    """The kernels' 32-cell tables give the interval of ``y`` exactly as a search does:
    every value, its float neighbours, the cell edges and random values."""
    from adamkit.quant.codebooks import cells

    tab = dither_tables(name)
    L = tab.values
    edges = (np.arange(33, dtype=np.float32) - tab.cell_offset) / tab.cell_scale
    probes = np.concatenate([L, edges, np.random.default_rng(2).uniform(-1.01, 1.01, 200_000)]).astype(np.float32)
    y = np.concatenate([probes, np.nextafter(probes, np.float32(2)), np.nextafter(probes, np.float32(-2))])
    if not codebook(name).signed:
        y = np.abs(y)
    c = cells(y, tab)
    got = tab.first[c] + (y >= tab.threshold[c])
    np.testing.assert_array_equal(got, np.searchsorted(L[1:15], y, side="right"))
    with pytest.raises(ValueError, match="dithered"):
        dither_tables("normal4")


@pytest.mark.parametrize("name", BOOKS)
def test_encoder_table_equals_binary_search(name: str) -> None:
    packed, mids, _ = encoder_table(name)
    gen = np.random.default_rng(0)
    y = np.concatenate(
        [gen.uniform(-1, 1, 50_000), gen.standard_normal(20_000) * 1e-4, gen.standard_normal(2_000) * 1e-9,
         [0.0, -0.0, 1.0, -1.0, 1e-40, -1e-40, 1.0000001, -1.5, 2.0], mids[:-1], -mids[:-1],
         np.nextafter(mids[:-1], 2), np.nextafter(mids[:-1], -2)]
    ).astype(np.float32)  # fmt: skip
    if not codebook(name).signed:
        y = np.abs(y)
    bits = y.view(np.uint32).astype(np.int64)
    mag = np.clip(bits & 0x7FFFFFFF, _LOW_BITS, _ONE_BITS)
    half = ((_ONE_BITS - _LOW_BITS) >> (23 - TABLE_BITS)) + 1
    negative = (bits >> 31) == 1
    entry = packed[((mag - _LOW_BITS) >> (23 - TABLE_BITS)) + negative * half].astype(np.int64)
    ylow, tlow = mag & 0xFFFF, entry & 0xFFFF
    codes = (entry >> 16) + np.where(negative, ylow < tlow, ylow > tlow)
    np.testing.assert_array_equal(codes, np.searchsorted(mids[:-1], y, side="left"))


def _near_tie(y: np.ndarray, mids: np.ndarray, rel: float) -> np.ndarray:
    j = np.clip(np.searchsorted(mids, y), 1, mids.size - 1)
    gap = np.minimum(np.abs(y - mids[j]), np.abs(y - mids[j - 1]))
    return gap <= rel * np.maximum(np.abs(y), 1e-30)


@pytest.mark.parametrize("name", ["dynamic8", "udynamic8"])
def test_decade_encoder_model(name: str) -> None:
    """The decade encoder (the SIMD path's model) gives the binary search's codes, except
    one code up within float32 rounding (~1e-5 relative) of a midpoint."""
    from adamkit.quant.codebooks import decade_encode, decade_tables

    y = encoder_probe(name)
    mids = codebook(name).midpoints.numpy()
    exact = np.searchsorted(mids, y, side="left")
    got = decade_encode(y, decade_tables(name)).astype(np.int64)
    off = got != exact
    assert np.abs(got - exact).max() <= 1
    assert _near_tie(y[off], mids, 2e-5).all(), y[off][~_near_tie(y[off], mids, 2e-5)][:5]
    assert off.sum() <= 2 * mids.size + 1e-4 * y.size  # the exact midpoints, and a few more
    with pytest.raises(ValueError):
        decade_tables("normal4")


@pytest.mark.parametrize("name", ["tapered8", "utapered8"])
def test_tapered_maps(name: str) -> None:
    """The tapered maps: 256 sorted exact binary fractions in [-1, 1] (or [0, 1]), 0 and
    1 among them; each binade below 1 holds 2^b evenly spaced values, b tapering from 5;
    signed: symmetric, -1 twice (code 0 is y = -1 exactly)."""
    book = codebook(name)
    v = book.values.double()
    assert v.numel() == 256 and bool((v[1:] >= v[:-1]).all())
    assert float(v[-1]) == 1.0 and 0.0 in v.tolist()
    bits = TAPERED_BITS[name]
    mags = v[v > 0]
    for k, b in enumerate(bits):
        inside = mags[(mags >= 2.0 ** -(k + 1)) & (mags < 2.0**-k)]
        assert inside.numel() == 2**b, (k, inside.numel())
        steps = (inside * 2.0 ** (k + 1 + b)).round() - inside * 2.0 ** (k + 1 + b)
        assert float(steps.abs().max()) == 0.0  # on the b-bit grid of the binade
    assert float(mags.min()) == 2.0 ** -len(bits)
    if book.signed:
        assert v[0] == v[1] == -1.0 and book.zero_code == 128
        assert torch.equal(-v[1:128].flip(0), v[129:])
    else:
        assert float(v[0]) == 0.0 and mags.numel() == 255
    mids = book.midpoints.double()
    assert torch.equal(mids, (v[:-1] + v[1:]) / 2)  # every midpoint a float32 number


@pytest.mark.parametrize("name", ["tapered8", "utapered8"])
def test_tapered_encoder_model(name: str) -> None:
    """The tapered encoder's integer model (the SIMD path's) gives the binary search's
    codes exactly: every midpoint and its neighbours, 0 and -0, +-1 and just past them,
    magnitudes down to 1e-40."""
    from adamkit.quant.codebooks import tapered_encode, tapered_tables

    y = encoder_probe(name)
    past = np.array([1.0000001, -1.0000001, 1.5, -1.5, -1.0, 1.0, 2.0**-25, -(2.0**-25), 2.0**-22, -(2.0**-22)])
    y = np.concatenate([y, past if codebook(name).signed else np.abs(past)]).astype(np.float32)
    mids = codebook(name).midpoints.numpy()
    np.testing.assert_array_equal(tapered_encode(y, name), np.searchsorted(mids, y, side="left"))
    with pytest.raises(ValueError, match="tapered"):
        tapered_tables("dynamic8")
