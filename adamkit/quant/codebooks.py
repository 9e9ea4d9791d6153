"""Codebooks: the values a quantized state element can take, as a sorted float32 table.

A code is an index into a codebook; a block of state is stored as codes plus one
float32 ``absmax`` per block, and decodes to ``codebook[code] · absmax`` (dithered
codes: to a point between the values).

* **Dynamic (tree) maps** — Dettmers 2016, used by bitsandbytes' 8-bit optimizers and
  here for every 8-bit state. Of the ``bits - 1`` bits after
  the sign, ``E`` pick a decade ``10^-(E-1) … 10^0`` and the rest split that decade
  ``[0.1, 1)`` linearly, one more fraction bit per decade upwards; the table also holds
  0 and 1. The signed map spends the sign bit on the sign; the unsigned map (second
  moments, maxima, Adamax's ``exp_inf``) spends it on one more fraction bit. With
  ``bits=8, E=7`` these are bitsandbytes' ``create_dynamic_map(signed=True/False)``,
  value for value (float32 arithmetic as there).
* **4 bits, dithered** (:mod:`adamkit.quant.blockwise`: codes are dithered positions
  between the values, not the nearest value):

  - the first moment: a normal-quantile map (``normal4_dither``): the 16 values are
    quantiles of a standard normal scaled to [-1, 1], with an exact 0 (the NF4
    construction of QLoRA, Dettmers et al. 2023). A block of 128 first-moment values
    divided by its absmax is close to normal.
  - the second moment and AMSGrad's maximum: a geometric map on the square root
    (``sqrt_geo4_dither``): ``0.25 · 4^(i/15)`` encodes ``sqrt(v) / absmax``, where
    ``absmax`` is the block's largest ``sqrt(v)``. No zero: Li et al. 2023 ("Memory
    Efficient Optimizers with 4-bit States", §4.2) showed the zero point is the danger,
    a second moment rounded to zero turning ``m / (sqrt(v) + ε)`` into ``m / ε``; here
    nothing decodes below 0.238 of the block's largest root. The root halves the dynamic
    range the 16 values must cover, and the update needs ``sqrt(v)`` anyway; constant
    ratios give every magnitude the same relative resolution. Adamax's ``exp_inf``
    (already a magnitude) uses the same map without the root (``geo4_dither``).

  On the accuracy workload of ``adamkit bench`` (relative L2 error of 100 AdamW updates
  against fp32), quantizing one moment at a time: first moment, nearest ``normal4``
  0.124 -> dithered 0.095; second moment, nearest ``sqrt_linear4`` 0.100 -> dithered
  geometric 0.062; both 0.111 (torchao's AdamW4bit: 0.24). Dithering a linear map, or
  clamping the decoded values at the ends, did worse (0.22, 0.18).
* **adamkit 0.1's 4-bit maps** (``normal4``, ``sqrt_linear4`` = ``(i + 1) / 16`` on the
  root, ``linear4``), nearest codes: kept to decode such checkpoints
  (:data:`UNDITHERED4`).

Every codebook is deterministic from its description: nothing is stored in
checkpoints but the codes, the absmax values and the format.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from torch import Tensor


def dynamic_map(signed: bool, bits: int = 8, exponent_bits: int | None = None) -> Tensor:
    """The dynamic (tree) quantization map with ``2^bits`` sorted float32 values.

    Args:
        signed: values in [-1, 1] (a sign bit) or in [0, 1].
        bits: bits per code.
        exponent_bits: decades ``E`` (default ``bits - 1``): the smallest nonzero
            magnitude is about ``0.1 · 10^-(E-1)``.
    """
    fraction = bits - 1  # bits after the sign
    exponent_bits = fraction if exponent_bits is None else exponent_bits
    if not 1 <= exponent_bits <= fraction:
        raise ValueError(f"exponent_bits must be in [1, {fraction}], got {exponent_bits}")
    values: list[Tensor] = []

    def decade(scale_exponent: int, count: int) -> None:
        edges = torch.linspace(0.1, 1.0, count + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        scaled = torch.tensor(10.0**scale_exponent, dtype=torch.float32) * means
        values.append(scaled)
        if signed:
            values.append(-scaled)

    lowest = -(exponent_bits - 1)
    for i in range(exponent_bits):
        decade(lowest + i, 2 ** (i + fraction - exponent_bits + (0 if signed else 1)))
    extra = 2 ** (fraction - exponent_bits) - 1  # codes left when fewer decades than bits
    if extra > 0:
        decade(lowest + exponent_bits - 1, extra)
    values.append(torch.tensor([0.0, 1.0]))
    out = torch.cat(values)
    if out.numel() > 2**bits:
        raise AssertionError(f"dynamic map overflows {bits} bits")
    out = torch.cat([out, torch.zeros(2**bits - out.numel())])  # unused codes decode to 0
    return out.sort().values


def normal_map(bits: int = 4, tail: float = 0.9677083) -> Tensor:
    """``2^bits`` sorted float32 values: standard-normal quantiles scaled to [-1, 1].

    ``2^(bits-1)`` positive values are the quantiles at probabilities evenly spaced from
    ``tail`` down to 0.5 (exclusive), ``2^(bits-1) - 1`` negative ones likewise, plus an
    exact zero; all divided by the largest magnitude, so -1 and 1 are both values.
    """
    half = 2 ** (bits - 1)
    positive = torch.special.ndtri(torch.linspace(tail, 0.5, half + 1, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(tail, 0.5, half, dtype=torch.float64)[:-1])
    values = torch.cat([positive, negative, torch.zeros(1, dtype=torch.float64)])
    return (values / values.abs().max()).float().sort().values


def linear_map(bits: int) -> Tensor:
    """``(i + 1) / 2^bits`` for ``i < 2^bits``: unsigned, linear, without zero."""
    n = 2**bits
    return (torch.arange(1, n + 1, dtype=torch.float64) / n).float()


def geometric_map(bits: int = 4, lowest: float = 0.25) -> Tensor:
    """``2^bits`` values from ``lowest`` to 1, each a constant factor above the last."""
    n = 2**bits
    return (lowest ** (1.0 - torch.arange(n, dtype=torch.float64) / (n - 1))).float()


#: Mantissa bits of each binade of the tapered maps, from ``[1/2, 1)`` down (see
#: :func:`tapered_map`): the first moment's (``tapered8``, 21 binades) and the second
#: moment's (``utapered8``, 24 binades: a second moment spans twice the decades).
TAPERED_BITS: dict[str, tuple[int, ...]] = {
    "tapered8": (5, 4, 4, 3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0),
    "utapered8": (5, 5, 5, 5, 4, 4, 4, 4, 3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 0, 0),
}


def _tapered_magnitudes(bits: tuple[int, ...]) -> list[float]:
    """0, each binade's values from the lowest binade up, then 1."""
    mags = [0.0]
    for k in reversed(range(len(bits))):  # binade [2^-(k+1), 2^-k)
        step = 2.0 ** -bits[k]
        mags += [2.0 ** -(k + 1) * (1.0 + j * step) for j in range(2 ** bits[k])]
    return mags + [1.0]


