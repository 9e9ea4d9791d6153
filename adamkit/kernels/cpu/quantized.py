"""Fused CPU kernels for block-quantized state (``state_bits`` 8 and 4), in Numba.

Same launch as :mod:`adamkit.kernels.cpu.dense` (address tables, chunks claimed from a
shared counter by ``torch.get_num_threads()`` threads, one call for many tensors), same
per-element rules (``_adam_rule``, ``_adamax_rule``). Per block of ``block_size``
elements, in one pass over memory:

1. decode each state tensor's codes into a per-thread scratch row in L1
   (``codebook[code] · absmax``; squared for a ``root`` codebook);
2. apply the rule from and into the rows and store the parameters; this loop has only
   contiguous floats, so LLVM vectorizes it (decoding inside it kept it scalar), and it
   also takes each row's largest magnitude (an integer max over the float bits);
3. encode the rows with the block's new absmax and store codes and absmax.

With AVX-512, Adam/AdamW's full blocks (without AMSGrad or stochastic rounding: the
common case) do steps 1 and 2 in one loop over 16 elements at a time
(:mod:`adamkit.kernels.cpu._avx512_adam`: 8-bit 0.83x -> 1.02x torch fused fp32 on 16M
elements); with AVX2, 8-bit blocks do, 8 at a time (:mod:`adamkit.kernels.cpu._avx2_quant`),
and encoding, like the other variants' decoding, goes a row at a time
through :mod:`adamkit.kernels.cpu._avx512_codes` (8-bit codes from the float's exponent and
register permutes; dithered 4-bit ones from 32-cell tables in registers). The portable
path, and the rows' last few elements, encode 8-bit codes by
:func:`adamkit.quant.encoder_table`'s search-free form (the float's bits pick a table
slice, one load gives the candidate code and the low bits of the slice's midpoint, one
integer compare finishes: the reference's codes exactly) and 4-bit ones with the same
cell tables as the SIMD code, one element at a time. The dither (see
:mod:`adamkit.quant.blockwise`) needs each block's first element index and the step:
``phase``, the step's term, is an argument, and codes are decoded with the previous
step's.

Chunks hold whole blocks (``CHUNK`` is a multiple of ``block_size``; other block sizes
and one absmax per tensor go to the reference). Masking non-finite gradients (``mask``):
the element :func:`~adamkit.kernels.cpu.dense._masked` picks (a NaN/±inf gradient, or
one so large that its moments overflowed) keeps its parameter and its decoded state,
re-encoded with the block's new absmax. Only blocks whose gradient holds a NaN/±inf or
a magnitude of ``HUGE`` or more (a scan of the gradient finds them) pay for the
selects, in the numba loop (selecting in every vector cost 2-4 % of the AVX-512 8-bit
step, ~15 % of the AVX2 one). Encoding, the block's absmax is its largest finite
magnitude and a non-finite value is stored saturated (:func:`_scale`, as the
reference), so that a NaN under ``nonfinite="propagate"`` stays in its element.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic
from torch import Tensor

from ..._scalars import StepScalars, rule_consts
from ...quant import QUANT_BITS, QuantFormat
from ...quant.codebooks import (
    _LOW_BITS,
    _ONE_BITS,
    DITHER_ALONG,
    DITHER_STEP,
    TABLE_BITS,
    dither_phase,
    dither_tables,
    encoder_table,
)
from ...spec import ALGORITHMS, BOOK_ROLES
from .._tables import CHUNK, Tables, tables_for
from ..registry import register
from . import dense as nc
from ._avx512_codes import plane_table
from ._simd import (
    FLOORED8,
    FUSED4,
    LANES,
    PLANES8,
    SIMD,
    TAPERED8,
    adam_rows_4,
    adam_rows_8,
    adam_rows_8d,
    decode_rows8,
    decode_rows8_planes,
    decode_rows8_planes_scaled,
    decode_rows_dither4,
    encode_rows_dither4,
    encode_rows_m8,
    encode_rows_tm8,
    encode_rows_tv8,
    encode_rows_v8,
    encoder_constants,
)
from .dense import (
    _U,
    _adam_rule,
    _adamax_rule,
    _claim,
    _load,
    _masked,
    _nadam_rule,
    _prefetch,
    _store_param,
    _tame,
    _tensor_seed,
    _view,
    _wide_vectors,
)

_SHIFT = 23 - TABLE_BITS
_HALF = ((_ONE_BITS - _LOW_BITS) >> _SHIFT) + 1


@intrinsic
def _encode(typingctx, y, table):  # noqa: ARG001
    """The nearest code of a normalized float32 from the packed encoder table (see
    :func:`adamkit.quant.encoder_table`), in 32-bit integer IR (numba's are 64-bit)."""

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        bits = builder.bitcast(args[0], i32)
        mag = builder.and_(bits, ir.Constant(i32, 0x7FFFFFFF))
        low, one = ir.Constant(i32, _LOW_BITS), ir.Constant(i32, _ONE_BITS)
        mag = builder.select(builder.icmp_unsigned("<", mag, low), low, mag)
        mag = builder.select(builder.icmp_unsigned(">", mag, one), one, mag)
        index = builder.lshr(builder.sub(mag, low), ir.Constant(i32, _SHIFT))
        negative = builder.icmp_signed("<", bits, ir.Constant(i32, 0))
        index = builder.add(index, builder.select(negative, ir.Constant(i32, _HALF), ir.Constant(i32, 0)))
        array = context.make_array(signature.args[1])(context, builder, args[1])
        entry = builder.load(builder.gep(array.data, [builder.zext(index, ir.IntType(64))]))
        cand = builder.lshr(entry, ir.Constant(i32, 16))
        mask = ir.Constant(i32, 0xFFFF)
        ylow, tlow = builder.and_(mag, mask), builder.and_(entry, mask)
        above = builder.select(negative, builder.icmp_unsigned("<", ylow, tlow), builder.icmp_unsigned(">", ylow, tlow))
        return builder.add(cand, builder.zext(above, i32))

    return types.int32(types.float32, table), codegen


@intrinsic
def _magnitude_bits(typingctx, x):  # noqa: ARG001
    """``|x|``'s float32 bits as an int32: their integer max is the largest magnitude
    (NaN above +inf)."""

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        return builder.and_(builder.bitcast(args[0], i32), ir.Constant(i32, 0x7FFFFFFF))

    return types.int32(types.float32), codegen


@intrinsic
def _from_bits(typingctx, b):  # noqa: ARG001
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def _put_f32(typingctx, addr, x):  # noqa: ARG001
    """Store a float32 at a raw address (an unordered atomic store: a plain store into a
    ``carray`` view, never read afterwards in the kernel, was dropped by LLVM as dead)."""

    def codegen(context, builder, signature, args):
        ptr = builder.inttoptr(args[0], ir.FloatType().as_pointer())
        builder.store_atomic(args[1], ptr, ordering="unordered", align=4)
        return context.get_dummy_value()

    return types.void(types.int64, types.float32), codegen


@intrinsic
def _put_u8(typingctx, addr, x):  # noqa: ARG001
    """Store the low byte of an integer at a raw address (unordered atomic, as
    :func:`_put_f32`: the odd last code of a tensor was dropped the same way)."""

    def codegen(context, builder, signature, args):
        i8 = ir.IntType(8)
        ptr = builder.inttoptr(args[0], i8.as_pointer())
        builder.store_atomic(builder.trunc(args[1], i8), ptr, ordering="unordered", align=1)
        return context.get_dummy_value()

    return types.void(types.int64, x), codegen


@njit(inline="always")
def _code(codes, i, bits):
    if bits == 8:
        return codes[i]
    return (codes[i >> 1] >> ((i & 1) << 2)) & 15


@njit(inline="always")
def _decode(codes, i, vals, scale, bits, root):
    x = vals[_code(codes, i, bits)] * scale
    return x * x if root else x


_M32 = 0xFFFFFFFF
_A_LOW, _A_HIGH = DITHER_ALONG & 0xFFFF, DITHER_ALONG >> 16


@njit(inline="always")
def _dither_hash(h0, i):
    """The dither hash of the element ``i`` places after the one whose hash is ``h0``:
    ``h0 + i · DITHER_ALONG mod 2^32`` (16-bit halves: no int64 overflow)."""
    j = i & _M32
    return (h0 + j * _A_LOW + (((j * _A_HIGH) & 0xFFFF) << 16)) & _M32


@njit(inline="always")
def _decode_dither(code, h, tab):
    """A dithered 4-bit code's value (before the block's scale), ``h`` its dither hash;
    ``tab``: the codebook's :func:`~adamkit.kernels.cpu._avx512_codes.dither_constants`."""
    back = 32768 - (h >> 16)
    slope = tab[3, code] if back >= 0 else tab[4, code]
    return tab[0, code] + np.float32(back) * slope


@njit(inline="always")
def _encode_dither(y, h, tab, first):
    """A normalized value's dithered 4-bit code (the reference's, operation for operation;
    NaN as ``L[0]``, above 2 as 2: always a code of 0..15)."""
    y = y if y > tab[14, 0] else tab[14, 0]
    y = min(y, np.float32(2.0))
    cell = min(max(int(y * tab[9, 0] + tab[10, 0]), 0), 31)
    k = first[cell] + (1 if y >= tab[5 + (cell >> 4), cell & 15] else 0)
    position = int(y * tab[1, k] + tab[2, k])
    return min((position + (h >> 16)) >> 16, 15)


_INF_BITS = np.int32(0x7F800000)
_TINY_BITS = np.int32(0x00800000)  # 2^-126, float32's smallest normal
_UP = np.float32(2.0**64)
#: ``udynamic8``'s first nonzero value, 3.25e-7: a normalized value below it may take code 0.
_FLOOR_Y = np.float32(encoder_table("udynamic8")[2][1])


@njit
def _saturate(row, n):
    """Non-finite values of ``row[:n]`` to ± its largest finite magnitude (NaN to +);
    returns that magnitude's bits."""
    top = np.int32(0)
    for i in range(n):
        b = _magnitude_bits(row[i])
        if b < _INF_BITS:
            top = max(top, b)
    absmax = _from_bits(top)
    for i in range(n):
        x = row[i]
        if not (x - x == 0):
            row[i] = -absmax if x < 0 else absmax
    return top


@njit(inline="always")
def _scale(row, n, top):
    """(absmax, 1 / absmax) of ``row[:n]``, whose largest magnitude's bits are ``top``
    (NaN above +inf), as the reference's ``quantize``: a non-finite value saturated
    first, a row whose absmax is subnormal multiplied by 2^64 (exact; ``1 / absmax``
    would overflow). Both rare, in portable code after the SIMD loops: the same on
    every ISA."""
    if top >= _INF_BITS:
        top = _saturate(row, n)
    absmax = _from_bits(top)
    if top >= _TINY_BITS:
        return absmax, np.float32(1.0) / absmax
    if top == 0:
        return absmax, np.float32(0.0)
    for i in range(n):
        row[i] *= _UP
    return absmax, np.float32(1.0) / (absmax * _UP)


@njit(inline="always")
def _encode_block8(codes, absmax_at, row, n, top, book, encode_rows, h0, floor):
    """Encode ``row[:n]`` (largest magnitude's bits ``top``, see :func:`_scale`) into
    ``codes``; store its absmax at ``absmax_at``. With SIMD a vector at a time by
    ``encode_rows`` (the codebook's decade encoder in ``_avx512_codes`` or
    ``_avx2_quant``), the rest from the packed table (:func:`adamkit.quant.encoder_table`).
    ``floor`` (an unsigned map whose code 0 is 0): a value above 0 takes code 1 at least
    (with AVX-512, :data:`FLOORED8`, the unsigned map's SIMD encoder does that itself for
    its part of the row: it is the encoder of the maps that need it, so ``floor`` is True
    wherever it runs)."""
    packed = book[1]
    absmax, inv = _scale(row, n, top)
    done = 0
    if SIMD:
        done = n & ~(LANES - 1)
        encode_rows(row.ctypes.data, done // LANES, inv, book[3].ctypes.data, codes.ctypes.data, h0)
    for i in range(done, n):
        codes[i] = _encode(row[i] * inv, packed)
    start = done if FLOORED8 else 0  # the SIMD encoder floors its part itself (AVX-512)
    if floor and inv > 0 and start < n:
        # only a row holding a value above 0 that may round to code 0 (below twice the
        # first nonzero code's value) pays the pass over the codes: reading codes just
        # stored cost ~8 % of the 8-bit step, this scan of the row ~2 %
        lim = np.float32(2.0) * _FLOOR_Y / inv
        low = False
        for i in range(start, n):
            low |= (row[i] > np.float32(0.0)) & (row[i] < lim)
        if low:
            for i in range(start, n):
                codes[i] = max(codes[i], np.uint8(row[i] > np.float32(0.0)))
    _put_f32(absmax_at, absmax)


@njit(inline="always")
def _encode_block4(codes, absmax_at, row, n, top, book, encode_rows, h0, floor):
    """:func:`_encode_block8` for dithered 4-bit codes, two per byte (low nibble first);
    ``h0``: the block's first element's dither hash for this step (no ``floor``: the
    4-bit maps of second moments have no 0)."""
    tab, first = book[0], book[1]
    absmax, inv = _scale(row, n, top)
    done = 0
    if SIMD:
        done = n & ~(LANES - 1)
        encode_rows(row.ctypes.data, done // LANES, inv, tab.ctypes.data, codes.ctypes.data, h0)
    for i in range(done >> 1, n >> 1):
        lo = _encode_dither(row[2 * i] * inv, _dither_hash(h0, 2 * i), tab, first)
        hi = _encode_dither(row[2 * i + 1] * inv, _dither_hash(h0, 2 * i + 1), tab, first)
        codes[i] = lo | (hi << 4)
    if n & 1:
        last = _encode_dither(row[n - 1] * inv, _dither_hash(h0, n - 1), tab, first)
        _put_u8(codes.ctypes.data + (n >> 1), last)
    _put_f32(absmax_at, absmax)


# The codebooks' row encoders as functions the kernels take as arguments (the dither
# hash ``h0`` is for the 4-bit one).
@njit(inline="always")
def _dynamic8(row_at, count, inv, table_at, codes_at, h0):
    encode_rows_m8(row_at, count, inv, table_at, codes_at)


@njit(inline="always")
def _udynamic8(row_at, count, inv, table_at, codes_at, h0):
    encode_rows_v8(row_at, count, inv, table_at, codes_at)


@njit(inline="always")
def _dither4(row_at, count, inv, table_at, codes_at, h0):
    encode_rows_dither4(row_at, count, inv, table_at, codes_at, h0)


_F32_LIKE = np.empty(0, np.float32)
_U8_LIKE = np.empty(0, np.uint8)
_I32_LIKE = np.empty(0, np.int32)


@njit(inline="always")
def _packed8(row_at, count, inv, table_at, codes_at):
    """Codes of ``row[0 : LANES·count] · inv`` from the packed search-free table at
    ``table_at`` (:func:`adamkit.quant.encoder_table`: any 8-bit nearest codebook), an
    element at a time: the tapered maps' row encoder without AVX-512."""
    n = count * LANES
    row = numba.carray(_view(row_at, _F32_LIKE), n)
    codes = numba.carray(_view(codes_at, _U8_LIKE), n)
    packed = numba.carray(_view(table_at, _I32_LIKE), 2 * _HALF)
    for i in range(n):
        codes[i] = _encode(row[i] * inv, packed)


@njit(inline="always")
def _tapered8(row_at, count, inv, table_at, codes_at, h0):
    if TAPERED8:
        encode_rows_tm8(row_at, count, inv, table_at, codes_at)
    else:
        _packed8(row_at, count, inv, table_at, codes_at)


@njit(inline="always")
def _utapered8(row_at, count, inv, table_at, codes_at, h0):
    if TAPERED8:
        encode_rows_tv8(row_at, count, inv, table_at, codes_at)
    else:
        _packed8(row_at, count, inv, table_at, codes_at)


#: Codebooks (first moment, second moment / maximum / exp_inf) the kernels are compiled
#: for, per (state bits, tapered maps): ``_step`` checks the format's.
KERNEL_CODEBOOKS = {
    (8, False): ("dynamic8", ("udynamic8",)),
    (8, True): ("tapered8", ("utapered8",)),
    (4, False): ("normal4_dither", ("sqrt_geo4_dither", "geo4_dither")),
}


@njit(inline="always")
def _unowned(a):
    """A view of ``a`` that owns no memory (no reference counting); ``a`` must outlive it."""
    return numba.carray(_view(a.ctypes.data, a), a.shape)


@njit(inline="always")
def _unowned_book(book):
    return _unowned(book[0]), _unowned(book[1]), book[2], _unowned(book[3]), _unowned(book[4])


@njit(inline="always")
def _col(ptrs, t, col, lo, n, like):
    return numba.carray(_view(ptrs[t, col] + lo * like.itemsize, like), n)


#: Elements ahead of the current block whose lines are prefetched (parameters,
#: gradients, codes), as the 32-bit kernels do.
AHEAD = 512


@njit(inline="always")
def _ahead(ptrs, t, start, n, size, bits, amsgrad):
    if n <= 0:
        return
    for off in range(0, n * size, 64):
        _prefetch(ptrs[t, 0] + start * size + off)
        _prefetch(ptrs[t, 1] + start * size + off)
    first = start if bits == 8 else start >> 1
    for off in range(0, n if bits == 8 else (n + 1) >> 1, 64):
        _prefetch(ptrs[t, 2] + first + off)
        _prefetch(ptrs[t, 4] + first + off)
        if amsgrad:
            _prefetch(ptrs[t, 6] + first + off)


@njit(inline="always")
def _q_chunks(
                ptrs, chunks, units, counter, scal, salts, plike, consts, sr, seed, books, block, simd, phase,
                bits,
              fused, update, decode_row, encode_block, encode_m, encode_v, amsgrad, mask, root):  # fmt: skip
    """One algorithm on quantized state, over the work units this thread claims.

    ptrs: int64 [n, 2 + 2·keys]: param, grad, then (codes, absmax) per state key;
    ``books``: (values, packed encoder table, root, encoder constants, byte planes) per
    key (:func:`_book_tables`).
    ``fused`` (Adam/AdamW's SIMD block loop, :func:`_fused8` or :func:`_fused4`, or :func:`_none`),
    ``update`` (the algorithm's block), ``decode_row`` and ``encode_block`` (the bit
    width's), ``encode_m`` and ``encode_v`` (the codebooks' row encoders) are functions
    passed in, so each compiled variant holds only its own code: with flags and
    branches instead, numba typed every variant's code in each (its dead-branch pruning
    runs before inlining) and the first 8-bit step compiled for 10.5 s.
    ``amsgrad``, ``mask`` and ``root`` (the second moment's codebook encodes its square
    root) are constants at every call, so LLVM folds them away: read from ``books`` at
    run time, ``root`` left a square root and a select in the 8-bit update loop.
    ``simd``: :data:`FUSED_BLOCKS`. ``phase``: the step's term of the 4-bit dither hash
    (:func:`adamkit.quant.codebooks.dither_phase`); codes are decoded with the previous
    step's. Returns the number of masked elements."""
    _wide_vectors()
    u8 = np.empty(0, np.uint8)
    f32 = np.empty(0, np.float32)
    # the block loop sees the scratch rows and the codebooks' tables through views that
    # own nothing: numba counts references to owned arrays with atomic calls, ~20 of
    # them per block, 65 ns per 128-element block at 4 bits
    scratch = np.empty((3, block), np.float32)
    rows = _unowned(scratch)
    books = (_unowned_book(books[0]), _unowned_book(books[1]), _unowned_book(books[2]))
    bad = 0
    while True:
        c_lo, c_hi = _claim(units, counter)
        if c_lo == c_hi:
            break
        for c in range(c_lo, c_hi):
            t, lo, hi = chunks[c, 0], chunks[c, 1], chunks[c, 2]
            stream = _tensor_seed(seed, salts[t]) if sr else _U(0)
            for b in range(lo, hi, block):
                n = min(b + block, hi) - b
                k = b // block
                he = _dither_hash(phase, b)  # the block's first element's dither, this step
                hd = (he - DITHER_STEP) & _M32  # and the last step's
                first = b if bits == 8 else b >> 1
                nbytes = n if bits == 8 else (n + 1) >> 1
                p, g = _col(ptrs, t, 0, b, n, plike), _col(ptrs, t, 1, b, n, plike)
                mc, ma = _col(ptrs, t, 2, first, nbytes, u8), _col(ptrs, t, 3, 0, k + 1, f32)
                sc, sa = _col(ptrs, t, 4, first, nbytes, u8), _col(ptrs, t, 5, 0, k + 1, f32)
                if amsgrad:
                    xc, xa = _col(ptrs, t, 6, first, nbytes, u8), _col(ptrs, t, 7, 0, k + 1, f32)
                else:
                    xc, xa = sc, sa
                # masking costs selects in every vector (8 bits: ~15 % of the step in the
                # AVX2 block loop, 0.6 ms per 16M elements in the numba loop; 4 bits: 2 ms):
                # only blocks whose gradient holds a NaN/±inf or a magnitude of HUGE or
                # more pay them, in the numba loop
                dirty = mask and not _tame(g)
                # Adam/AdamW's other full blocks: one SIMD loop (_fused8/_fused4), prefetching too
                done, mtop, stop = fused(p, g, mc, ma[k], sc, sa[k], n, rows, books, scal[t, 0], scal[t, 1],
                                         consts, sr or dirty or not simd, hd)  # fmt: skip
                nbad, xtop = 0, np.int32(0)
                if not done:
                    _ahead(ptrs, t, b + AHEAD, min(n, hi - b - AHEAD), plike.itemsize, bits, amsgrad)
                    if dirty:
                        nbad, mtop, stop, xtop = update(
                            p, g, mc, ma[k], sc, sa[k], xc, xa[k], n, rows, books, scal[t, 0], scal[t, 1],
                            scal[t, 2], consts, sr, stream, b, hd, decode_row, amsgrad, True, root,
                        )  # fmt: skip
                    else:
                        nbad, mtop, stop, xtop = update(
                            p, g, mc, ma[k], sc, sa[k], xc, xa[k], n, rows, books, scal[t, 0], scal[t, 1],
                            scal[t, 2], consts, sr, stream, b, hd, decode_row, amsgrad, False, root,
                        )  # fmt: skip
                bad += nbad
                encode_block(mc, ptrs[t, 3] + 4 * k, rows[0], n, mtop, books[0], encode_m, he, False)
                encode_block(sc, ptrs[t, 5] + 4 * k, rows[1], n, stop, books[1], encode_v, he, True)
                if amsgrad:
                    encode_block(xc, ptrs[t, 7] + 4 * k, rows[2], n, xtop, books[2], encode_v, he, True)
    return bad + 0 * scratch.size  # scratch lives to here


@njit(inline="always")
def _fused_ok(n, skip, consts):
    """Whether a block can go through the SIMD block loop: not ``skip`` (stochastic
    rounding, a gradient to mask, SIMD blocks off), ``n`` a multiple of the lanes, ``ε``
    a normal float."""
    return not skip and n % LANES == 0 and consts.eps >= np.float32(1.2e-38)


@njit(inline="always")
def _rows_args(p, g, mc, mscale, sc, sscale, n, rows, books, lr_t, inv, consts, hd):
    c = consts
    return (p.ctypes.data, g.ctypes.data, mc.ctypes.data, sc.ctypes.data, n // LANES, rows[0].ctypes.data,
            rows[1].ctypes.data, books[0][0].ctypes.data, books[1][0].ctypes.data, mscale, sscale, c.low, c.c1, c.b2,
            c.b2w, c.eps, c.decay, c.l2, c.gsign, lr_t, inv, hd, p)  # fmt: skip


# The ``fused`` of Adam/AdamW: full blocks through the SIMD block loop (_avx512_adam or
# _avx2_quant) when it can, returning (done, largest |m| bits, largest |v| bits); not
# done: the caller's numba loop runs. ``if SIMD`` / ``if FUSED4``: a lone global in the
# condition, so numba prunes the branch where that code is absent.
@njit(inline="always")
def _fused8(p, g, mc, mscale, sc, sscale, n, rows, books, lr_t, inv, consts, skip, hd):
    if SIMD:
        if _fused_ok(n, skip, consts):
            if PLANES8:
                if n % 64 == 0:
                    decode_rows8_planes(mc.ctypes.data, n // 64, books[0][4].ctypes.data, rows[0].ctypes.data)
                    decode_rows8_planes(sc.ctypes.data, n // 64, books[1][4].ctypes.data, rows[1].ctypes.data)
                    args = _rows_args(p, g, mc, mscale, sc, sscale, n, rows, books, lr_t, inv, consts, hd)
                    mtop, vtop = adam_rows_8d(*args)
                    return True, mtop, vtop
            mtop, vtop = adam_rows_8(*_rows_args(p, g, mc, mscale, sc, sscale, n, rows, books, lr_t, inv, consts, hd))
            return True, mtop, vtop
    return False, np.int32(0), np.int32(0)


@njit(inline="always")
def _fused4(p, g, mc, mscale, sc, sscale, n, rows, books, lr_t, inv, consts, skip, hd):
    if FUSED4:
        if _fused_ok(n, skip, consts):
            mtop, vtop = adam_rows_4(*_rows_args(p, g, mc, mscale, sc, sscale, n, rows, books, lr_t, inv, consts, hd))
            return True, mtop, vtop
    return False, np.int32(0), np.int32(0)


@njit(inline="always")
def _none(p, g, mc, mscale, sc, sscale, n, rows, books, lr_t, inv, consts, skip, hd):
    """The ``fused`` of AMSGrad and Adamax: no block done here."""
    return False, np.int32(0), np.int32(0)


@njit(inline="always")
def _decode_row8(row, codes, book, scale, n, root, h0):
    """``row[:n]`` = the decoded 8-bit ``codes`` (a vector at a time with SIMD; with
    :data:`PLANES8`, 64 at a time from the byte planes first)."""
    vals = book[0]
    planed = 0
    if PLANES8:
        planed = n & ~63
        decode_rows8_planes_scaled(codes.ctypes.data, planed // 64, book[4].ctypes.data, scale, root, row.ctypes.data)
    done = 0
    if SIMD:
        done = n & ~(LANES - 1)
        count = (done - planed) // LANES
        decode_rows8(codes.ctypes.data + planed, count, vals.ctypes.data, scale, root, row.ctypes.data + 4 * planed)
    for i in range(done, n):
        row[i] = _decode(codes, i, vals, scale, 8, root)


@njit(inline="always")
def _decode_row4(row, codes, book, scale, n, root, h0):
    """``row[:n]`` = the decoded dithered 4-bit ``codes`` (``h0``: the first one's dither
    hash, of the step that wrote them)."""
    tab = book[0]
    done = 0
    if SIMD:
        done = n & ~(LANES - 1)
        decode_rows_dither4(codes.ctypes.data, done // LANES, tab.ctypes.data, scale, root, row.ctypes.data, h0)
    for i in range(done, n):
        x = _decode_dither(_code(codes, i, 4), _dither_hash(h0, i), tab) * scale
        row[i] = x * x if root else x


@njit(inline="always")
def _q_block_adam(p, g, mc, mscale, sc, sscale, xc, xscale, n, rows, books, lr_t, inv, gstep, consts, sr, stream,
                  j0, hd, decode_row, amsgrad, mask, root):  # fmt: skip
    """Decode the state into ``rows`` with ``decode_row``, then update from and into the
    rows and store the parameters (contiguous floats: this loop vectorizes); rows of
    root codebooks end up holding roots. Returns the number of masked elements."""
    m, v, x = rows[0], rows[1], rows[2]
    decode_row(m, mc, books[0], mscale, n, False, hd)
    decode_row(v, sc, books[1], sscale, n, root, hd)
    if amsgrad:
        decode_row(x, xc, books[2], xscale, n, root, hd)
    bad = 0
    mtop, vtop, xtop = np.int32(0), np.int32(0), np.int32(0)  # the rows' largest magnitudes' bits
    c = consts
    low, b1w, c1, b2, b2w, eps, decay, l2, gsign = c.low, c.b1w, c.c1, c.b2, c.b2w, c.eps, c.decay, c.l2, c.gsign
    for i in range(n):
        gi, pi, mi, vi = _load(g, i), _load(p, i), m[i], v[i]
        xi = x[i] if amsgrad else vi
        p1, m1, v1, x1 = _adam_rule(
            gi, pi, mi, vi, xi, low, b1w, c1, b2, b2w, eps, lr_t, inv, decay, l2, gsign, amsgrad
        )  # fmt: skip
        if mask:
            ok = not _masked(gi, m1, v1, x1)
            bad += not ok
            p1 = p1 if ok else pi
            m1 = m1 if ok else mi
            v1 = v1 if ok else vi
            x1 = x1 if ok else xi
        _store_param(p, i, p1, sr, stream, j0 + i)
        v2 = np.sqrt(v1) if root else v1
        m[i] = m1
        v[i] = v2
        mtop = max(mtop, _magnitude_bits(m1))
        vtop = max(vtop, _magnitude_bits(v2))
        if amsgrad:
            x2 = np.sqrt(x1) if root else x1
            x[i] = x2
            xtop = max(xtop, _magnitude_bits(x2))
    return bad, mtop, vtop, xtop


@njit(inline="always")
def _q_block_adamax(p, g, mc, mscale, sc, sscale, xc, xscale, n, rows, books, lr_t, inv, gstep, consts, sr, stream,
                    j0, hd, decode_row, amsgrad, mask, root):  # fmt: skip
    """Adamax's :func:`_q_block_adam` (``xc``, ``xscale``, ``inv``, ``gstep``, ``amsgrad`` unused)."""
    m, v = rows[0], rows[1]
    decode_row(m, mc, books[0], mscale, n, False, hd)
    decode_row(v, sc, books[1], sscale, n, root, hd)
    bad = 0
    mtop, vtop = np.int32(0), np.int32(0)
    c = consts
    low, c1, b2, eps, l2, gsign = c.low, c.c1, c.b2, c.eps, c.l2, c.gsign
    for i in range(n):
        gi, pi, mi, ui = _load(g, i), _load(p, i), m[i], v[i]
        p1, m1, u1 = _adamax_rule(gi, pi, mi, ui, low, c1, b2, eps, lr_t, l2, gsign)
        if mask:
            ok = not _masked(gi, m1, u1, u1)
            bad += not ok
            p1 = p1 if ok else pi
            m1 = m1 if ok else mi
            u1 = u1 if ok else ui
        _store_param(p, i, p1, sr, stream, j0 + i)
        u2 = np.sqrt(u1) if root else u1
        m[i] = m1
        v[i] = u2
        mtop = max(mtop, _magnitude_bits(m1))
        vtop = max(vtop, _magnitude_bits(u2))
    return bad, mtop, vtop, np.int32(0)


@njit(inline="always")
def _q_block_nadam(p, g, mc, mscale, sc, sscale, xc, xscale, n, rows, books, lr_t, inv, gstep, consts, sr, stream,
                   j0, hd, decode_row, amsgrad, mask, root):  # fmt: skip
    """NAdam's :func:`_q_block_adam` (``xc``, ``xscale``, ``amsgrad`` unused): the portable
    loop, no SIMD block loop."""
    m, v = rows[0], rows[1]
    decode_row(m, mc, books[0], mscale, n, False, hd)
    decode_row(v, sc, books[1], sscale, n, root, hd)
    bad = 0
    mtop, vtop = np.int32(0), np.int32(0)
    c = consts
    for i in range(n):
        gi, pi, mi, vi = _load(g, i), _load(p, i), m[i], v[i]
        p1, m1, v1 = _nadam_rule(gi, pi, mi, vi, c.low, c.c1, c.b2, c.b2w, c.eps, lr_t, inv, gstep, c.decay, c.l2,
                                 c.gsign)  # fmt: skip
        if mask:
            ok = not _masked(gi, m1, v1, v1)
            bad += not ok
            p1 = p1 if ok else pi
            m1 = m1 if ok else mi
            v1 = v1 if ok else vi
        _store_param(p, i, p1, sr, stream, j0 + i)
        v2 = np.sqrt(v1) if root else v1
        m[i] = m1
        v[i] = v2
        mtop = max(mtop, _magnitude_bits(m1))
        vtop = max(vtop, _magnitude_bits(v2))
    return bad, mtop, vtop, np.int32(0)


# One compiled function per (rule, bits, amsgrad, mask), generated by _variant and each
# compiled the first time it is needed (see numba_cpu for why not parallel=True;
# error_model="numpy" keeps the divisions free of zero checks, which stopped LLVM
# vectorizing there).
_J = dict(nogil=True, cache=True, error_model="numpy")


@njit(inline="always")
def _q8(a, fused, update, amsgrad, mask, encode_m, encode_v):
    """:func:`_q_chunks` at 8 bits (``a``: its arguments up to ``phase``), with the
    codebooks' row encoders."""
    pt, ch, un, co, sc, sa, pl, cs, sr, se, bo, bl, si, ph = a
    return _q_chunks(pt, ch, un, co, sc, sa, pl, cs, sr, se, bo, bl, si, ph, 8, fused, update, _decode_row8,
                     _encode_block8, encode_m, encode_v, amsgrad, mask, False)  # fmt: skip


@njit(inline="always")
def _q4(a, fused, update, amsgrad, mask, root):
    """:func:`_q_chunks` at 4 bits (``a``: its arguments up to ``phase``)."""
    pt, ch, un, co, sc, sa, pl, cs, sr, se, bo, bl, si, ph = a
    return _q_chunks(pt, ch, un, co, sc, sa, pl, cs, sr, se, bo, bl, si, ph, 4, fused, update, _decode_row4,
                     _encode_block4, _dither4, _dither4, amsgrad, mask, root)  # fmt: skip


def _variant(rule: str, bits: int, amsgrad: bool, mask: bool, tapered: bool = False) -> Callable[..., int]:
    """The compiled kernel of one variant: :func:`_q_chunks` with the rule's block
    function, the bit width's codec and the codebooks' encoders (``tapered``: the 8-bit
    tapered maps'). ``rule``, ``bits`` and the flags are constants of the closure, so
    numba prunes the branches not taken before typing (each variant holds only its own
    code) and caches each variant on its own."""
    em, ev = (_tapered8, _utapered8) if tapered else (_dynamic8, _udynamic8)

    # the arguments of _q_chunks up to ``phase``, in short
    @njit(**_J)
    def kernel(pt, ch, un, co, sc, sa, pl, cs, sr, se, bo, bl, si, ph):
        a = (pt, ch, un, co, sc, sa, pl, cs, sr, se, bo, bl, si, ph)
        if rule == "nadam":  # no SIMD block loop
            if bits == 8:
                return _q8(a, _none, _q_block_nadam, False, mask, em, ev)
            return _q4(a, _none, _q_block_nadam, False, mask, True)
        if rule == "adamax":  # the norm's codebook is no root one; no SIMD block loop
            if bits == 8:
                return _q8(a, _none, _q_block_adamax, False, mask, em, ev)
            return _q4(a, _none, _q_block_adamax, False, mask, False)
        if amsgrad:
            if bits == 8:
                return _q8(a, _none, _q_block_adam, True, mask, em, ev)
            return _q4(a, _none, _q_block_adam, True, mask, True)
        if bits == 8:
            return _q8(a, _fused8, _q_block_adam, False, mask, em, ev)
        return _q4(a, _fused4, _q_block_adam, False, mask, True)

    name = f"_{rule}{'_amsgrad' if amsgrad else ''}{bits}{'_tapered' if tapered else ''}{'_masked' if mask else ''}"
    kernel.__name__ = kernel.__qualname__ = name
    return kernel


_KERNELS = {
    (rule, amsgrad, bits, mask, tapered): _variant(rule, bits, amsgrad, mask, tapered)
    for rule, amsgrad in (("adam", False), ("adam", True), ("adamax", False), ("nadam", False))
    for bits in QUANT_BITS
    for mask in (False, True)
    for tapered in ((False, True) if bits == 8 else (False,))
}

#: Whether full blocks of Adam/AdamW without AMSGrad or stochastic rounding go through
#: :mod:`adamkit.kernels.cpu._avx512_adam` (when the CPU has AVX-512); the tests turn it off
#: to hold that path to the numba loop, bit for bit.
FUSED_BLOCKS = True

#: Parameter dtypes the quantized kernels take (math in float32; float64 parameters
#: go to the reference, which computes in float64).
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unsupported(param_dtype: torch.dtype, fmt: object, contiguous: bool) -> str | None:
    """Why these kernels cannot take such a parameter, or None if they can."""
    if not isinstance(fmt, QuantFormat):
        return f"the quantized numba kernels take quantized state, not {fmt}"
    if fmt.bits == 4 and not fmt.dither:
        return "the quantized numba kernels take dithered 4-bit state"
    if param_dtype not in PARAM_DTYPES:
        return f"the quantized numba kernels take {[str(d) for d in PARAM_DTYPES]} parameters, not {param_dtype}"
    if fmt.block_size is None or CHUNK % fmt.block_size:
        return f"the quantized numba kernels need a block_size dividing {CHUNK}, not {fmt.block_size}"
    if not contiguous:
        return "the quantized numba kernels need contiguous plain tensors (not a subclass such as DTensor)"
    return None


@functools.cache
def _book_tables(name: str, bits: int) -> tuple:
    """A codebook's tables for the kernels: at 8 bits (values, packed encoder table, root,
    16-wide encoder constants, the values' byte planes); at 4 bits (dither table, cell
    firsts, root, dither table, nothing),
    the dither table (:func:`~adamkit.kernels.cpu._avx512_codes.dither_constants`) serving
    the SIMD and the portable code alike."""
    root = name.startswith("sqrt_")
    if bits == 4:
        table = encoder_constants[name]()
        return table, dither_tables(name).first, root, table, np.zeros((0, 64), np.uint8)
    packed, _, values = encoder_table(name)
    return values, packed, root, encoder_constants[name](), plane_table(values)


def _books(fmt: QuantFormat, keys: Sequence[str]) -> tuple:
    books = []
    for key in keys:
        book = fmt.codebook(key)
        books.append(_book_tables(book.name, fmt.bits))
    while len(books) < 3:
        books.append(books[-1])
    return tuple(books)


def _step(
    rule: str,
    amsgrad: bool,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: Mapping[str, Sequence[Tensor]],
    s: StepScalars,
    fmt: QuantFormat,
    maximize: bool,
    mask_nonfinite: bool,
    sr_seed: int | None,
    salts: Sequence[int] | None,
) -> int:
    if not params:
        return 0
    keys = ALGORITHMS[rule].state_keys(amsgrad)
    columns = [params, grads] + [state[f"{k}_{part}"] for k in keys for part in ("codes", "absmax")]
    tab = tables_for(columns, s, salts, fmt)
    phase = dither_phase(int(s.step), s.first_index)
    return _run(rule, amsgrad, tab, s, fmt, maximize, mask_nonfinite, sr_seed, phase)


def _run(
    rule: str,
    amsgrad: bool,
    tab: Tables,
    s: StepScalars,
    fmt: QuantFormat,
    maximize: bool,
    mask_nonfinite: bool,
    sr_seed: int | None,
    phase: int,
) -> int:
    """One kernel call over ``tab`` (every tensor's codes written at the step whose dither
    term is ``phase``); returns the number of masked elements."""
    if tab.chunks.shape[0] == 0:
        return 0
    keys = ALGORITHMS[rule].state_keys(amsgrad)
    w = np.float32
    consts = rule_consts(s, maximize, w)
    kernel = _KERNELS[rule, amsgrad, fmt.bits, mask_nonfinite, fmt.tapered]
    books = _books(fmt, keys)
    names = tuple(fmt.codebook(k).name for k in keys)
    first, second = KERNEL_CODEBOOKS[fmt.bits, fmt.tapered]
    root = fmt.bits == 4 and BOOK_ROLES[keys[1]] == "unsigned"  # the kernels' constant root: see _variant
    if names[0] != first or any(n not in second for n in names[1:]) or books[1][2] != root:
        raise AssertionError(f"codebooks {names} do not match the compiled kernels")  # they fix encoders and root
    units = nc.unit_table(tab.chunks) if tab.units is None else tab.units
    counter = np.zeros(1, dtype=np.int64)
    # the kernels read three per-tensor scalars (step size, bias correction, NAdam's
    # gradient step): a plan's table holds only the algorithm's (two for Adam)
    scal = np.zeros((tab.scal.shape[0], 3), dtype=w)
    scal[:, : min(3, tab.scal.shape[1])] = tab.scal[:, :3]
    args = (tab.ptrs, tab.chunks, units, counter, scal, tab.salts, nc._LIKE[tab.param_dtype], consts,
            sr_seed is not None, sr_seed or 0, books, fmt.block_size, FUSED_BLOCKS, phase)  # fmt: skip
    return sum(nc.on_threads(kernel, args, units.size - 1))


def _tables_kernel(rule: str) -> Callable[..., int]:
    """The kernel of ``rule`` over a cached plan's tables (:class:`Tables`: the
    optimizers' plans keep them across steps). The codes of each tensor are dithered
    with its own step (``tab.steps``): tensors at different steps (some had no
    gradient for a while) go in one call per step."""

    def run(
        tab: Tables, s: StepScalars, *, amsgrad: bool, maximize: bool, mask_nonfinite: bool,
        sr_seed: int | None = None,
    ) -> int:  # fmt: skip
        fmt = tab.state_dtype
        if not isinstance(fmt, QuantFormat) or tab.steps is None:
            raise AssertionError("a quantized plan's tables name the format and each tensor's step")
        if tab.chunks.shape[0] == 0:
            return 0
        steps = np.asarray(tab.steps)[tab.chunks[:, 0]].astype(np.int64)
        if (steps == steps[0]).all():
            return _run(rule, amsgrad, tab, s, fmt, maximize, mask_nonfinite, sr_seed, dither_phase(int(steps[0])))
        total = 0
        for step in np.unique(steps):
            part = dataclasses.replace(tab, chunks=tab.chunks[steps == step], units=None)
            total += _run(rule, amsgrad, part, s, fmt, maximize, mask_nonfinite, sr_seed, dither_phase(int(step)))
        return total

    run.__name__ = run.__qualname__ = f"{rule}_quantized_tables_"
    return run


@register(
    "adam",
    backend="numba",
    device_types=("cpu",),
    state_bits=QUANT_BITS,
    unsupported=unsupported,
    tables=_tables_kernel("adam"),
)
def adam_quantized_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: Mapping[str, Sequence[Tensor]],
    s: StepScalars,
    *,
    fmt: QuantFormat,
    amsgrad: bool,
    maximize: bool,
    mask_nonfinite: bool,
    sr_seed: int | None = None,
    salts: Sequence[int] | None = None,
) -> int:
    """Fused Adam/AdamW on quantized state; returns the masked element count."""
    return _step("adam", amsgrad, params, grads, state, s, fmt, maximize, mask_nonfinite, sr_seed, salts)


@register(
    "adamax",
    backend="numba",
    device_types=("cpu",),
    state_bits=QUANT_BITS,
    unsupported=unsupported,
    tables=_tables_kernel("adamax"),
)
def adamax_quantized_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: Mapping[str, Sequence[Tensor]],
    s: StepScalars,
    *,
    fmt: QuantFormat,
    amsgrad: bool = False,
    maximize: bool,
    mask_nonfinite: bool,
    sr_seed: int | None = None,
    salts: Sequence[int] | None = None,
) -> int:
    """Fused Adamax on quantized state; returns the masked element count."""
    if amsgrad:
        raise ValueError("Adamax has no AMSGrad variant")
    return _step("adamax", False, params, grads, state, s, fmt, maximize, mask_nonfinite, sr_seed, salts)


@register(
    "nadam",
    backend="numba",
    device_types=("cpu",),
    state_bits=QUANT_BITS,
    unsupported=unsupported,
    tables=_tables_kernel("nadam"),
)
def nadam_quantized_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: Mapping[str, Sequence[Tensor]],
    s: StepScalars,
    *,
    fmt: QuantFormat,
    amsgrad: bool = False,
    maximize: bool,
    mask_nonfinite: bool,
    sr_seed: int | None = None,
    salts: Sequence[int] | None = None,
) -> int:
    """Fused NAdam on quantized state; returns the masked element count."""
    if amsgrad:
        raise ValueError("NAdam has no AMSGrad variant")
    return _step("nadam", False, params, grads, state, s, fmt, maximize, mask_nonfinite, sr_seed, salts)
