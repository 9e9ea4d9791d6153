"""Block-wise quantized state in MLX operations: :mod:`adamkit.quant.blockwise`'s format.

The same codes and block scales as the torch reference codec (the format is described
there): codes flat, one per element at 8 bits and two per byte at 4 bits, one float32
``absmax`` per block. Here every block is a row of a ``[blocks, block]`` array (the
last one padded with zeros), so that the block maxima are one reduction and each
element's scale a broadcast.

Nothing searches: the 8-bit nearest code comes from the float's bits and one 2^15-entry
table (:func:`adamkit.quant.codebooks.encoder_table`, exact: the binary search's code),
the 4-bit dithered code's interval from 32 cells (:class:`~adamkit.quant.codebooks.DitherTables`).
Every table lookup is a ``take_along_axis`` on a flat table: MLX's fastest gather on
the CPU (``take`` and ``searchsorted`` cost ten to fifty times more per element).
"""

from __future__ import annotations

import math
from functools import cache
from types import SimpleNamespace

import mlx.core as mx
import numpy as np

from ..quant.blockwise import FLOAT32_TINY
from ..quant.codebooks import (
    _LOW_BITS,
    _ONE_BITS,
    DITHER_ALONG,
    DITHER_STEP,
    TABLE_BITS,
    Codebook,
    dither_tables,
    encoder_table,
)

_SHIFT = 23 - TABLE_BITS
_HALF = ((_ONE_BITS - _LOW_BITS) >> _SHIFT) + 1  # encoder-table slices per sign
#: The encoder table's layout, for the compiled step (:mod:`adamkit.mlx._native`).
LAYOUT = (_LOW_BITS, _ONE_BITS, _SHIFT, _HALF)


@cache
def tables(name: str) -> dict[str, mx.array]:
    """A codebook's tables as MLX arrays (built once per codebook)."""
    from ..quant import codebook

    book = codebook(name)
    out = {"values": mx.array(book.values.numpy().astype(np.float32))}
    if book.dither:
        t = dither_tables(name)
        for key in ("rate", "offset", "first", "threshold"):
            out[key] = mx.array(getattr(t, key))
        out["slopes"] = mx.array(np.concatenate([t.up, t.down]))  # up[c] at c, down[c] at c + 16
        out["cell"] = mx.array(np.array([t.cell_scale, t.cell_offset], dtype=np.float32))
    else:
        out["packed"] = mx.array(encoder_table(name)[0])
    return out


def _lookup(table: mx.array, index: mx.array) -> mx.array:
    """``table[index]`` for any shape of ``index``."""
    return mx.take_along_axis(table, index.reshape(-1), axis=0).reshape(index.shape)