def tapered_map(signed: bool) -> Tensor:
    """An 8-bit tapered float map: 256 sorted float32 values (exact binary fractions).

    Each binade ``[2^-(k+1), 2^-k)`` below 1 holds ``2^b[k]`` evenly spaced values
    (``b`` = :data:`TAPERED_BITS`, from 5 bits in ``[1/2, 1)`` tapering to 0), like a
    float whose mantissa shortens as its exponent falls, plus 0 and 1. Nearest codes
    are then computed from a float32's bits (exponent: which binade; the top ``b[k]``
    mantissa bits, rounded: where in it) with no search or table of values. Signed
    (first moments): 127 magnitudes each side of 0, and -1 twice (code 0 is reached by
    ``y = -1`` exactly, code 1 just above it, both decode to -1); unsigned: 256
    magnitudes.
    """
    mags = torch.tensor(_tapered_magnitudes(TAPERED_BITS["tapered8" if signed else "utapered8"]))
    if signed:
        out = torch.cat([-mags[-1:], -mags.flip(0)[:-1], mags])
    else:
        out = mags
    if out.numel() != 256:
        raise AssertionError(f"a tapered map holds 256 values, not {out.numel()}")
    return out.float()


@dataclass(frozen=True)
class Codebook:
    """A sorted float32 table of code values and what its encoders need.

    Attributes:
        name: the codebook's name (:data:`CODEBOOKS`).
        values: float32 [2^bits], sorted ascending.
        signed: whether it holds negative values.
        root: whether it encodes the square root of the state (decoding squares).
        dither: whether codes are dithered positions between the values
            (:mod:`adamkit.quant.blockwise`), not the nearest value.
    """

    name: str
    values: Tensor
    signed: bool
    root: bool = False
    dither: bool = False

    @property
    def bits(self) -> int:
        return int(self.values.numel()).bit_length() - 1

    @property
    def midpoints(self) -> Tensor:
        """float32 [2^bits - 1]: the decision boundaries, ``(values[i] + values[i+1]) / 2``
        in float32. A value encodes to the number of midpoints strictly below it."""
        v = self.values
        return (v[:-1] + v[1:]) / 2.0

    @property
    def zero_code(self) -> int:
        """The code of the value nearest zero (what an all-zero block encodes to)."""
        return int(torch.searchsorted(self.midpoints, torch.zeros(1), right=False))


