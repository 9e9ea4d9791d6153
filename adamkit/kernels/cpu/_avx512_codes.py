"""Codes <-> floats 16 at a time with AVX-512 permutes and gathers, a row per call.

LLVM vectorizes no table lookup here (its cost model for this CPU prefers scalar loads
to gathers), so the quantized kernels' decoding and encoding are written as LLVM IR
over <16 x float>, one call per row of a block:

* **encode, 8 bits** (the dynamic maps): no table lookup at all.
  :func:`adamkit.quant.codebooks.decade_tables` turns the map into per-decade linear
  functions: the float's exponent indexes two 32-entry tables held in registers
  (``vpermi2ps``: the decade boundary inside that binade, the decade below it), one
  compare picks the decade, three ``vpermps`` fetch its slope, offset and clamp, and
  ``ceil(|y| · slope - offset) - 1`` is the position. ~24 instructions per 16 codes,
  0.22 ns per code signed, 0.18 unsigned, where one ``vpgatherdd`` from the packed
  search-free table (:func:`adamkit.quant.encoder_table`, the portable path's) took
  0.29: the gather's 16 loads were the bound. Codes equal the binary search's except
  within float32 rounding of a midpoint (:func:`~adamkit.quant.codebooks.decade_encode`
  is the bit-exact model the tests hold this code to);
* **encode, 4 bits** (dithered, :mod:`adamkit.quant.blockwise`): the value's cell of 32
  (a multiply-add) indexes two 32-entry tables in registers (``vpermi2ps``, ``vpermi2d``:
  the codebook value inside the cell, the count of values below it), one compare gives
  the interval, two ``vpermps`` its start and rate, and the dither is an integer
  multiply-add of the element index; the reference's codes exactly;
* **decode**: at 8 bits one gather from the 256 values (a tree of eight ``vpermi2ps``
  and seven blends was slower: 0.19 ns vs 0.15, on an Intel Xeon), or, where the CPU
  has AVX512-VBMI, 64 codes at a time from the values' byte planes
  (:func:`decode_rows8_planes`: 0.072 ns per value on Zen 4, where a gather takes
  0.34); at 4 bits the dither subtracted and two ``vpermps`` (an interval's start and
  width) to interpolate.

Each encoder's constants come from a 64-byte-aligned numpy table
(:data:`ENCODER_CONSTANTS`) loaded into registers once per row, not from LLVM's
constant pool: with numba's large code model each pooled vector needs its own 64-bit
address register, and LLVM spent ~30 register moves per 16 codes rotating them.
Used when the CPU has AVX-512 (``HAS_AVX512``); the scalar table code is the portable
path.
"""

from __future__ import annotations

import os

import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ...quant.codebooks import _DECADE_FLOOR_BITS, DITHER_ALONG, decade_tables, dither_tables, tapered_tables

#: Whether the kernels use these paths: the CPU has AVX-512 and ``ADAMKIT_SIMD`` is
#: ``auto`` (its default; ``avx2`` or ``none`` take the AVX2 or the portable scalar path, as
#: the tests do; set it before the first import: the on-disk cache is keyed on it). See
#: :mod:`adamkit.kernels.cpu._simd`.
HAS_AVX512 = (
    bool(llvm_binding.get_host_cpu_features().get("avx512f", False))
    and os.environ.get("ADAMKIT_SIMD", "auto") == "auto"
)

_F32 = ir.FloatType()
_I32 = ir.IntType(32)
_I8 = ir.IntType(8)
_F16 = ir.VectorType(_F32, 16)
_I16 = ir.VectorType(_I32, 16)
_M16 = ir.VectorType(ir.IntType(1), 16)
_BYTES = ir.IntType(8).as_pointer()


def _splat(value: int) -> ir.Constant:
    return ir.Constant(_I16, [value] * 16)


def _broadcast(builder: ir.IRBuilder, x: ir.Value) -> ir.Value:
    one = builder.insert_element(ir.Constant(_F16, ir.Undefined), x, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, ir.Constant(_F16, ir.Undefined), ir.Constant(_I16, [0] * 16))


