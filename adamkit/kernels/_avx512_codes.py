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
* **encode, 4 bits**: a binary search over the 15 midpoints in one register, a
  ``vpermps`` and a compare per level (``normal4``; exact), or for the linear maps
  ``clamp(ceil(16 y - 1.5), 0, 15)`` with ``vcvtps2dq``'s round-up mode (exact);
* **decode**: at 8 bits one gather from the 256 values (a tree of eight ``vpermi2ps``
  and seven blends was slower: 0.19 ns vs 0.15); at 4 bits one ``vpermps``.

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

from ..quant.codebooks import _DECADE_FLOOR_BITS, codebook, decade_tables

#: Whether the kernels use these paths: the CPU has AVX-512 and ``ADAMKIT_AVX512`` is not
#: ``0`` (which forces the portable scalar path, as the tests do; set it before the first
#: import, with a fresh ``NUMBA_CACHE_DIR``: compiled kernels are cached).
HAS_AVX512 = (
    bool(llvm_binding.get_host_cpu_features().get("avx512f", False)) and os.environ.get("ADAMKIT_AVX512", "1") != "0"
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


def _make_decode(bits: int):
    @intrinsic
    def decode_rows(typingctx, codes_addr, count, values_addr, scale, root, out_addr):  # noqa: ARG001
        """out[0 : 16·count] = values[codes] · scale (squared if root), raw addresses."""

        def codegen(context, builder, signature, args):
            codes_at, count_v, values_at, scale_v, root_v, out_at = args
            scale = _broadcast(builder, scale_v)
            if bits == 4:
                fnty = ir.FunctionType(_F16, [_F16, _I16])
                fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.permvar.sf.512")
                table = builder.load(builder.inttoptr(values_at, _F16.as_pointer()), align=4)
            with cgutils.for_range(builder, count_v) as loop:
                i = loop.index
                codes = _codes_in(builder, builder.add(codes_at, builder.mul(i, ir.Constant(i.type, 2 * bits))), bits)
                if bits == 8:
                    values = _gather(builder, _F16, values_at, codes)
                else:
                    values = builder.call(fn, [table, codes])
                x = builder.fmul(values, scale)
                x = builder.select(root_v, builder.fmul(x, x), x)
                at = builder.add(out_at, builder.mul(i, ir.Constant(i.type, 64)))
                builder.store(x, builder.inttoptr(at, _F16.as_pointer()), align=4)
            return context.get_dummy_value()

        sig = types.void(types.int64, types.int64, types.int64, types.float32, types.boolean, types.int64)
        return sig, codegen

    return decode_rows


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
        self.rows = [builder.load(builder.gep(base, [ir.Constant(_I32, k)]), align=64) for k in range(count)]

    def f(self, k: int) -> ir.Value:
        return self.rows[k]

    def i(self, k: int) -> ir.Value:
        return self.builder.bitcast(self.rows[k], _I16)


def _row_encoder(bits: int, table_rows: int, body):
    """An intrinsic ``encode_rows(row_addr, count, inv, table_addr, codes_addr)``: the codes
    of ``row[0 : 16·count] · inv`` by ``body(builder, constants, y) -> codes``, with the
    table's ``table_rows`` rows loaded into registers once, before the loop."""

    @intrinsic
    def encode_rows(typingctx, row_addr, count, inv, table_addr, codes_addr):  # noqa: ARG001
        def codegen(context, builder, signature, args):
            row_at, count_v, inv_v, table_at, codes_at = args
            k = _Rows(builder, table_at, table_rows)
            scale = _broadcast(builder, inv_v)
            with cgutils.for_range(builder, count_v) as loop:
                i = loop.index
                at = builder.add(row_at, builder.mul(i, ir.Constant(i.type, 64)))
                y = builder.fmul(builder.load(builder.inttoptr(at, _F16.as_pointer()), align=4), scale)
                codes = body(builder, k, y)
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


def search_constants(name: str) -> np.ndarray:
    """A 4-bit codebook's binary-search table (see :data:`encode_rows_search4`): its
    middle midpoint, then the midpoints shifted by 3, 1 and 0 (+inf past the end)."""
    mids = np.concatenate([codebook(name).midpoints.numpy(), [np.inf]]).astype(np.float32)
    return _table([mids[7], np.roll(mids, -3), np.roll(mids, -1), mids])


def _search_body(builder: ir.IRBuilder, k: _Rows, y: ir.Value) -> ir.Value:
    """4-bit codebooks: a binary search over the 15 midpoints held in registers, one
    ``vpermps`` per level (tables shifted so the running code indexes them): exact."""
    one = _permutes(builder)[0]
    codes = builder.shl(builder.zext(builder.fcmp_ordered(">", y, k.f(0)), _I16), _splat(3))
    for shift, row in ((2, 1), (1, 2), (0, 3)):  # adds 4, 2, 1
        above = builder.zext(builder.fcmp_ordered(">", y, builder.call(one, [k.f(row), codes])), _I16)
        codes = builder.add(codes, builder.shl(above, _splat(shift)) if shift else above)
    return codes


def linear_constants() -> np.ndarray:
    """The 4-bit linear maps' encoder table (see :data:`encode_rows_linear4`)."""
    return _table([16.0, 1.5, np.int32(0), np.int32(15)])


def _linear_body(builder: ir.IRBuilder, k: _Rows, y: ir.Value) -> ir.Value:
    """The 4-bit linear maps ``(i + 1) / 16``: the code is the number of midpoints
    ``(i + 1.5) / 16`` below ``y``, ``clamp(ceil(16 y - 1.5), 0, 15)``; ``16 y`` and the
    subtraction are exact in float32, so this is the binary search's result."""
    z = builder.fsub(builder.fmul(y, k.f(0)), k.f(1))
    fnty = ir.FunctionType(_I16, [_F16, _I16, ir.IntType(16), _I32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.mask.cvtps2dq.512")
    low, high = k.i(2), k.i(3)
    up = builder.call(fn, [z, low, ir.Constant(ir.IntType(16), -1), ir.Constant(_I32, 10)])  # round up
    up = builder.select(builder.icmp_signed("<", up, low), low, up)
    return builder.select(builder.icmp_signed(">", up, high), high, up)


#: The codebooks' row encoders: ``encode_rows(row_addr, count, inv, table_addr,
#: codes_addr)`` writes the codes of ``row[0 : 16·count] · inv``.
encode_rows_dynamic8 = _row_encoder(8, 15, _decade_body(signed=True))
encode_rows_udynamic8 = _row_encoder(8, 15, _decade_body(signed=False))
encode_rows_search4 = _row_encoder(4, 4, _search_body)
encode_rows_linear4 = _row_encoder(4, 4, _linear_body)

#: Each codebook's 16-wide encoder constants.
ENCODER_CONSTANTS = {
    "dynamic8": lambda: decade_constants("dynamic8"),
    "udynamic8": lambda: decade_constants("udynamic8"),
    "normal4": lambda: search_constants("normal4"),
    "sqrt_linear4": linear_constants,
    "linear4": linear_constants,
}

decode_rows8 = _make_decode(8)
decode_rows4 = _make_decode(4)