_MAKERS = {
    "dynamic8": lambda: dynamic_map(True, 8),
    "udynamic8": lambda: dynamic_map(False, 8),
    "dynamic4": lambda: dynamic_map(True, 4),
    "normal4": lambda: normal_map(4),
    "linear4": lambda: linear_map(4),
    "sqrt_linear4": lambda: linear_map(4),
    "normal4_dither": lambda: normal_map(4),
    "sqrt_geo4_dither": lambda: geometric_map(4, 0.25),
    "geo4_dither": lambda: geometric_map(4, 0.25),
    "tapered8": lambda: tapered_map(True),
    "utapered8": lambda: tapered_map(False),
}

#: Codebook names per state bits: first moment, second moment (and its AMSGrad
#: maximum), Adamax's infinity norm.
CODEBOOKS: dict[int, tuple[str, str, str]] = {
    8: ("dynamic8", "udynamic8", "udynamic8"),
    4: ("normal4_dither", "sqrt_geo4_dither", "geo4_dither"),
}
#: The roles of state keys' codebooks (:data:`adamkit.spec.BOOK_ROLES` names each key's),
#: in the order of :data:`CODEBOOKS`' entries.
ROLES = ("signed", "unsigned", "norm")
#: The 4-bit codebooks of adamkit 0.1's checkpoints (nearest codes, no dither): such
#: state is decoded with them and encoded again in the current format when loaded.
UNDITHERED4 = ("normal4", "sqrt_linear4", "linear4")
#: The 8-bit tapered maps (``quant_map="tapered"``), in the order of :data:`CODEBOOKS`'
#: entries.
TAPERED8 = ("tapered8", "utapered8", "utapered8")


@cache
def codebook(name: str) -> Codebook:
    """The codebook called ``name`` (a key of ``CODEBOOKS``' entries, or ``dynamic4``)."""
    if name not in _MAKERS:
        raise ValueError(f"unknown codebook {name!r}; known: {sorted(_MAKERS)}")
    values = _MAKERS[name]()
    return Codebook(
        name, values, bool((values < 0).any()), root=name.startswith("sqrt_"), dither=name.endswith("_dither")
    )


# ------------------------------------------------------------------ dither
#: The dither sequence's multipliers: ``2^32`` times the plastic number's inverse
#: (``0.7548776662``, along the tensor) and the golden ratio's (``0.6180339887``, along
#: the steps), rounded: the two most evenly spread additive sequences in one and two
#: dimensions (R2 / golden-ratio sequences).
DITHER_ALONG = 3242174889
DITHER_STEP = 2654435769


def dither_phase(step: int, first_index: int = 0) -> int:
    """The step's term of the dither sequence, ``step · DITHER_STEP mod 2^32``, plus that
    of the first element's index ``first_index · DITHER_ALONG`` (a shard of a tensor)."""
    return (int(step) * DITHER_STEP + int(first_index) * DITHER_ALONG) & 0xFFFFFFFF