def blocked(x: mx.array, block: int) -> mx.array:
    """``x`` read flat, zero-padded to whole blocks, as ``[blocks, block]`` (at least one)."""
    n = x.size
    blocks = max(1, -(-n // block))
    flat = x.reshape(-1)
    if blocks * block != n:
        flat = mx.concatenate([flat, mx.zeros((blocks * block - n,), dtype=x.dtype)])
    return flat.reshape(blocks, block)


def dither(shape: tuple[int, int], step: mx.array) -> mx.array:
    """int32 ``[blocks, block]``: each element's dither for codes written at ``step`` (a
    uint32 scalar), in units of 2^-16 (:func:`adamkit.quant.dither`): the element index
    times the plastic number's fraction plus the step's term, modulo 2^32."""
    j = mx.arange(shape[0] * shape[1], dtype=mx.uint32).reshape(shape)
    h = j * mx.array(DITHER_ALONG, mx.uint32) + step * mx.array(DITHER_STEP, mx.uint32)
    return (h >> 16).astype(mx.int32)


def unpack(codes: mx.array, bits: int, shape: tuple[int, int]) -> mx.array:
    """One code per element (uint8 ``[blocks, block]``) from the flat stored codes."""
    total = shape[0] * shape[1]
    stored = total if bits == 8 else total // 2
    if codes.size != stored:
        codes = mx.concatenate([codes, mx.zeros((stored - codes.size,), dtype=mx.uint8)])
    if bits == 8:
        return codes.reshape(shape)
    return mx.stack([codes & 0xF, codes >> 4], axis=-1).reshape(shape)


def levels(codes: mx.array, book: Codebook, shape: tuple[int, int], step: mx.array) -> mx.array:
    """float32 ``[blocks, block]``: each element's decoded value before its block's scale
    (codes written at ``step``): the codebook's value, and for dithered codes the
    position between values the dither gives back."""
    t, stage = tables(book.name), _stages(book.name)
    code = unpack(codes, book.bits, shape)
    values = _lookup(t["values"], code)
    if not book.dither:
        return values
    return stage.interpolated(values, _lookup(t["slopes"], stage.slope_index(code, step)), step)


def scaled(level: mx.array, absmax: mx.array, book: Codebook) -> mx.array:
    """The state from its :func:`levels` and block scales (squared for a root codebook):
    element-wise, so that a compiled step decodes inside its own fused loop."""
    out = level * absmax[:, None]
    return out * out if book.root else out


def dequantize(codes: mx.array, absmax: mx.array, book: Codebook, shape: tuple[int, int], step: mx.array) -> mx.array:
    """float32 ``[blocks, block]``: the decoded state (codes written at ``step``)."""
    return _stages(book.name).scaled(levels(codes, book, shape, step), absmax)


def quantize(
    x: mx.array, book: Codebook, numel: int, step: mx.array, finite: bool = False
) -> tuple[mx.array, mx.array]:
    """Encode float32 ``x`` (``[blocks, block]``, its first ``numel`` elements real):
    (flat uint8 codes as stored, float32 absmax per block), as the reference codec.
    ``finite``: the caller knows ``x`` holds no NaN or ±inf, and the stages skip the
    selects that store them saturated (element-wise selects are MLX's slowest operation
    on the CPU)."""
    t, stage = tables(book.name), _stages(book.name, finite)
    if x.size != numel:  # the padding of the last block holds decoded codes: zeros, as the reference pads
        flat = x.reshape(-1)[:numel]
        x = mx.concatenate([flat, mx.zeros((x.size - numel,), flat.dtype)]).reshape(x.shape)
    absmax = stage.absmax(x)
    where = stage.located(x, absmax)
    if book.dither:
        k = stage.interval(x, absmax, _lookup(t["first"], where), _lookup(t["threshold"], where))
        codes = stage.dithered(x, absmax, _lookup(t["rate"], k), _lookup(t["offset"], k), step)
    else:
        codes = stage.nearest(x, absmax, _lookup(t["packed"], where))
    flat = codes.reshape(-1)
    if book.bits == 4:
        if numel % 2:  # the last byte's high nibble is 0, as the reference packs
            flat = mx.concatenate([flat[:numel], mx.zeros((1,), dtype=mx.uint8)])
        return stage.pack(flat)[: (numel + 1) // 2], absmax
    return flat[:numel], absmax


# The codec's element-wise stages, each compiled on its own: MLX fuses element-wise
# operations, but a graph with a gather or a reduction in its middle runs several times
# slower than its stages compiled apart (measured: 8-bit encoding of 4M elements 118 ms
# as one graph, 18 ms in stages). Nested in a compiled step, they keep their boundaries.
# Between gathers, each stage recomputes the normalized value from the state and its
# block's scale rather than reading it back from memory.
@cache
def _stages(name: str, finite: bool = False) -> SimpleNamespace:
    from ..quant import codebook

    book = codebook(name)
    t = tables(name)
    lowest = float(book.values[0])
    clamp_zero = not book.signed and lowest == 0.0  # a value above 0 never decodes to 0

    def root(x: mx.array) -> mx.array:
        return mx.sqrt(x) if book.root else x

    def absmax(x: mx.array) -> mx.array:
        r = mx.abs(root(x))
        return mx.max(r if finite else mx.where(r < math.inf, r, 0.0), axis=1)  # a comparison, not isfinite

    def normalized(x: mx.array, absmax: mx.array) -> mx.array:
        """``y``: the element over its block's absmax (dithered: clamped to the map)."""
        r = root(x)
        if not finite:
            top = absmax[:, None]
            r = mx.where(mx.abs(r) < math.inf, r, mx.where(r < 0, -top, top))  # NaN: +absmax
        scale = mx.where(absmax < FLOAT32_TINY, 2.0**64, 1.0)  # a subnormal absmax's inverse overflows
        inv = mx.where(absmax > 0, 1.0 / (absmax * scale), 0.0)
        y = (r * scale[:, None]) * inv[:, None]
        if book.dither:  # NaN: as L[0]; > 1: code 15
            y = mx.minimum(mx.maximum(y, lowest) if finite else mx.where(y > lowest, y, lowest), 2.0)
        return y

    def located(x: mx.array, absmax: mx.array) -> mx.array:
        """Dithered: the cell of ``y``; nearest: the encoder table's index."""
        y = normalized(x, absmax)
        if book.dither:
            return mx.clip((y * t["cell"][0] + t["cell"][1]).astype(mx.int32), 0, 31)
        bits = y.view(mx.uint32)
        magnitude = mx.clip(bits & 0x7FFFFFFF, _LOW_BITS, _ONE_BITS)
        return ((magnitude - _LOW_BITS) >> _SHIFT) + (bits >> 31) * _HALF

    def nearest(x: mx.array, absmax: mx.array, entry: mx.array) -> mx.array:
        bits = normalized(x, absmax).view(mx.uint32)
        low, candidate = entry & 0xFFFF, entry >> 16
        mine = (bits & 0xFFFF).astype(mx.int32)
        sign = 1 - 2 * (bits >> 31).astype(mx.int32)  # above the midpoint: mine > low; below zero: mine < low
        codes = candidate + ((mine - low) * sign > 0).astype(mx.int32)
        if clamp_zero and finite:  # x above 0 (or NaN, stored as +absmax)
            codes = mx.maximum(codes, (x > 0).astype(mx.int32))
        elif clamp_zero:
            codes = mx.where(x <= 0, codes, mx.maximum(codes, 1))
        return codes.astype(mx.uint8)

    def interval(x: mx.array, absmax: mx.array, first: mx.array, threshold: mx.array) -> mx.array:
        return first + (normalized(x, absmax) >= threshold).astype(mx.int32)

    def dithered(x: mx.array, absmax: mx.array, rate: mx.array, offset: mx.array, step: mx.array) -> mx.array:
        position = (normalized(x, absmax) * rate + offset).astype(mx.int32)  # in 2^-16 codes, truncated
        return mx.minimum((position + dither(x.shape, step)) >> 16, 15).astype(mx.uint8)

    def pack(flat: mx.array) -> mx.array:
        pairs = flat.reshape(-1, 2)
        return pairs[:, 0] | (pairs[:, 1] << 4)

    def back(shape: tuple[int, ...], step: mx.array) -> mx.array:
        """``code + 1/2 - u`` less the code, in 2^-16 codes."""
        return (32768 - dither(shape, step)).astype(mx.float32)

    def slope_index(code: mx.array, step: mx.array) -> mx.array:
        """``up[code]`` at ``code``, ``down[code]`` at ``code + 16``."""
        return code.astype(mx.int32) + 16 * (back(code.shape, step) < 0).astype(mx.int32)

    def interpolated(values: mx.array, slope: mx.array, step: mx.array) -> mx.array:
        return values + back(values.shape, step) * slope

    def scaled_(level: mx.array, absmax: mx.array) -> mx.array:
        return scaled(level, absmax, book)

    stages = (absmax, located, nearest, interval, dithered, pack, slope_index, interpolated)
    compiled = {f.__name__: mx.compile(f) for f in stages}
    compiled["scaled"] = mx.compile(scaled_)
    return SimpleNamespace(**compiled)
