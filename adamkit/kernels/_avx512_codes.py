"""Codes <-> floats 16 at a time with AVX-512 gathers and permutes.

LLVM emits no gathers for table lookups on this project's machine: its cost model
for the host CPU prefers scalar loads (recent LLVMs mark gathers slow on Intel cores
since the "Downfall" microcode), so the quantized kernels' lookups stayed scalar: 1.7
ns per element to encode, 0.3 to decode, most of a step. Measured here, the gather
instructions themselves are fast enough, so these intrinsics call them directly
(``llvm.x86.avx512.mask.gather.*``, which the backend always lowers to
``vgatherdps``/``vpgatherdd``), per 16 elements:

* **encode** (:func:`adamkit.quant.encoder_table`'s search-free form): the float's bits
  give a table slice; one gather fetches the slice's packed entry (candidate code and
  the low bits of the midpoint inside the slice), one integer compare finishes. 8 bits:
  1.7 ns per element scalar; 1.4 by a binary search over the midpoints with
  ``vpermi2ps`` permutes (one level per bit); 0.7 with two dependent gathers (candidate,
  then its midpoint); the packed table needs one;
* **decode** at 8 bits: one gather from the 256 values; at 4 bits the 16 values fit
  one register and one ``vpermps`` looks them up.

Both compute exactly what the scalar code and the reference do. Used when the CPU has
AVX-512 (``HAS_AVX512``); the scalar table code is the portable path. (A branch-free
arithmetic encoder for the 8-bit dynamic maps, decade by 8 compares then linear within
it, which LLVM did vectorize, ran at 2.1 ns per element.)
"""

from __future__ import annotations

import os

from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ..quant.codebooks import _LOW_BITS, _ONE_BITS, TABLE_BITS

#: Whether the kernels use these paths: the CPU has AVX-512 and ``ADAMKIT_AVX512`` is not
#: ``0`` (which forces the portable scalar path, as the tests do; set it before the first
#: import, with a fresh ``NUMBA_CACHE_DIR``: compiled kernels are cached).
HAS_AVX512 = bool(llvm_binding.get_host_cpu_features().get("avx512f", False)) and os.environ.get(
    "ADAMKIT_AVX512", "1"
) != "0"

_F32 = ir.FloatType()
_I32 = ir.IntType(32)
_I8 = ir.IntType(8)
_F16 = ir.VectorType(_F32, 16)
_I16 = ir.VectorType(_I32, 16)
_M16 = ir.VectorType(ir.IntType(1), 16)
_BYTES = ir.IntType(8).as_pointer()
_SHIFT = 23 - TABLE_BITS
_HALF = ((_ONE_BITS - _LOW_BITS) >> _SHIFT) + 1


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
    def decode16(typingctx, codes_addr, values_addr, scale, root, out_addr):  # noqa: ARG001
        """out[0:16] = values[codes] · scale (squared if root), all raw addresses."""

        def codegen(context, builder, signature, args):
            codes_at, values_at, scale_v, root_v, out_at = args
            codes = _codes_in(builder, codes_at, bits)
            if bits == 8:
                values = _gather(builder, _F16, values_at, codes)
            else:
                fnty = ir.FunctionType(_F16, [_F16, _I16])
                fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.permvar.sf.512")
                table = builder.load(builder.inttoptr(values_at, _F16.as_pointer()), align=4)
                values = builder.call(fn, [table, codes])
            x = builder.fmul(values, _broadcast(builder, scale_v))
            x = builder.select(root_v, builder.fmul(x, x), x)
            builder.store(x, builder.inttoptr(out_at, _F16.as_pointer()), align=4)
            return context.get_dummy_value()

        return types.void(types.int64, types.int64, types.float32, types.boolean, types.int64), codegen

    return decode16


def _make_encode(bits: int):
    @intrinsic
    def encode16(typingctx, row_addr, inv, table_addr, codes_addr):  # noqa: ARG001
        """codes[0:16] = the nearest codes of row[0:16] · inv (ties to the lower code),
        from the packed table of :func:`adamkit.quant.encoder_table`."""

        def codegen(context, builder, signature, args):
            row_at, inv_v, table_at, codes_at = args
            row = builder.load(builder.inttoptr(row_at, _F16.as_pointer()), align=4)
            y = builder.fmul(row, _broadcast(builder, inv_v))
            ybits = builder.bitcast(y, _I16)
            mag = builder.and_(ybits, _splat(0x7FFFFFFF))
            mag = builder.select(builder.icmp_unsigned("<", mag, _splat(_LOW_BITS)), _splat(_LOW_BITS), mag)
            mag = builder.select(builder.icmp_unsigned(">", mag, _splat(_ONE_BITS)), _splat(_ONE_BITS), mag)
            negative = builder.icmp_signed("<", ybits, _splat(0))
            slot = builder.lshr(builder.sub(mag, _splat(_LOW_BITS)), _splat(_SHIFT))
            slot = builder.add(slot, builder.select(negative, _splat(_HALF), _splat(0)))
            entry = _gather(builder, _I16, table_at, slot)
            ylow, tlow = builder.and_(mag, _splat(0xFFFF)), builder.and_(entry, _splat(0xFFFF))
            above = builder.select(
                negative, builder.icmp_unsigned("<", ylow, tlow), builder.icmp_unsigned(">", ylow, tlow)
            )
            codes = builder.add(builder.lshr(entry, _splat(16)), builder.zext(above, _I16))
            _codes_out(builder, codes_at, codes, bits)
            return context.get_dummy_value()

        return types.void(types.int64, types.float32, types.int64, types.int64), codegen

    return encode16


decode16_8 = _make_decode(8)
decode16_4 = _make_decode(4)
encode16_8 = _make_encode(8)
encode16_4 = _make_encode(4)