@dataclass(frozen=True)
class DitherTables:
    """A dithered 4-bit codebook's tables (float32 / int32, 16 or 32 entries), for the
    reference codec and the kernels; ``L`` are the codebook's values.

    Attributes:
        values: ``L``.
        rate, offset: per interval ``k < 15``: ``2^16 / (L[k+1] - L[k])`` and
            ``2^16 · k - L[k] · rate[k]`` (float64, then rounded), so that
            ``y · rate[k] + offset[k]`` is ``y``'s position in units of 2^-16 codes.
        up, down: per code ``c``: the slope in value per 2^-16 code above ``L[c]``
            (``(L[c+1] - L[c]) / 2^16``; at 15, the last interval's) and below it (the
            interval ``c - 1``'s; at 0, the first's).
        cell_scale, cell_offset: ``cell = trunc(y · cell_scale + cell_offset)`` for
            ``L[0] <= y <= 1`` splits ``[L[0], 1]`` into 32 cells (0..31), monotone in
            ``y``.
        first, threshold: [32] per cell: the count of ``L[1..14]`` in lower cells, and
            the one inside it (+inf if none), so that ``first[cell] + (y >= threshold[cell])``
            is the number of ``L[1..14]`` at or below ``y``: ``y``'s interval without a
            search (exact, the cell being monotone in ``y``; asserted: no cell holds
            two values).
    """

    values: np.ndarray
    rate: np.ndarray
    offset: np.ndarray
    up: np.ndarray
    down: np.ndarray
    cell_scale: np.float32
    cell_offset: np.float32
    first: np.ndarray
    threshold: np.ndarray


def cells(y: np.ndarray, tables: DitherTables) -> np.ndarray:
    """The cell of each float32 ``y`` (clamped up to ``L[0]`` first), with the kernels'
    float32 operations."""
    y = np.maximum(np.asarray(y, dtype=np.float32), tables.values[0])
    z = y * tables.cell_scale + tables.cell_offset
    return np.clip(np.trunc(z), 0, 31).astype(np.int32)


@cache
def dither_tables(name: str) -> DitherTables:
    """The tables of a dithered 4-bit codebook (see :class:`DitherTables`)."""
    book = codebook(name)
    if not book.dither or book.bits != 4:
        raise ValueError(f"dither tables describe the dithered 4-bit codebooks, not {name!r}")
    L = book.values.numpy().astype(np.float32)
    L64 = L.astype(np.float64)
    rate64 = 65536.0 / (L64[1:] - L64[:-1])
    rate = np.zeros(16, dtype=np.float32)
    offset = np.zeros(16, dtype=np.float32)
    rate[:15] = rate64
    offset[:15] = 65536.0 * np.arange(15) - L64[:-1] * rate64
    slope = ((L64[1:] - L64[:-1]) / 65536.0).astype(np.float32)
    up = np.append(slope, slope[-1]).astype(np.float32)
    down = np.insert(slope, 0, slope[0]).astype(np.float32)
    scale = np.float32(32.0 * (1.0 - 2.0**-12) / (1.0 - L64[0]))  # 1.0 lands in cell 31
    partial = DitherTables(L, rate, offset, up, down, scale, np.float32(-L64[0] * float(scale)), None, None)
    z = np.array([L[0], 1.0001], dtype=np.float32) * scale + partial.cell_offset
    if not (z[0] > -1.0 and z[1] < 32.0):  # the kernels do not clamp the cell
        raise AssertionError(f"{name}: cells do not span 0..31")
    where = cells(L[1:15], partial)
    if np.bincount(where, minlength=32).max() > 1:
        raise AssertionError(f"{name}: a cell holds two values")
    first = np.searchsorted(where, np.arange(32), side="left").astype(np.int32)
    threshold = np.full(32, np.inf, dtype=np.float32)
    threshold[where] = L[1:15]
    return DitherTables(L, rate, offset, up, down, scale, partial.cell_offset, first, threshold)


# ------------------------------------------------------------------ encoder tables
#: Fraction bits of ``|y|`` that index the encoder's table (see :func:`encoder_table`).
TABLE_BITS = 7
#: Magnitudes below 2^LOWEST_EXPONENT encode as zero would: every codebook's smallest
#: nonzero midpoint lies above it (checked when a table is built).
LOWEST_EXPONENT = -26
_LOW_BITS = (127 + LOWEST_EXPONENT) << 23
_ONE_BITS = 127 << 23