def _gather(builder: ir.IRBuilder, vec: ir.Type, table_addr: ir.Value, index: ir.Value) -> ir.Value:
    """``table[index]`` for 16 lanes of 32-bit elements (``vec``: <16 x float|i32>)."""
    name = "llvm.x86.avx512.mask.gather.dps.512" if vec == _F16 else "llvm.x86.avx512.mask.gather.dpi.512"
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, _BYTES, _I16, _M16, _I32]), name)
    zero = ir.Constant(vec, [0.0 if vec == _F16 else 0] * 16)
    everyone = ir.Constant(_M16, [1] * 16)
    return builder.call(fn, [zero, builder.inttoptr(table_addr, _BYTES), index, everyone, ir.Constant(_I32, 4)])


def _codes_in(builder: ir.IRBuilder, addr: ir.Value, bits: int) -> ir.Value:
    """16 codes from a raw address as <16 x i32> (8 bytes of nibble pairs at 4 bits)."""
    if bits == 8:
        ptr = builder.inttoptr(addr, ir.VectorType(_I8, 16).as_pointer())
        return builder.zext(builder.load(ptr, align=1), _I16)
    i8 = ir.VectorType(_I32, 8)
    pairs = builder.zext(builder.load(builder.inttoptr(addr, ir.VectorType(_I8, 8).as_pointer()), align=1), i8)
    low = builder.and_(pairs, ir.Constant(i8, [15] * 8))
    high = builder.lshr(pairs, ir.Constant(i8, [4] * 8))
    order = [i // 2 + (8 if i % 2 else 0) for i in range(16)]  # low0 high0 low1 high1 ...
    return builder.shuffle_vector(low, high, ir.Constant(_I16, order))


def _codes_out(builder: ir.IRBuilder, addr: ir.Value, codes: ir.Value, bits: int) -> None:
    if bits == 8:
        ptr = builder.inttoptr(addr, ir.VectorType(_I8, 16).as_pointer())
        builder.store(builder.trunc(codes, ir.VectorType(_I8, 16)), ptr, align=1)
        return
    i8 = ir.VectorType(_I32, 8)
    undef = ir.Constant(_I16, ir.Undefined)
    even = builder.shuffle_vector(codes, undef, ir.Constant(i8, list(range(0, 16, 2))))
    odd = builder.shuffle_vector(codes, undef, ir.Constant(i8, list(range(1, 16, 2))))
    packed = builder.or_(even, builder.shl(odd, ir.Constant(i8, [4] * 8)))
    ptr = builder.inttoptr(addr, ir.VectorType(_I8, 8).as_pointer())
    builder.store(builder.trunc(packed, ir.VectorType(_I8, 8)), ptr, align=1)


@intrinsic
def decode_rows8(typingctx, codes_addr, count, values_addr, scale, root, out_addr):  # noqa: ARG001
    """out[0 : 16·count] = values[codes] · scale (squared if root), 8-bit codes, raw addresses."""

    def codegen(context, builder, signature, args):
        codes_at, count_v, values_at, scale_v, root_v, out_at = args
        scale = _broadcast(builder, scale_v)
        with cgutils.for_range(builder, count_v) as loop:
            i = loop.index
            codes = _codes_in(builder, builder.add(codes_at, builder.mul(i, ir.Constant(i.type, 16))), 8)
            x = builder.fmul(_gather(builder, _F16, values_at, codes), scale)
            x = builder.select(root_v, builder.fmul(x, x), x)
            at = builder.add(out_at, builder.mul(i, ir.Constant(i.type, 64)))
            builder.store(x, builder.inttoptr(at, _F16.as_pointer()), align=4)
        return context.get_dummy_value()

    sig = types.void(types.int64, types.int64, types.int64, types.float32, types.boolean, types.int64)
    return sig, codegen


def _min(builder: ir.IRBuilder, x: ir.Value, bound: ir.Value) -> ir.Value:
    return builder.select(builder.fcmp_ordered("<", x, bound), x, bound)


def _permutes(builder: ir.IRBuilder) -> tuple:
    """``vpermps`` (16 entries), ``vpermi2ps`` and ``vpermi2d`` (32 entries)."""
    module = builder.module
    one = cgutils.get_or_insert_function(module, ir.FunctionType(_F16, [_F16, _I16]), "llvm.x86.avx512.permvar.sf.512")
    two_f = cgutils.get_or_insert_function(
        module, ir.FunctionType(_F16, [_F16, _I16, _F16]), "llvm.x86.avx512.vpermi2var.ps.512"
    )
    two_i = cgutils.get_or_insert_function(
        module, ir.FunctionType(_I16, [_I16, _I16, _I16]), "llvm.x86.avx512.vpermi2var.d.512"
    )
    return one, two_f, two_i


class _Rows:
    """Reads row ``k`` (16 x 32 bits) of an encoder's constant table at a raw address.

    The constants live in a numpy array passed in, not in LLVM's constant pool: with
    numba's large code model every pooled vector needs its own 64-bit address register,
    and in the encode loops LLVM spent ~30 register moves per 16 elements rotating them.
    """

    def __init__(self, builder: ir.IRBuilder, table_at: ir.Value, count: int) -> None:
        base = builder.inttoptr(table_at, _F16.as_pointer())
        self.builder = builder
        # align=1: the tables are on cache lines (:func:`_table`), but a copy of one need
        # not be, and these loads run once per call
        self.rows = [builder.load(builder.gep(base, [ir.Constant(_I32, k)]), align=1) for k in range(count)]

    def f(self, k: int) -> ir.Value:
        return self.rows[k]

    def i(self, k: int) -> ir.Value:
        return self.builder.bitcast(self.rows[k], _I16)


def _row_encoder(bits: int, table_rows: int, body, floor: bool = False):
    """An intrinsic ``encode_rows(row_addr, count, inv, table_addr, codes_addr)``: the codes
    of ``row[0 : 16·count] · inv`` by ``body(builder, constants, y) -> codes``, with the
    table's ``table_rows`` rows loaded into registers once, before the loop. ``floor``
    (an unsigned map whose code 0 is 0): a row value above 0 takes code 1 at least, as
    :func:`adamkit.kernels.cpu.quantized._encode_block8` requires (a compare and a max
    here, where a pass over the row after it cost ~4 % of the 8-bit step on Zen 4)."""

    @intrinsic
    def encode_rows(typingctx, row_addr, count, inv, table_addr, codes_addr):  # noqa: ARG001
        def codegen(context, builder, signature, args):
            row_at, count_v, inv_v, table_at, codes_at = args
            k = _Rows(builder, table_at, table_rows)
            scale = _broadcast(builder, inv_v)
            with cgutils.for_range(builder, count_v) as loop:
                i = loop.index
                at = builder.add(row_at, builder.mul(i, ir.Constant(i.type, 64)))
                x = builder.load(builder.inttoptr(at, _F16.as_pointer()), align=4)
                codes = body(builder, k, builder.fmul(x, scale))
                if floor:  # code 0 (the low byte: the lanes hold it sign-extended) of a value above 0 to 1
                    zero = builder.icmp_signed("==", builder.and_(codes, _splat(0xFF)), _splat(0))
                    above = builder.fcmp_ordered(">", x, ir.Constant(_F16, [0.0] * 16))
                    codes = builder.or_(codes, builder.zext(builder.and_(zero, above), _I16))
                _codes_out(builder, builder.add(codes_at, builder.mul(i, ir.Constant(i.type, 2 * bits))), codes, bits)
            return context.get_dummy_value()

        return types.void(types.int64, types.int64, types.float32, types.int64, types.int64), codegen

    return encode_rows


def _table(rows: list) -> np.ndarray:
    """float32 [len(rows), 16]: each row 16 floats (int rows stored as their bits) or one
    scalar repeated."""
    raw = np.empty(16 * (len(rows) + 1), dtype=np.float32)
    skip = (-raw.ctypes.data % 64) // 4  # rows on cache lines: a split load costs two
    out = raw[skip : skip + 16 * len(rows)].reshape(len(rows), 16)
    for k, row in enumerate(rows):
        row = np.broadcast_to(np.asarray(row), (16,))
        out[k] = row.view(np.float32) if row.dtype.kind in "iu" else row.astype(np.float32)
    return out


def decade_constants(name: str) -> np.ndarray:
    """The 8-bit dynamic maps' encoder table (see :func:`_make_decade_encode`)."""
    tab = decade_tables(name)
    i32 = np.int32
    return _table([
        tab.threshold[:16], tab.threshold[16:], tab.first[:16], tab.first[16:], tab.slope, tab.offset, tab.top,
        i32(0x7FFFFFFF), i32(_DECADE_FLOOR_BITS), 1.0, 127.5, 128.0, 256.0, i32(0x7F), i32(0xFF),
    ])  # fmt: skip


def _decade_body(signed: bool):
    """8-bit dynamic maps: :func:`adamkit.quant.codebooks.decade_tables`' encoder, whose
    numpy model is :func:`adamkit.quant.codebooks.decade_encode` (same operations);
    constants: :func:`decade_constants`."""

    def body(builder: ir.IRBuilder, k: _Rows, y: ir.Value) -> ir.Value:
        one, two_f, two_i = _permutes(builder)
        y = builder.bitcast(y, _I16)
        mag = builder.and_(y, k.i(7))
        floor = k.i(8)
        mag = builder.select(builder.icmp_unsigned("<", mag, floor), floor, mag)
        a = builder.bitcast(mag, _F16)
        binade = builder.lshr(mag, _splat(23))  # the permutes read its low 5 bits
        threshold = builder.call(two_f, [k.f(0), binade, k.f(1)])
        decade = builder.call(two_i, [k.i(2), binade, k.i(3)])
        decade = builder.add(decade, builder.zext(builder.fcmp_ordered(">", a, threshold), _I16))
        slope, offset, top = (builder.call(one, [k.f(r), decade]) for r in (4, 5, 6))
        t = _min(builder, builder.fsub(builder.fmul(a, slope), offset), top)
        if not signed:
            return builder.sub(_splat(0), builder.fptosi(builder.fsub(k.f(12), t), _I16))
        negative = builder.icmp_signed("<", y, _splat(0))
        down = _min(builder, builder.fadd(t, k.f(9)), k.f(10))
        u = builder.select(negative, down, builder.fsub(k.f(11), t))
        return builder.xor(builder.fptosi(u, _I16), builder.select(negative, k.i(13), k.i(14)))

    return body


def tapered_constants(name: str) -> np.ndarray:
    """A tapered map's encoder table (see :func:`_tapered_body`)."""
    tab = tapered_tables(name)
    i32 = np.int32
    return _table([
        tab.shift[:16], tab.shift[16:], tab.bias[:16], tab.bias[16:], tab.delta[:16], tab.delta[16:],
        i32(0x7FFFFFFF), i32(tab.low << 23), i32(128), i32(255),
    ])  # fmt: skip


def _tapered_body(signed: bool):
    """8-bit tapered maps: :func:`adamkit.quant.codebooks.tapered_tables`' encoder, whose
    numpy model is :func:`adamkit.quant.codebooks.tapered_encode` (same operations): the
    exponent picks shift, bias and offset (three 32-entry ``vpermi2d``), an add, a
    variable shift and an add give the magnitude's index; ~12 instructions per 16 codes.
    Constants: :func:`tapered_constants`."""

    def body(builder: ir.IRBuilder, k: _Rows, y: ir.Value) -> ir.Value:
        two_i = _permutes(builder)[2]
        bits = builder.bitcast(y, _I16)
        mag = builder.and_(bits, k.i(6))
        mag = builder.select(builder.icmp_signed("<", mag, k.i(7)), k.i(7), mag)
        e = builder.lshr(mag, _splat(23))  # the permutes read its low 5 bits
        shift, bias, delta = (builder.call(two_i, [k.i(r), e, k.i(r + 1)]) for r in (0, 2, 4))
        if not signed:
            index = builder.add(builder.lshr(builder.add(mag, bias), shift), delta)
            return builder.select(builder.icmp_signed(">", index, k.i(9)), k.i(9), index)
        neg = builder.ashr(bits, _splat(31))  # -1 below zero
        index = builder.add(builder.lshr(builder.add(mag, builder.sub(bias, neg)), shift), delta)
        code = builder.sub(builder.add(k.i(8), builder.xor(index, neg)), neg)
        return builder.select(builder.icmp_signed(">", code, k.i(9)), k.i(9), code)

    return body


# ------------------------------------------------------------------ dithered 4-bit codes
#: Rows of :func:`dither_constants`.
_DL, _DRATE, _DOFF, _DUP, _DDOWN, _DT, _DF = 0, 1, 2, 3, 4, 5, 7  # thresholds and firsts: two rows each
_DCS, _DCO, _DLANE, _DHALF, _D15, _DLOW = 9, 10, 11, 12, 13, 14
#: ``16 · DITHER_ALONG mod 2^32`` as an int32: the dither hash's step per 16 elements.
_H16 = ((16 * DITHER_ALONG + 2**31) & 0xFFFFFFFF) - 2**31


def dither_constants(name: str) -> np.ndarray:
    """A dithered 4-bit codebook's table for the kernels, float32 [15, 16]: the
    :func:`adamkit.quant.codebooks.dither_tables` (values, rates, offsets, slopes up and
    down, cell thresholds and firsts, cell scale and offset), the dither hash's per-lane
    offsets ``lane · DITHER_ALONG mod 2^32``, then constants. The portable path reads
    it too."""
    tab = dither_tables(name)
    lanes = ((np.arange(16, dtype=np.int64) * DITHER_ALONG) & 0xFFFFFFFF).astype(np.uint32).view(np.int32)
    i32 = np.int32
    return _table([
        tab.values, tab.rate, tab.offset, tab.up, tab.down, tab.threshold[:16], tab.threshold[16:], tab.first[:16],
        tab.first[16:], tab.cell_scale, tab.cell_offset, lanes, i32(32768), i32(15), tab.values[0],
    ])  # fmt: skip


def _dither_hash(builder: ir.IRBuilder, k: _Rows, h0: ir.Value, index: ir.Value) -> ir.Value:
    """The dither hashes of 16 elements: ``h0 + (16·index + lane) · DITHER_ALONG`` mod 2^32
    (``h0``: the first element's, an i64 whose low 32 bits count)."""
    start = builder.add(builder.trunc(h0, _I32), builder.mul(builder.trunc(index, _I32), ir.Constant(_I32, _H16)))
    start = builder.bitcast(_broadcast(builder, builder.bitcast(start, _F32)), _I16)
    return builder.add(start, k.i(_DLANE))


def dither_decode(builder: ir.IRBuilder, k: _Rows, codes: ir.Value, h: ir.Value) -> ir.Value:
    """16 dithered 4-bit codes (<16 x i32>) to their values (before the block's scale):
    ``L[c] + d · (up[c] if d >= 0 else down[c])`` with ``d = 2^15 - (h >> 16)``, three
    ``vpermps``."""
    one = _permutes(builder)[0]
    back = builder.sub(k.i(_DHALF), builder.lshr(h, _splat(16)))
    up, down = builder.call(one, [k.f(_DUP), codes]), builder.call(one, [k.f(_DDOWN), codes])
    slope = builder.select(builder.icmp_signed(">=", back, _splat(0)), up, down)
    return builder.fadd(builder.call(one, [k.f(_DL), codes]), builder.fmul(builder.sitofp(back, _F16), slope))


def dither_encode(builder: ir.IRBuilder, k: _Rows, y: ir.Value, h: ir.Value) -> ir.Value:
    """16 normalized values to dithered 4-bit codes (<16 x i32>): the interval from the
    32-cell tables (``vpermi2ps``, ``vpermi2d``, a compare), the position in 2^-16 codes
    from two ``vpermps`` and a multiply-add, the dither added as an integer."""
    one, two_f, two_i = _permutes(builder)
    low = k.f(_DLOW)
    y = builder.select(builder.fcmp_ordered(">", y, low), y, low)
    cell = builder.fptosi(builder.fadd(builder.fmul(y, k.f(_DCS)), k.f(_DCO)), _I16)  # 0..31 (asserted)
    threshold = builder.call(two_f, [k.f(_DT), cell, k.f(_DT + 1)])
    first = builder.call(two_i, [k.i(_DF), cell, k.i(_DF + 1)])
    interval = builder.sub(first, builder.sext(builder.fcmp_ordered(">=", y, threshold), _I16))
    rate, offset = builder.call(one, [k.f(_DRATE), interval]), builder.call(one, [k.f(_DOFF), interval])
    position = builder.fptosi(builder.fadd(builder.fmul(y, rate), offset), _I16)
    code = builder.lshr(builder.add(position, builder.lshr(h, _splat(16))), _splat(16))
    return builder.select(builder.icmp_signed(">", code, k.i(_D15)), k.i(_D15), code)


@intrinsic
def encode_rows_dither4(typingctx, row_addr, count, inv, table_addr, codes_addr, h0):  # noqa: ARG001
    """Dithered 4-bit codes of ``row[0 : 16·count] · inv`` (``h0``: the first element's
    dither hash), with :func:`dither_constants`' table."""

    def codegen(context, builder, signature, args):
        row_at, count_v, inv_v, table_at, codes_at, h0_v = args
        k = _Rows(builder, table_at, 15)
        scale = _broadcast(builder, inv_v)
        with cgutils.for_range(builder, count_v) as loop:
            i = loop.index
            at = builder.add(row_at, builder.mul(i, ir.Constant(i.type, 64)))
            y = builder.fmul(builder.load(builder.inttoptr(at, _F16.as_pointer()), align=4), scale)
            codes = dither_encode(builder, k, y, _dither_hash(builder, k, h0_v, i))
            _codes_out(builder, builder.add(codes_at, builder.mul(i, ir.Constant(i.type, 8))), codes, 4)
        return context.get_dummy_value()

    return types.void(types.int64, types.int64, types.float32, types.int64, types.int64, types.int64), codegen


@intrinsic
def decode_rows_dither4(typingctx, codes_addr, count, table_addr, scale, root, out_addr, h0):  # noqa: ARG001
    """out[0 : 16·count] = the dithered 4-bit ``codes``' values · scale (squared if root)."""

    def codegen(context, builder, signature, args):
        codes_at, count_v, table_at, scale_v, root_v, out_at, h0_v = args
        k = _Rows(builder, table_at, 15)
        scale = _broadcast(builder, scale_v)
        with cgutils.for_range(builder, count_v) as loop:
            i = loop.index
            codes = _codes_in(builder, builder.add(codes_at, builder.mul(i, ir.Constant(i.type, 8))), 4)
            x = builder.fmul(dither_decode(builder, k, codes, _dither_hash(builder, k, h0_v, i)), scale)
            x = builder.select(root_v, builder.fmul(x, x), x)
            at = builder.add(out_at, builder.mul(i, ir.Constant(i.type, 64)))
            builder.store(x, builder.inttoptr(at, _F16.as_pointer()), align=4)
        return context.get_dummy_value()

    sig = types.void(types.int64, types.int64, types.int64, types.float32, types.boolean, types.int64, types.int64)
    return sig, codegen


#: The codebooks' row encoders: ``encode_rows(row_addr, count, inv, table_addr,
#: codes_addr)`` writes the codes of ``row[0 : 16·count] · inv`` (the unsigned one with
#: the floor: see :func:`_row_encoder`).
encode_rows_dynamic8 = _row_encoder(8, 15, _decade_body(signed=True))
encode_rows_udynamic8 = _row_encoder(8, 15, _decade_body(signed=False), floor=True)
encode_rows_tapered8 = _row_encoder(8, 10, _tapered_body(signed=True))
encode_rows_utapered8 = _row_encoder(8, 10, _tapered_body(signed=False), floor=True)

#: Each codebook's 16-wide encoder constants.
ENCODER_CONSTANTS = {
    "dynamic8": lambda: decade_constants("dynamic8"),
    "udynamic8": lambda: decade_constants("udynamic8"),
    "tapered8": lambda: tapered_constants("tapered8"),
    "utapered8": lambda: tapered_constants("utapered8"),
    "normal4_dither": lambda: dither_constants("normal4_dither"),
    "sqrt_geo4_dither": lambda: dither_constants("sqrt_geo4_dither"),
    "geo4_dither": lambda: dither_constants("geo4_dither"),
}


# ------------------------------------------------------------------ 8-bit decode by bytes
#: LLVM's names of the x86 CPUs with AVX512-VBMI (for a target named by ``NUMBA_CPU_NAME``
#: with an empty ``NUMBA_CPU_FEATURES``: its features are the CPU's own).
_VBMI_CPUS = frozenset({
    "cannonlake", "icelake-client", "icelake-server", "tigerlake", "rocketlake", "sapphirerapids", "emeraldrapids",
    "graniterapids", "graniterapids-d", "diamondrapids", "znver4", "znver5",
})  # fmt: skip


def _target_has_vbmi() -> bool:
    """Whether numba compiles for a CPU with AVX512-VBMI: its features string
    (``NUMBA_CPU_FEATURES``, else the host's), or where that is empty, the CPU named by
    ``NUMBA_CPU_NAME``. A kernel with ``vpermi2b`` compiled for a target without it
    aborts the process in LLVM (``Cannot select``), so any doubt means no."""
    from numba.core import config

    features = config.CPU_FEATURES
    if features is None:
        features = llvm_binding.get_host_cpu_features().flatten()
    if features:
        return "+avx512vbmi" in features.split(",")
    return (config.CPU_NAME or llvm_binding.get_host_cpu_name()) in _VBMI_CPUS


#: Whether 8-bit codes decode 64 at a time from byte planes (:func:`decode_rows8_planes`)
#: instead of by gathers: the CPU has AVX512-VBMI (``vpermi2b``), and so has the target
#: numba compiles for.
HAS_VBMI = HAS_AVX512 and bool(llvm_binding.get_host_cpu_features().get("avx512vbmi", False)) and _target_has_vbmi()
_B64 = ir.VectorType(_I8, 64)
_W32 = ir.VectorType(ir.IntType(16), 32)


def _interleave(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, lanes: int, high: bool) -> ir.Value:
    """``punpck{l,h}{bw,wd}``: per 128-bit lane, the low (or high) half of ``a``'s and
    ``b``'s ``lanes``-element lane interleaved."""
    half = lanes // 2
    width = a.type.count
    mask = [
        x
        for lane in range(0, width, lanes)
        for k in range(half)
        for x in (lane + k + (half if high else 0), width + lane + k + (half if high else 0))
    ]
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, width), mask))


