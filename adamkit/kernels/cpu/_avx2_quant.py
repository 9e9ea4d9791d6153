"""The quantized kernels' SIMD code for AVX2 CPUs: 8 lanes.

What :mod:`adamkit.kernels.cpu._avx512_adam` and :mod:`adamkit.kernels.cpu._avx512_codes` do
with 16 lanes, for CPUs with AVX2, FMA and F16C but no AVX-512 (AMD Zen 2/3, Intel
client cores). AVX2 has no two-register permute (``vpermi2ps``) and its ``vpermps``
holds 8 entries; on the AMD Zen 3 this was measured on, an 8-lane ``vpgatherdd`` cost
~0.45-0.55 ns per element against ~0.13 for a 16-entry lookup by two ``vpermps`` and a
blend. So:

* **8 bits**: decode by scalar loads (a byte, the value, an insert per lane: ~0.45 ns
  per element here against ~0.65 for a gather; the block loop 2.2-2.45 -> 1.5-1.6 ns
  per element in L1, measured side by side); encode by the decade encoder
  (:func:`decade_encode8`: the decade from the float's exponent through a nibble table
  and one compare, then one ``vpermps`` per table), whose model is
  :func:`adamkit.quant.codebooks.decade_encode`. In the 8-bit step on 16M elements the
  two encoders took ~26 of ~46 ms by the packed table of
  :func:`adamkit.quant.encoder_table` (a gather and an integer compare per code, the
  reference's codes exactly), ~21 this way (the step 46 -> 41 ms, one thread); a decade
  encoder finding the decade by eight compares had measured slower than the gather.
  Codes go out 16 per store (:func:`_pack16`): 0.60 ns per code signed, 0.50 unsigned;
* **dithered 4 bits**: every table (16 entries) is held in registers and looked up with
  two ``vpermps`` and a blend (:class:`_Tab`); the interval comes from a nibble table
  and one lookup (:func:`dither_constants8`); decode and encode are the reference's
  operation for operation: 0.89 ns per code encoding (2.6 with gathers), ~0.55
  decoding (1.0), 16 codes per 8-byte store (:func:`_nibbles_out16`);
* **the 8-bit block loop** (Adam/AdamW, float32/bf16/fp16 parameters): decode, the rule as
  :func:`adamkit.kernels.cpu.dense._adam_rule` computes it (``vdivps`` and ``vsqrtps``,
  correctly rounded: bit-identical to the numba loop), the parameters stored, the new
  moments written to the rows the encoders read and their largest magnitudes kept.

The numba loops these replace keep their table lookups scalar: on this machine the
8-bit step ran at 0.19x torch fused fp32 and the 4-bit one at 0.08x; the README has
the figures with this code.
"""

from __future__ import annotations

import os

import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ...quant.codebooks import _DECADE_FLOOR_BITS, DECADE_BINADES, DITHER_ALONG, cells, decade_tables, dither_tables
from ._avx2_adam import _F8, _I8V, LANES, RuleConstants, _broadcast, _Params, _splat, adam_rule, rule_loops
from ._avx512_adam import _call, _prefetch  # width-agnostic IR helpers (no AVX-512 instruction)
from ._avx512_codes import _table, dither_constants  # the constant tables' layout (64-byte rows)

_features = llvm_binding.get_host_cpu_features()
#: Whether the CPU can run this module's code (AVX2, FMA and F16C).
CPU_HAS_AVX2 = all(bool(_features.get(f, False)) for f in ("avx2", "fma", "f16c"))
del _features

_F32 = ir.FloatType()
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_I8 = ir.IntType(8)
_BYTES = _I8.as_pointer()
AHEAD = 512  # elements ahead whose cache lines the block loop prefetches, as with AVX-512