@cache
def encoder_table(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tables for encoding without a search: (packed int32, midpoints float32 padded with
    +inf, values float32).

    A normalized value ``y ∈ [-1, 1]`` is located by its float32 bits: the magnitude's
    bits are clamped to ``[2^LOWEST_EXPONENT, 1]``, offset and shifted right by
    ``23 - TABLE_BITS``, giving one of ``2^TABLE_BITS`` slices per binade; the sign picks
    one of two halves. No slice holds more than one midpoint (asserted). Each entry packs

    * ``candidate << 16``: the number of midpoints below the slice's lowest value, and
    * the low 16 bits of the magnitude of the midpoint inside the slice, if any.

    All magnitudes in a slice share their top 16 bits, so comparing the low 16 bits of
    ``|y|`` with the entry's decides ``y > midpoint`` exactly (reversed below zero); a
    slice without a midpoint stores 0xFFFF (0 below zero), which no value passes::

        code = candidate + (low16(|y|) > low) if y >= 0 else candidate + (low16(|y|) < low)

    is the nearest code (ties to the lower one), exactly as a binary search over the
    midpoints, in one table load instead of eight dependent ones.
    """
    book = codebook(name)
    mids = book.midpoints.numpy().astype(np.float32)
    shift = 23 - TABLE_BITS
    half = ((_ONE_BITS - _LOW_BITS) >> shift) + 1  # slices per sign
    starts = (_LOW_BITS + (np.arange(half, dtype=np.int64) << shift)).astype(np.uint32)
    ends = starts + np.uint32((1 << shift) - 1)  # the slice's largest magnitude
    lo_mag, hi_mag = starts.view(np.float32), ends.view(np.float32)
    packed = np.empty(2 * half, dtype=np.int64)
    for part, (lowest, highest) in enumerate(((lo_mag, hi_mag), (-hi_mag, -lo_mag))):
        first = np.searchsorted(mids, lowest, side="left")  # midpoints < lowest
        inside = np.searchsorted(mids, highest, side="right") - first  # lowest <= midpoint <= highest
        if inside.max() > 1:
            raise AssertionError(f"{name}: a table slice holds more than one midpoint")
        if inside[0]:  # the first slice also takes every smaller magnitude (clamped up)
            raise AssertionError(f"{name}: a midpoint lies in the lowest slice")
        mid_bits = np.abs(mids[np.minimum(first, mids.size - 1)]).view(np.uint32).astype(np.int64) & 0xFFFF
        low = np.where(inside == 1, mid_bits, 0xFFFF if part == 0 else 0)
        packed[part * half : (part + 1) * half] = (first << 16) | low
    padded = np.concatenate([mids, [np.inf]]).astype(np.float32)
    return packed.astype(np.int32), padded, book.values.numpy().astype(np.float32)


# ------------------------------------------------------------------ decade tables
#: Binades the decade encoder tells apart: ``|y|`` below 2^-31 is treated as 2^-31.
DECADE_BINADES = 32
_DECADE_FLOOR_BITS = (127 - DECADE_BINADES + 1) << 23


@dataclass(frozen=True)
class DecadeTables:
    """A dynamic map as piecewise-linear functions, for encoding with register permutes
    (see :func:`decade_tables`). Arrays are float32 / int32, all tables fit registers.

    Attributes:
        threshold: [32] per binade of ``|y|``: the one decade boundary inside it (a
            float32 midpoint of the codebook), or +inf.
        first: [32] per binade: the decade of the binade's lowest values.
        slope, offset: [16] per decade (8 used): ``t = |y| · slope - offset`` is, within
            the decade, the position among the positive values, with the midpoints at
            integers: ``ceil(t) - 1`` is the nearest value below a tie (``t <= 0``:
            zero, which the lowest decade takes).
        top: [16] per decade: ``t`` is clamped to it (just below the decade's end).
        signed: the codebook's sign: positive codes are ``255 - trunc(128 - t)``,
            negative ones ``min(t + 1, 127.5)`` truncated, bits flipped ``^ 0x7F``;
            unsigned ones ``256 - trunc(256 - t)``.
        bounds: [8] per decade: the boundary above it (+inf for the last), so that
            ``threshold[b]`` is ``bounds[first[b]]`` where finite, and where infinite
            ``bounds[first[b]]`` lies above the binade: the AVX2 encoder's form.
    """

    threshold: np.ndarray
    first: np.ndarray
    slope: np.ndarray
    offset: np.ndarray
    top: np.ndarray
    signed: bool
    bounds: np.ndarray


@cache
def decade_tables(name: str) -> DecadeTables:
    """The decade encoder's tables for an 8-bit dynamic map (``dynamic8``, ``udynamic8``).

    A dynamic map's positive values are, per decade ``[0.1, 1) · s``, ``n`` values evenly
    spaced at ``s · (0.1 + 0.9 (k + 0.5) / n)``, plus 0 and 1; so inside a decade the
    nearest value's index is linear in ``|y|``: ``(|y| - 0.1 s) · n / (0.9 s)``, its
    midpoints at integers. Which decade: a binade ``[2^e, 2^(e+1))`` of ``|y|`` holds at
    most one decade boundary (the float32 midpoint between the decades' outer values), so
    the float's exponent indexes two 32-entry tables (boundary, decade below it) and one
    compare finishes. ``1`` is a one-value decade with slope 0; ``0`` joins the lowest
    decade, whose line runs through position 0 at zero's midpoint and 1 at the next one
    (8 decades in all: a single ``vpermps`` looks each table up with AVX2).

    Codes equal the binary search's except within float32 rounding of ``t`` (a few
    units in the last place) of a midpoint: ties may go one code up, as rounding allows
    (:func:`decade_encode` is the model the tests hold the SIMD encoder to).
    """
    book = codebook(name)
    if book.bits != 8 or not name.endswith("dynamic8"):
        raise ValueError(f"decade tables describe the 8-bit dynamic maps, not {name!r}")
    positive = book.values.numpy().astype(np.float64)
    positive = positive[positive > 0]
    slope: list[float] = []
    offset: list[float] = []
    top: list[float] = []
    lowest: list[float] = []
    start = 0
    while start < positive.size:
        if positive[start] == 1.0:
            count, s = 1, None
        else:
            exponent = np.floor(np.log10(positive[start] * (1 + 1e-6)))
            count = int((np.floor(np.log10(positive[start:] * (1 + 1e-6))) == exponent).sum())
            s = 10.0 ** (exponent + 1)
        if s is None:  # the value 1: a constant position
            slope.append(0.0)
            offset.append(-(start + 0.5))
        elif start == 0:  # the lowest decade also takes zero: t through 0 at zero's midpoint
            zero_mid, next_mid = positive[0] / 2, (positive[0] + positive[1]) / 2
            slope.append(1.0 / (next_mid - zero_mid))
            offset.append(zero_mid / (next_mid - zero_mid))
        else:
            w = count / (0.9 * s)
            slope.append(w)
            offset.append(0.1 * s * w - start)
        top.append(start + count - 0.001)
        lowest.append(positive[start])
        start += count
    if len(slope) > 8:  # the AVX2 encoder looks each table up with one 8-entry vpermps
        raise AssertionError(f"{name}: more than 8 decades")
    ladder = np.concatenate([[0.0], positive]).astype(np.float32)
    bounds = []
    for value in lowest[1:]:
        k = int(np.searchsorted(ladder, np.float32(value)))
        bounds.append((ladder[k - 1] + ladder[k]) / np.float32(2.0))
    threshold = np.full(DECADE_BINADES, np.inf, dtype=np.float32)
    first = np.zeros(DECADE_BINADES, dtype=np.int32)
    for b in range(DECADE_BINADES):
        lo = np.float32(2.0 ** (b - DECADE_BINADES + 1))
        hi = np.float32(2.0 * lo)
        first[b] = sum(1 for x in bounds if x < lo)
        inside = [x for x in bounds if lo <= x < hi]
        if len(inside) > 1:
            raise AssertionError(f"{name}: two decade boundaries in one binade")
        if inside:
            threshold[b] = inside[0]

    def pad(values: list[float]) -> np.ndarray:
        return np.array(values + [0.0] * (16 - len(values)), dtype=np.float32)

    above = np.array(bounds + [np.inf] * (8 - len(bounds)), dtype=np.float32)
    return DecadeTables(threshold, first, pad(slope), pad(offset), pad(top), book.signed, above)


def decade_encode(y: np.ndarray, tables: DecadeTables) -> np.ndarray:
    """The decade encoder on float32 ``y`` in numpy: the model of the kernels' SIMD code,
    operation for operation (uint8 codes)."""
    y = np.ascontiguousarray(y, dtype=np.float32)
    bits = y.view(np.uint32)
    mag = np.maximum(bits & np.uint32(0x7FFFFFFF), np.uint32(_DECADE_FLOOR_BITS))
    a = mag.view(np.float32)
    binade = (mag >> np.uint32(23)).astype(np.int64) & (DECADE_BINADES - 1)
    decade = tables.first[binade] + (a > tables.threshold[binade])
    t = a * tables.slope[decade] - tables.offset[decade]
    t = np.where(t < tables.top[decade], t, tables.top[decade]).astype(np.float32)
    if not tables.signed:
        return (-(np.float32(256.0) - t).astype(np.int32) & 255).astype(np.uint8)
    up = 255 - (np.float32(128.0) - t).astype(np.int32)
    down = np.minimum(t + np.float32(1.0), np.float32(127.5)).astype(np.int32) ^ 0x7F
    return np.where(bits >> np.uint32(31) == 1, down, up).astype(np.uint8)


# ------------------------------------------------------------------ tapered tables
@dataclass(frozen=True)
class TaperedTables:
    """A tapered map's encoder as integer operations on float32 bits (see
    :func:`tapered_tables`). int32 arrays of 32 entries, indexed by a float's biased
    exponent ``E`` modulo 32 (for ``E`` in ``[low, 127]``).

    Attributes:
        shift, bias, delta: the magnitude's index among the map's magnitudes (0: zero)
            is ``((bits + bias[E]) >> shift[E]) + delta[E]``, ``bits`` those of ``|y|``
            raised to ``low << 23`` at least; one more in ``bias`` rounds ties up.
        low: the exponent below which every magnitude is 0 (the clamp).
        top: the index of 1 (one more: just above 1; below zero, -1 itself).
        signed: codes are ``128 ± index`` (below zero rounding ties to the larger
            magnitude), else the index itself; at most 255.
    """

    shift: np.ndarray
    bias: np.ndarray
    delta: np.ndarray
    low: int
    top: int
    signed: bool


@cache
def tapered_tables(name: str) -> TaperedTables:
    """The bit-arithmetic encoder of a tapered map (``tapered8``, ``utapered8``).

    In a binade ``[2^e, 2^(e+1))`` of ``b`` mantissa bits the values sit on the float32
    grid of ``b`` bits, so adding half a step less one unit to the bits and shifting
    right by ``23 - b`` rounds to the nearest one, ties down (the carry out of the
    mantissa lands on the next binade's first value, ``2^(e+1)``: no special case
    between binades of different widths), and ``delta`` turns ``E << b`` into the
    binade's first index. Below the smallest value ``2^-n``: one binade rounds to it or
    to 0 (midpoint ``2^-(n+1)``), every smaller magnitude is 0; in ``[1, 2)``: 1, or the
    index above it past 1 (below zero: -1 exactly, code 0; above 1: clamped to code 255).
    The codes are exactly the binary search's over the midpoints (ties to the lower
    code), which are float32 numbers here.
    """
    book = codebook(name)
    if name not in TAPERED_BITS:
        raise ValueError(f"tapered tables describe the tapered maps, not {name!r}")
    bits = TAPERED_BITS[name]
    n = len(bits)
    low = 127 - n - 2  # everything below 2^-(n+1) is zero
    shift = np.zeros(32, dtype=np.int32)
    bias = np.zeros(32, dtype=np.int32)
    delta = np.zeros(32, dtype=np.int32)

    def put(e: int, s: int, b: int, d: int) -> None:
        shift[e & 31], bias[e & 31], delta[e & 31] = s, b, d

    put(low, 31, (1 << 30) - 1, 0)  # bits < 2^30 here: (bits + bias) >> 31 is 0
    put(low + 1, 23, (1 << 23) - 1, -(low + 1))  # 0, or 1 above 2^-(n+1)
    first = 1
    for k in reversed(range(n)):
        e, b = 127 - (k + 1), bits[k]
        put(e, 23 - b, (1 << (22 - b)) - 1 if b < 23 else 0, first - (e << b))
        first += 1 << b
    put(127, 23, (1 << 23) - 1, first - 127)  # 1, and the code above it past 1
    return TaperedTables(shift, bias, delta, low, first, book.signed)


def tapered_encode(y: np.ndarray, name: str) -> np.ndarray:
    """The tapered encoder on float32 ``y`` in numpy: the model of the kernels' SIMD
    code, operation for operation (uint8 codes; ``|y| <= 1`` up to rounding)."""
    tab = tapered_tables(name)
    y = np.ascontiguousarray(y, dtype=np.float32)
    bits = y.view(np.int32).astype(np.int64)
    mag = np.maximum(bits & 0x7FFFFFFF, tab.low << 23)
    e = (mag >> 23) & 31
    if not tab.signed:
        index = ((mag + tab.bias[e]) >> tab.shift[e]) + tab.delta[e]
        return np.minimum(index, 255).astype(np.uint8)
    neg = -(bits < 0).astype(np.int64)  # -1 below zero (-0.0 too), else 0
    index = ((mag + tab.bias[e] - neg) >> tab.shift[e]) + tab.delta[e]
    return np.minimum(128 + (index ^ neg) - neg, 255).astype(np.uint8)