def _plane_order() -> list:
    """The byte order the codes are put in before the lookups, so that the two rounds of
    interleaving (bytes to 16-bit words, words to 32-bit floats, each within 128-bit
    lanes) leave the 64 floats in order: ``order[j]``, the code that goes to position
    ``j``."""
    # word w of the byte round's low (high) result holds position 16·(w // 8) + w % 8 (+ 8)
    words = [[16 * (w // 8) + w % 8 + 8 * high for w in range(32)] for high in (0, 1)]
    order = [0] * 64
    for s in range(4):  # the word round's results: float 4·lane + k of result s
        for lane in range(4):
            for k in range(4):
                order[words[s // 2][8 * lane + k + 4 * (s % 2)]] = 16 * s + 4 * lane + k
    return order


_PLANE_ORDER = _plane_order()


def plane_table(values: np.ndarray) -> np.ndarray:
    """256 float32 ``values`` as 16 rows of 64 bytes (byte plane ``b``, codes
    ``64q..64q+63``, row ``4b + q``), 64-byte aligned, for :func:`decode_rows8_planes`."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    raw = np.empty(64 * 17, dtype=np.uint8)
    skip = -raw.ctypes.data % 64
    out = raw[skip : skip + 64 * 16].reshape(16, 64)
    for b in range(4):
        out[4 * b : 4 * b + 4] = ((bits >> (8 * b)) & 0xFF).astype(np.uint8).reshape(4, 64)
    return out


def _plane_decoder(scaled: bool):
    """:func:`decode_rows8_planes` (``scaled`` False) or :func:`decode_rows8_planes_scaled`."""

    def codegen(context, builder, signature, args):
        if scaled:
            codes_at, count_v, planes_at, scale_v, root_v, out_at = args
            scale = _broadcast(builder, scale_v)
        else:
            codes_at, count_v, planes_at, out_at = args
        base = builder.inttoptr(planes_at, _B64.as_pointer())
        planes = [builder.load(builder.gep(base, [ir.Constant(_I32, k)]), align=1) for k in range(16)]  # see _Rows
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_B64, [_B64, _B64, _B64]), "llvm.x86.avx512.vpermi2var.qi.512"
        )
        order = ir.Constant(ir.VectorType(_I32, 64), _PLANE_ORDER)
        with cgutils.for_range(builder, count_v) as loop:
            i = loop.index
            at = builder.add(codes_at, builder.mul(i, ir.Constant(i.type, 64)))
            codes = builder.load(builder.inttoptr(at, _B64.as_pointer()), align=1)
            codes = builder.shuffle_vector(codes, ir.Constant(_B64, ir.Undefined), order)
            top = builder.icmp_signed("<", codes, ir.Constant(_B64, [0] * 64))
            b = [
                builder.select(
                    top,
                    builder.call(fn, [planes[4 * k + 2], codes, planes[4 * k + 3]]),
                    builder.call(fn, [planes[4 * k], codes, planes[4 * k + 1]]),
                )
                for k in range(4)
            ]
            lo = [_interleave(builder, b[0], b[1], 16, h) for h in (False, True)]
            hi = [_interleave(builder, b[2], b[3], 16, h) for h in (False, True)]
            for s in range(4):
                w = _interleave(
                    builder, builder.bitcast(lo[s // 2], _W32), builder.bitcast(hi[s // 2], _W32), 8, bool(s % 2)
                )
                x = builder.bitcast(w, _F16)
                if scaled:  # as decode_rows8: values[code] · scale, squared if root
                    x = builder.fmul(x, scale)
                    x = builder.select(root_v, builder.fmul(x, x), x)
                dest = builder.add(
                    builder.add(out_at, builder.mul(i, ir.Constant(i.type, 256))), ir.Constant(i.type, 64 * s)
                )
                builder.store(x, builder.inttoptr(dest, _F16.as_pointer()), align=4)
        return context.get_dummy_value()

    if scaled:

        @intrinsic
        def decode_rows8_planes_scaled(typingctx, codes_addr, count, planes_addr, scale, root, out_addr):  # noqa: ARG001
            i64 = types.int64
            return types.void(i64, i64, i64, types.float32, types.boolean, i64), codegen

        return decode_rows8_planes_scaled

    @intrinsic
    def decode_rows8_planes(typingctx, codes_addr, count, planes_addr, out_addr):  # noqa: ARG001
        return types.void(types.int64, types.int64, types.int64, types.int64), codegen

    return decode_rows8_planes


#: ``decode_rows8_planes(codes_addr, count, planes_addr, out_addr)``: out[0 : 64·count] =
#: values[codes] (float32 bits, exactly), 8-bit codes: per 64 codes, four ``vpermi2b``
#: pairs look each code's four bytes up in :func:`plane_table`'s planes, a blend on the
#: code's top bit picks the half, and two rounds of interleaving put the bytes together.
#: ~26 instructions per 64 values, where a 16-lane gather costs ~20 cycles on Zen 4.
decode_rows8_planes = _plane_decoder(scaled=False)
#: ``decode_rows8_planes_scaled(codes_addr, count, planes_addr, scale, root, out_addr)``:
#: the same times ``scale``, squared if ``root``: :func:`decode_rows8`'s results.
decode_rows8_planes_scaled = _plane_decoder(scaled=True)