def _lookup_bytes(builder: ir.IRBuilder, table_addr: ir.Value, codes_addr: ir.Value) -> ir.Value:
    """``table[codes[0:8]]`` (float32 table, 8-bit codes in memory) by scalar loads: a
    byte load, a table load and an insert per lane. On the Zen 3 this was measured on,
    ~0.45 ns per element against ~0.65 for a ``vpgatherdd`` of the same codes; for the
    encoders, whose indices are in a register, extracting them (or a trip through
    memory) measured no better than the gather, within this machine's noise."""
    f32p = _F32.as_pointer()
    table = builder.inttoptr(table_addr, f32p)
    out = ir.Constant(_F8, ir.Undefined)
    for k in range(LANES):
        code = builder.load(builder.inttoptr(builder.add(codes_addr, ir.Constant(_I64, k)), _BYTES), align=1)
        value = builder.load(builder.gep(table, [builder.zext(code, _I64)]), align=4)
        out = builder.insert_element(out, value, ir.Constant(_I32, k))
    return out


def _at(builder: ir.IRBuilder, base: ir.Value, offset: ir.Value, vec: ir.Type) -> ir.Value:
    return builder.inttoptr(builder.add(base, offset), vec.as_pointer())


def _nibbles_in(builder: ir.IRBuilder, addr: ir.Value) -> ir.Value:
    """8 4-bit codes (4 bytes of nibble pairs, low first) from a raw address as <8 x i32>."""
    i4 = ir.VectorType(_I32, 4)
    pairs = builder.zext(builder.load(builder.inttoptr(addr, ir.VectorType(_I8, 4).as_pointer()), align=1), i4)
    low, high = builder.and_(pairs, ir.Constant(i4, [15] * 4)), builder.lshr(pairs, ir.Constant(i4, [4] * 4))
    return builder.shuffle_vector(low, high, ir.Constant(_I8V, [0, 4, 1, 5, 2, 6, 3, 7]))  # low0 high0 low1 ...


def _codes_out(builder: ir.IRBuilder, addr: ir.Value, codes: ir.Value, bits: int) -> None:
    if bits == 8:
        ptr = builder.inttoptr(addr, ir.VectorType(_I8, 8).as_pointer())
        builder.store(builder.trunc(codes, ir.VectorType(_I8, 8)), ptr, align=1)
        return
    i4 = ir.VectorType(_I32, 4)
    undef = ir.Constant(_I8V, ir.Undefined)
    even = builder.shuffle_vector(codes, undef, ir.Constant(i4, [0, 2, 4, 6]))
    odd = builder.shuffle_vector(codes, undef, ir.Constant(i4, [1, 3, 5, 7]))
    packed = builder.or_(even, builder.shl(odd, ir.Constant(i4, [4] * 4)))
    ptr = builder.inttoptr(addr, ir.VectorType(_I8, 4).as_pointer())
    builder.store(builder.trunc(packed, ir.VectorType(_I8, 4)), ptr, align=1)


def _nibbles_out16(builder: ir.IRBuilder, addr: ir.Value, low: ir.Value, high: ir.Value) -> None:
    """Store 16 4-bit codes (two <8 x i32> of 0-15) as 8 bytes, low nibble first: each
    pair joined in its 64-bit lane (``c0 | c1 << 4`` from a shift by 28), a byte shuffle
    per vector placing the pairs, the two 128-bit halves or-ed (6 shuffles and ors for 16
    codes; :func:`_codes_out` takes ~6 for 8)."""
    q4 = ir.VectorType(_I64, 4)
    b32 = ir.VectorType(_I8, 32)

    def pairs(codes: ir.Value, at: int) -> ir.Value:
        q = builder.bitcast(codes, q4)
        joined = builder.bitcast(builder.or_(q, builder.lshr(q, ir.Constant(q4, [28] * 4))), b32)
        # lane 0's two pairs (bytes 0, 8) to bytes at, at + 1; lane 1's to at + 2, at + 3
        pick = [-128] * 32
        pick[at], pick[at + 1] = 0, 8
        pick[16 + at + 2], pick[16 + at + 3] = 0, 8
        return _call(builder, "llvm.x86.avx2.pshuf.b", b32, [joined, ir.Constant(b32, pick)])

    both = builder.or_(pairs(low, 0), pairs(high, 4))
    idx = ir.VectorType(_I32, 16)
    halves = [builder.shuffle_vector(both, both, ir.Constant(idx, list(range(h, h + 16)))) for h in (0, 16)]
    out = builder.bitcast(builder.or_(*halves), ir.VectorType(_I64, 2))
    word = builder.extract_element(out, ir.Constant(_I32, 0))
    builder.store(word, builder.inttoptr(addr, _I64.as_pointer()), align=1)


# ------------------------------------------------------------------ dithered 4-bit codes
# Rows of the dither table (adamkit.kernels.cpu._avx512_codes.dither_constants, 16 floats
# each): values, rate, offset, slope up, slope down, thresholds (2 rows: 32 cells),
# firsts (2 rows), cell scale, cell offset, per-lane hash offsets, 2^15, 15, values[0]
# (the rows this module reads are named; the 32-cell ones serve the scalar path).
_DL, _DRATE, _DOFF, _DUP, _DCS, _DCO, _DLANE, _DLOW = 0, 1, 2, 3, 9, 10, 11, 14
# Rows :func:`dither_constants8` adds: per cell, the interval below it as nibbles (lanes
# 0-3), and per interval the value above it.
_DNIB, _DBOUND = 15, 16
_ROW = 64  # bytes per row
#: ``LANES · DITHER_ALONG mod 2^32`` as an int32: the dither hash's step per vector.
_H8 = ((LANES * DITHER_ALONG + 2**31) & 0xFFFFFFFF) - 2**31


def _row(builder: ir.IRBuilder, table_at: ir.Value, row: int) -> ir.Value:
    return builder.add(table_at, ir.Constant(table_at.type, row * _ROW))


def _scalar_row(builder: ir.IRBuilder, table_at: ir.Value, row: int) -> ir.Value:
    """A row's first value broadcast to 8 lanes."""
    x = builder.load(builder.inttoptr(_row(builder, table_at, row), _F32.as_pointer()), align=4)
    return _broadcast(builder, x)


def _dither_hash(builder: ir.IRBuilder, lanes: ir.Value, h0: ir.Value, index: ir.Value) -> ir.Value:
    """The dither hashes of 8 elements: ``h0 + (8·index + lane) · DITHER_ALONG`` mod 2^32."""
    start = builder.add(builder.trunc(h0, _I32), builder.mul(builder.trunc(index, _I32), ir.Constant(_I32, _H8)))
    return builder.add(_broadcast(builder, start), lanes)


class _Tab:
    """A dither table's rows in registers (loaded once, before a loop: stores through raw
    addresses in the loop would keep LLVM from hoisting the loads), looked up with
    ``vpermps``: 16 entries by two and a ``vblendvps`` on the index's bit 3. On Zen 3 a
    ``vpgatherdd`` of 8 lanes cost ~0.45-0.55 ns per element here, the lookup ~0.13."""

    def __init__(self, builder: ir.IRBuilder, table_at: ir.Value, rows: tuple[int, ...]) -> None:
        self.builder = builder
        self.rows = {}
        for r in rows:
            halves = []
            for h in range(2):
                at = builder.add(table_at, ir.Constant(table_at.type, r * _ROW + 32 * h))
                halves.append(builder.load(builder.inttoptr(at, _F8.as_pointer()), align=32))
            self.rows[r] = halves
        self.scalars = {r: _scalar_row(builder, table_at, r) for r in (_DLOW, _DCS, _DCO)}
        lanes = builder.load(builder.inttoptr(_row(builder, table_at, _DLANE), _F8.as_pointer()), align=32)
        self.lanes = builder.bitcast(lanes, _I8V)

    def _perm(self, x: ir.Value, index: ir.Value) -> ir.Value:
        return _call(self.builder, "llvm.x86.avx2.permps", _F8, [x, index])

    def lookup(self, row: int, index: ir.Value) -> ir.Value:
        """``row[index]`` (float lanes), 16 entries."""
        b = self.builder
        lo, hi = self.rows[row]
        return b.select(b.icmp_signed("<", b.shl(index, _splat(28)), _splat(0)), self._perm(hi, index),
                        self._perm(lo, index))  # fmt: skip


_DECODE_ROWS = (_DL, _DUP, _DUP + 1)
_ENCODE_ROWS = (_DRATE, _DOFF, _DNIB, _DBOUND)


def dither_constants8(name: str) -> np.ndarray:
    """:func:`adamkit.kernels.cpu._avx512_codes.dither_constants` with two rows for the AVX2
    encoder: the cells' ``first`` as nibbles of four 32-bit words (a ``vpermd`` by the
    cell over 8, a variable shift by its low 3 bits), and per interval ``k`` the value
    above it, ``L[k + 1]`` (+inf for the last), so that ``first + (y >= bound[first])``
    is the interval: a 16-entry lookup after the nibble instead of two 32-entry ones."""
    tab = dither_tables(name)
    bound = np.full(16, np.inf, dtype=np.float32)
    bound[:14] = tab.values[1:15]
    above = bound[tab.first]  # per cell: the cell's threshold, or a value in a higher cell
    higher = cells(np.where(np.isfinite(above), above, 1.0).astype(np.float32), tab) > np.arange(32)
    for c in range(32):
        finite = np.isfinite(tab.threshold[c])
        if not (above[c] == tab.threshold[c] if finite else not np.isfinite(above[c]) or higher[c]):
            raise AssertionError(f"{name}: cell {c}'s threshold is not the value above its first interval")
    words = np.zeros(8, dtype=np.uint32)
    for c, first in enumerate(tab.first):
        words[c // 8] |= np.uint32(int(first) << (4 * (c % 8)))
    return _table([*dither_constants(name), np.concatenate([words, words]).view(np.int32), bound])


def dither_decode(builder: ir.IRBuilder, tab: _Tab, codes: ir.Value, h: ir.Value) -> ir.Value:
    """8 dithered 4-bit codes to their values (before the block's scale):
    ``L[c] + d · (up[c] if d >= 0 else down[c])``, ``d = 2^15 - (h >> 16)``."""
    back = builder.sub(_splat(32768), builder.lshr(h, _splat(16)))
    up, down = tab.lookup(_DUP, codes), tab.lookup(_DUP + 1, codes)  # 16 entries each, then a blend
    slope = builder.select(builder.icmp_signed("<", back, _splat(0)), down, up)
    return builder.fadd(tab.lookup(_DL, codes), builder.fmul(builder.sitofp(back, _F8), slope))


def dither_encode(builder: ir.IRBuilder, tab: _Tab, y: ir.Value, h: ir.Value) -> ir.Value:
    """8 normalized values to dithered 4-bit codes (<8 x i32>): the reference's
    (:func:`adamkit.kernels.cpu.quantized._encode_dither`), operation for operation."""
    low, cs, co = (tab.scalars[r] for r in (_DLOW, _DCS, _DCO))
    y = builder.select(builder.fcmp_ordered(">", y, low), y, low)
    # 0..31 without clamping (the scalar code clamps): y is at least L[0] here (NaN too,
    # by the ordered compare) and at most 1 + 2^-23 (a row times 1 / its largest
    # magnitude), and dither_tables asserts the cells of [L[0], 1.0001] span 0..31
    cell = builder.fptosi(builder.fadd(builder.fmul(y, cs), co), _I8V)
    word = _call(builder, "llvm.x86.avx2.permd", _I8V, [builder.bitcast(tab.rows[_DNIB][0], _I8V),
                                                         builder.lshr(cell, _splat(3))])  # fmt: skip
    first = builder.and_(builder.lshr(word, builder.shl(builder.and_(cell, _splat(7)), _splat(2))), _splat(15))
    bound = tab.lookup(_DBOUND, first)
    interval = builder.sub(first, builder.sext(builder.fcmp_ordered(">=", y, bound), _I8V))
    rate, offset = tab.lookup(_DRATE, interval), tab.lookup(_DOFF, interval)
    position = builder.fptosi(builder.fadd(builder.fmul(y, rate), offset), _I8V)
    code = builder.lshr(builder.add(position, builder.lshr(h, _splat(16))), _splat(16))
    return builder.select(builder.icmp_signed(">", code, _splat(15)), _splat(15), code)


# ------------------------------------------------------------------ 8-bit codes
#: Rows of :func:`decade_constants8` (16 floats each; the encoder reads the first 8).
_KFIRST, _KBOUND, _KSLOPE, _KOFF, _KTOP, _KABS, _KFLOOR = 0, 1, 2, 3, 4, 5, 6
_KONE, _KDOWN, _K128, _K256, _K7F, _KFF, _K15, _K28, _K256I = 7, 8, 9, 10, 11, 12, 13, 14, 15


def decade_constants8(name: str) -> np.ndarray:
    """The 8-bit dynamic maps' AVX2 encoder table: :func:`adamkit.quant.decade_tables` in
    the form :func:`decade_encode8` reads. Per binade, the decade below it (``first``,
    0-7) as nibbles of four 32-bit words (at lanes 4-7: a ``vpermd`` by the float's
    exponent over 8 takes the word, a variable shift by its low 3 bits the nibble); per
    decade, the boundary above it, the slope, offset and clamp (8 entries: one
    ``vpermps`` each); then constants, loaded into registers before the loop."""
    tab = decade_tables(name)
    for b in range(DECADE_BINADES):  # bounds[first[b]] is the binade's threshold, or lies above it
        hi = np.float32(2.0 ** (b - DECADE_BINADES + 2))
        above = tab.bounds[tab.first[b]]
        if not (above == tab.threshold[b] if np.isfinite(tab.threshold[b]) else above >= hi):
            raise AssertionError(f"{name}: binade {b}'s decade boundary is not the one above its first decade")
    if DECADE_BINADES != 32 or tab.first.max() > 7 or tab.bounds.size != 8:
        raise AssertionError(f"{name}: the decade tables do not fit 8 entries and 32 binades")
    words = np.zeros(8, dtype=np.uint32)
    for b, first in enumerate(tab.first):
        words[4 + b // 8] |= np.uint32(int(first) << (4 * (b % 8)))
    i32 = np.int32

    def eight(x: np.ndarray) -> np.ndarray:
        return np.concatenate([x[:8], x[:8]])

    return _table([
        eight(words.view(i32)), eight(tab.bounds), eight(tab.slope), eight(tab.offset), eight(tab.top),
        i32(0x7FFFFFFF), i32(_DECADE_FLOOR_BITS), 1.0, 127.5, 128.0, 256.0, i32(0x7F), i32(0xFF), i32(15), i32(28),
        i32(256),
    ])  # fmt: skip


class _Rows8:
    """An encoder table's rows (the first 8 lanes of each 64-byte row) in registers,
    loaded once before a loop (from the table, not LLVM's constant pool: see
    :class:`adamkit.kernels.cpu._avx512_codes._Rows`)."""

    def __init__(self, builder: ir.IRBuilder, table_at: ir.Value, count: int) -> None:
        self.builder = builder
        self.rows = [builder.load(_at(builder, table_at, ir.Constant(_I64, k * _ROW), _F8), align=32)
                     for k in range(count)]  # fmt: skip

    def f(self, k: int) -> ir.Value:
        return self.rows[k]

    def i(self, k: int) -> ir.Value:
        return self.builder.bitcast(self.rows[k], _I8V)


def decade_encode8(builder: ir.IRBuilder, k: _Rows8, y: ir.Value, signed: bool) -> ir.Value:
    """8 normalized values to 8-bit codes by the decade encoder, whose numpy model is
    :func:`adamkit.quant.codebooks.decade_encode` (equal codes: the decade is the
    model's, found as ``first + (|y| > bounds[first])``; the rest is the same
    operations), for ``|y| < 2``, NaN and ±inf (normalized rows never reach 2; beyond,
    the model's binade wraps around and this one's does not). No gather: ~30
    operations per 8 codes."""
    b = builder
    bits = b.bitcast(y, _I8V)
    mag = b.and_(bits, k.i(_KABS))
    mag = b.select(b.icmp_signed("<", mag, k.i(_KFLOOR)), k.i(_KFLOOR), mag)  # magnitudes < 2^31: signed works
    a = b.bitcast(mag, _F8)
    word = _call(b, "llvm.x86.avx2.permd", _I8V, [k.i(_KFIRST), b.lshr(mag, _splat(26))])  # exponent >> 3
    first = b.and_(b.lshr(word, b.and_(b.lshr(mag, _splat(21)), k.i(_K28))), k.i(_K15))  # nibble: exponent & 7
    above = _call(b, "llvm.x86.avx2.permps", _F8, [k.f(_KBOUND), first])
    decade = b.sub(first, b.sext(b.fcmp_ordered(">", a, above), _I8V))

    def per_decade(row: int) -> ir.Value:
        return _call(b, "llvm.x86.avx2.permps", _F8, [k.f(row), decade])

    slope, offset, top = per_decade(_KSLOPE), per_decade(_KOFF), per_decade(_KTOP)
    t = b.fsub(b.fmul(a, slope), offset)
    t = b.select(b.fcmp_ordered("<", t, top), t, top)
    if not signed:
        return b.sub(k.i(_K256I), b.fptosi(b.fsub(k.f(_K256), t), _I8V))  # 0-255: the packs saturate
    negative = b.icmp_signed("<", bits, _splat(0))
    down = b.fadd(t, k.f(_KONE))
    down = b.select(b.fcmp_ordered("<", down, k.f(_KDOWN)), down, k.f(_KDOWN))
    u = b.select(negative, down, b.fsub(k.f(_K128), t))
    return b.xor(b.fptosi(u, _I8V), b.select(negative, k.i(_K7F), k.i(_KFF)))


# ------------------------------------------------------------------ row encoders and decoders
def _row_loop(builder: ir.IRBuilder, count: ir.Value, body) -> None:
    with cgutils.for_range(builder, count) as loop:
        body(loop.index)


def _pack16(builder: ir.IRBuilder, addr: ir.Value, low: ir.Value, high: ir.Value) -> None:
    """Store two vectors of codes (0-255 in 32-bit lanes) as 16 bytes: two saturating packs
    and a ``vpermd`` (3 shuffles for 16 codes; truncating each vector took 4 for 8)."""
    words = _call(builder, "llvm.x86.avx2.packusdw", ir.VectorType(ir.IntType(16), 16), [low, high])
    octets = _call(builder, "llvm.x86.avx2.packuswb", ir.VectorType(_I8, 32), [words, words])
    order = builder.bitcast(octets, _I8V)  # dwords: low 0-3, high 0-3, (copies), low 4-7, high 4-7, ...
    order = _call(builder, "llvm.x86.avx2.permd", _I8V, [order, ir.Constant(_I8V, [0, 4, 1, 5, 0, 4, 1, 5])])
    i4 = ir.VectorType(_I32, 4)
    out = builder.shuffle_vector(order, ir.Constant(_I8V, ir.Undefined), ir.Constant(i4, [0, 1, 2, 3]))
    builder.store(out, builder.inttoptr(addr, i4.as_pointer()), align=1)


def _make_encode_rows8(signed: bool):
    @intrinsic
    def encode_rows8(typingctx, row_addr, count, inv, table_addr, codes_addr):  # noqa: ARG001
        """8-bit codes of ``row[0 : 8·count] · inv`` (``table_addr``: :func:`decade_constants8`),
        16 at a time, then 8 if ``count`` is odd."""

        def codegen(context, builder, signature, args):
            row_at, count_v, inv_v, table_at, codes_at = args
            scale, k = _broadcast(builder, inv_v), _Rows8(builder, table_at, _K256I + 1)

            def codes(i):
                at = _at(builder, row_at, builder.mul(i, ir.Constant(_I64, 4 * LANES)), _F8)
                return decade_encode8(builder, k, builder.fmul(builder.load(at, align=4), scale), signed)

            def pair(j):
                i = builder.mul(j, ir.Constant(_I64, 2))
                low, high = codes(i), codes(builder.add(i, ir.Constant(_I64, 1)))
                _pack16(builder, builder.add(codes_at, builder.mul(i, ir.Constant(_I64, LANES))), low, high)

            _row_loop(builder, builder.ashr(count_v, ir.Constant(_I64, 1)), pair)
            last = builder.sub(count_v, ir.Constant(_I64, 1))
            with builder.if_then(builder.trunc(count_v, ir.IntType(1))):  # odd count: the last 8
                _codes_out(builder, builder.add(codes_at, builder.mul(last, ir.Constant(_I64, LANES))), codes(last), 8)
            return context.get_dummy_value()

        return types.void(types.int64, types.int64, types.float32, types.int64, types.int64), codegen

    return encode_rows8


#: The row encoders of the signed (first moment) and unsigned 8-bit dynamic maps.
encode_rows_m8 = _make_encode_rows8(signed=True)
encode_rows_v8 = _make_encode_rows8(signed=False)


@intrinsic
def encode_rows_dither4(typingctx, row_addr, count, inv, table_addr, codes_addr, h0):  # noqa: ARG001
    """Dithered 4-bit codes of ``row[0 : 8·count] · inv`` (``h0``: the first element's
    dither hash; ``table_addr``: :func:`adamkit.kernels.cpu._avx512_codes.dither_constants`)."""

    def codegen(context, builder, signature, args):
        row_at, count_v, inv_v, table_at, codes_at, h0_v = args
        scale, tab = _broadcast(builder, inv_v), _Tab(builder, table_at, _ENCODE_ROWS)

        def codes(i):
            y = builder.fmul(builder.load(_at(builder, row_at, builder.mul(i, ir.Constant(_I64, 32)), _F8), align=4),
                             scale)  # fmt: skip
            return dither_encode(builder, tab, y, _dither_hash(builder, tab.lanes, h0_v, i))

        def pair(j):
            i = builder.mul(j, ir.Constant(_I64, 2))
            low, high = codes(i), codes(builder.add(i, ir.Constant(_I64, 1)))
            _nibbles_out16(builder, builder.add(codes_at, builder.mul(i, ir.Constant(_I64, 4))), low, high)

        _row_loop(builder, builder.ashr(count_v, ir.Constant(_I64, 1)), pair)
        last = builder.sub(count_v, ir.Constant(_I64, 1))
        with builder.if_then(builder.trunc(count_v, ir.IntType(1))):  # odd count: the last 8
            _codes_out(builder, builder.add(codes_at, builder.mul(last, ir.Constant(_I64, 4))), codes(last), 4)
        return context.get_dummy_value()

    return types.void(types.int64, types.int64, types.float32, types.int64, types.int64, types.int64), codegen


@intrinsic
def decode_rows8(typingctx, codes_addr, count, values_addr, scale, root, out_addr):  # noqa: ARG001
    """out[0 : 8·count] = values[codes] · scale (squared if root), 8-bit codes."""

    def codegen(context, builder, signature, args):
        codes_at, count_v, values_at, scale_v, root_v, out_at = args
        scale = _broadcast(builder, scale_v)

        def body(i):
            at = builder.add(codes_at, builder.mul(i, ir.Constant(_I64, 8)))
            x = builder.fmul(_lookup_bytes(builder, values_at, at), scale)
            x = builder.select(root_v, builder.fmul(x, x), x)
            builder.store(x, _at(builder, out_at, builder.mul(i, ir.Constant(_I64, 32)), _F8), align=4)

        _row_loop(builder, count_v, body)
        return context.get_dummy_value()

    sig = types.void(types.int64, types.int64, types.int64, types.float32, types.boolean, types.int64)
    return sig, codegen


@intrinsic
def decode_rows_dither4(typingctx, codes_addr, count, table_addr, scale, root, out_addr, h0):  # noqa: ARG001
    """out[0 : 8·count] = the dithered 4-bit ``codes``' values · scale (squared if root)."""

    def codegen(context, builder, signature, args):
        codes_at, count_v, table_at, scale_v, root_v, out_at, h0_v = args
        scale, tab = _broadcast(builder, scale_v), _Tab(builder, table_at, _DECODE_ROWS)

        def body(i):
            codes = _nibbles_in(builder, builder.add(codes_at, builder.mul(i, ir.Constant(_I64, 4))))
            h = _dither_hash(builder, tab.lanes, h0_v, i)
            x = builder.fmul(dither_decode(builder, tab, codes, h), scale)
            x = builder.select(root_v, builder.fmul(x, x), x)
            builder.store(x, _at(builder, out_at, builder.mul(i, ir.Constant(_I64, 32)), _F8), align=4)

        _row_loop(builder, count_v, body)
        return context.get_dummy_value()

    sig = types.void(types.int64, types.int64, types.int64, types.float32, types.boolean, types.int64, types.int64)
    return sig, codegen


# ------------------------------------------------------------------ the Adam block loop
@intrinsic
def adam_rows_8(typingctx, p_at, g_at, mc_at, sc_at, count, m_at, v_at, mvals_at, vvals_at, mscale, vscale, low,
                c1, b2, b2w, eps, decay, l2, gsign, lr_t, inv, h0, plike):  # fmt: skip  # noqa: ARG001
    """The 8-bit block loop; the parameters' dtype is ``plike``'s. Same arguments and
    results as :func:`adamkit.kernels.cpu._avx512_adam._make_adam_rows`'s: (largest |m|
    bits, largest |v| bits). Blocks whose gradient needs masking take the numba loop.

    There is no 4-bit one: the two dither tables' decode rows (6 registers each) and the
    rule's constants overflow AVX2's 16 registers, and the spilling loop measured 5-10 %
    slower than decoding rows and running the numba loop (``_fused4``)."""

    def codegen(context, builder, signature, args):
        (p_at, g_at, mc_at, sc_at, count, m_at, v_at, mvals, vvals, mscale, vscale, low,
         c1, b2, b2w, eps, decay, l2, gsign, lr_t, inv, h0, _) = args  # fmt: skip
        io = _Params(builder, signature.args[-1].dtype)
        k = RuleConstants.of(builder, low, c1, b2, b2w, eps, decay, l2, gsign, lr_t, inv)
        mscale, vscale = _broadcast(builder, mscale), _broadcast(builder, vscale)
        mtop = cgutils.alloca_once_value(builder, _splat(0))
        vtop = cgutils.alloca_once_value(builder, _splat(0))

        def body(i: ir.Value, l2: bool) -> None:
            off = builder.mul(i, ir.Constant(_I64, 4 * LANES))
            poff = builder.mul(i, ir.Constant(_I64, LANES * io.size))
            coff = builder.mul(i, ir.Constant(_I64, LANES))
            for base, step in ((p_at, io.size), (g_at, io.size), (mc_at, 1), (sc_at, 1)):
                off_b = poff if step == io.size else coff
                _prefetch(builder, builder.add(builder.add(base, off_b), ir.Constant(_I64, int(AHEAD * step))))
            g, p = io.load(builder.add(g_at, poff)), io.load(builder.add(p_at, poff))
            m = builder.fmul(_lookup_bytes(builder, mvals, builder.add(mc_at, coff)), mscale)
            v = builder.fmul(_lookup_bytes(builder, vvals, builder.add(sc_at, coff)), vscale)
            p1, m1, v1 = adam_rule(builder, k, g, p, m, v, l2)
            io.store(builder.add(p_at, poff), p1)
            builder.store(m1, _at(builder, m_at, off, _F8), align=4)
            builder.store(v1, _at(builder, v_at, off, _F8), align=4)
            for top, x in ((mtop, m1), (vtop, v1)):
                bitsx = builder.and_(builder.bitcast(x, _I8V), _splat(0x7FFFFFFF))
                old = builder.load(top)
                builder.store(builder.select(builder.icmp_signed(">", bitsx, old), bitsx, old), top)

        rule_loops(builder, k, count, body)
        tops = [_call(builder, "llvm.vector.reduce.smax.v8i32", _I32, [builder.load(t)]) for t in (mtop, vtop)]
        return context.make_tuple(builder, signature.return_type, tops)

    f32 = types.float32
    sig = types.UniTuple(types.int32, 2)(
        *[types.int64] * 9, f32, f32, types.boolean, *[f32] * 9, types.int64, plike
    )  # fmt: skip
    return sig, codegen


def simd_allowed() -> bool:
    """``ADAMKIT_SIMD`` (``auto``, ``avx2``, ``none``) leaves AVX2 on unless ``none``."""
    return os.environ.get("ADAMKIT_SIMD", "auto") != "none"
