"""Adam/AdamW on a block of quantized state in one AVX-512 loop: decode, update, store.

The common case of the quantized kernels (:mod:`adamkit.kernels.cpu.quantized`): float32
parameters, Adam or AdamW without AMSGrad, no stochastic rounding, a block whose length
is a multiple of 16. Per 16 elements, in registers: the two moments' codes are decoded
(a gather from the 256 values at 8 bits; at 4 bits the dither subtracted and two
``vpermps`` to interpolate), the rule is applied,
the parameters are stored, the new moments go to the per-thread rows the encoders read
next, and the rows' largest magnitudes are kept in registers. The numba loop this
replaces went through the rows three times, spent ~0.1 ns per element on the runtime
alias checks and reductions LLVM wraps around a vectorized loop, and ran a separate
pass over the gradient to look for NaN/±inf; here the check is a compare per vector.

The arithmetic is the numba rule's (:func:`adamkit.kernels.cpu.dense._adam_rule`),
operation for operation, with one difference: the division ``m / (sqrt(v)·c + ε)``
is a ``vrcp14ps`` estimate refined by a Newton step and a residual correction, which
takes the quotient off the divider (shared with the square root) and gives the
correctly rounded quotient but in rare cases, where it is one ulp away.

With AVX512-VBMI, 8-bit blocks of a multiple of 64 elements are decoded before the
loop instead, 64 codes at a time from byte planes into the rows
(:func:`~adamkit.kernels.cpu._avx512_codes.decode_rows8_planes`), and the loop reads the
rows: on Zen 4 a 16-lane gather costs ~20 cycles (0.34 ns per value in L1, against
0.072 by planes), and the 8-bit step went from 1.90 to 1.42 ns per element (16M
elements, one thread). Software-pipelining the loop (each vector's gathers issued two
iterations ahead) gained nothing measurable at 8 or 4 bits: it is not latency-bound.

Blocks whose gradient needs masking (NaN/±inf, or large enough to overflow) take the
numba loop instead.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._avx512_codes import _F16, _I16, _I32, _broadcast, _codes_in, _dither_hash, _gather, _Rows, _splat, dither_decode

#: Elements ahead whose cache lines are prefetched (parameters, gradients, codes).
AHEAD = 512


def _call(builder: ir.IRBuilder, name: str, ret: ir.Type, args: list) -> ir.Value:
    fnty = ir.FunctionType(ret, [a.type for a in args])
    return builder.call(cgutils.get_or_insert_function(builder.module, fnty, name), args)


def _prefetch(builder: ir.IRBuilder, addr: ir.Value) -> None:
    i8p = ir.IntType(8).as_pointer()
    fnty = ir.FunctionType(ir.VoidType(), [i8p, _I32, _I32, _I32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
    builder.call(fn, [builder.inttoptr(addr, i8p), ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


def _divide(builder: ir.IRBuilder, a: ir.Value, b: ir.Value) -> ir.Value:
    """``a / b`` for positive normal ``b``: ``vrcp14ps``, a Newton step, then the
    residual ``a - b·q`` corrects the quotient (two FMAs)."""
    one = ir.Constant(_F16, [1.0] * 16)
    fma = "llvm.fma.v16f32"
    every = ir.Constant(ir.IntType(16), -1)
    r = _call(builder, "llvm.x86.avx512.rcp14.ps.512", _F16, [b, ir.Constant(_F16, [0.0] * 16), every])
    r = _call(builder, fma, _F16, [r, _call(builder, fma, _F16, [builder.fneg(b), r, one]), r])
    q = builder.fmul(a, r)
    residual = _call(builder, fma, _F16, [builder.fneg(b), q, a])
    return _call(builder, fma, _F16, [residual, r, q])


class _Params:
    """Loads and stores 16 parameters or gradients of one dtype as <16 x float>:
    float32; bf16 (the top half of a float32; stored rounded to nearest even, NaN as
    0x7FC0, as :func:`adamkit.kernels.cpu.dense._f32_to_bf16`); fp16 (``vcvtph2ps``,
    ``vcvtps2ph`` to nearest even)."""

    def __init__(self, builder: ir.IRBuilder, dtype: types.Type) -> None:
        self.builder, self.kind = builder, {types.float32: "f32", types.uint16: "bf16", types.int16: "f16"}[dtype]
        self.size = 4 if self.kind == "f32" else 2
        self.vec = _F16 if self.kind == "f32" else ir.VectorType(ir.IntType(16), 16)

    def load(self, addr: ir.Value) -> ir.Value:
        b = self.builder
        x = b.load(b.inttoptr(addr, self.vec.as_pointer()), align=self.size)
        if self.kind == "bf16":
            return b.bitcast(b.shl(b.zext(x, _I16), _splat(16)), _F16)
        if self.kind == "f16":
            return b.fpext(b.bitcast(x, ir.VectorType(ir.HalfType(), 16)), _F16)
        return x

    def store(self, addr: ir.Value, x: ir.Value) -> None:
        b = self.builder
        if self.kind == "bf16":
            bits = b.bitcast(x, _I16)
            lsb = b.and_(b.lshr(bits, _splat(16)), _splat(1))
            top = b.trunc(b.lshr(b.add(bits, b.add(lsb, _splat(0x7FFF))), _splat(16)), self.vec)
            nan = b.fcmp_unordered("uno", x, x)
            x = b.select(nan, ir.Constant(self.vec, [0x7FC0] * 16), top)
        elif self.kind == "f16":
            x = b.bitcast(b.fptrunc(x, ir.VectorType(ir.HalfType(), 16)), self.vec)
        b.store(x, b.inttoptr(addr, self.vec.as_pointer()), align=self.size)


def _make_adam_rows(bits: int, root: bool, decoded: bool = False):
    """An intrinsic for one bit width (``root``: the second moment's codebook holds
    square roots); see the module's docstring. ``decoded`` (8 bits): the moments'
    codebook values are in the rows already (by
    :func:`~adamkit.kernels.cpu._avx512_codes.decode_rows8_planes`), read from there and
    overwritten, instead of gathered from the codes. The parameters'
    dtype is the one of ``plike``'s (an array argument read for its type only)."""

    @intrinsic
    def adam_rows(typingctx, p_at, g_at, mc_at, sc_at, count, m_at, v_at, mvals_at, vvals_at, mscale, vscale, low,
                  c1, b2, b2w, eps, decay, l2, gsign, lr_t, inv, h0, plike):  # fmt: skip  # noqa: ARG001
        """Returns (largest |m| bits, largest |v| bits (of roots if ``root``)).
        At 8 bits ``mvals_at``/``vvals_at`` are the codebooks' 256 values; at 4 bits their
        dither tables, and ``h0`` the first element's dither hash of the codes' step."""

        def codegen(context, builder, signature, args):
            (p_at, g_at, mc_at, sc_at, count, m_at, v_at, mvals, vvals, mscale, vscale, low,
             c1, b2, b2w, eps, decay, l2, gsign, lr_t, inv, h0, _) = args  # fmt: skip
            io = _Params(builder, signature.args[-1].dtype)
            with_l2 = builder.fcmp_ordered("!=", l2, ir.Constant(l2.type, 0.0))
            c1, b2, b2w, eps, decay, l2, gsign, lr_t, inv, mscale, vscale = (
                _broadcast(builder, x) for x in (c1, b2, b2w, eps, decay, l2, gsign, lr_t, inv, mscale, vscale)
            )
            if bits == 4:
                mtable, vtable = _Rows(builder, mvals, 15), _Rows(builder, vvals, 15)
            i64 = count.type
            mtop = cgutils.alloca_once_value(builder, _splat(0))
            vtop = cgutils.alloca_once_value(builder, _splat(0))
            magnitude = _splat(0x7FFFFFFF)
            with cgutils.for_range(builder, count) as loop:
                i = loop.index
                off = builder.mul(i, ir.Constant(i64, 64))
                poff = builder.mul(i, ir.Constant(i64, 16 * io.size))
                coff = builder.mul(i, ir.Constant(i64, 2 * bits))
                ahead = ir.Constant(i64, io.size * AHEAD)
                _prefetch(builder, builder.add(builder.add(p_at, poff), ahead))
                _prefetch(builder, builder.add(builder.add(g_at, poff), ahead))
                _prefetch(builder, builder.add(builder.add(mc_at, coff), ir.Constant(i64, AHEAD * bits // 8)))
                _prefetch(builder, builder.add(builder.add(sc_at, coff), ir.Constant(i64, AHEAD * bits // 8)))

                def at(base):
                    return builder.inttoptr(builder.add(base, off), _F16.as_pointer())

                g, p = io.load(builder.add(g_at, poff)), io.load(builder.add(p_at, poff))
                mcodes = _codes_in(builder, builder.add(mc_at, coff), bits)
                vcodes = _codes_in(builder, builder.add(sc_at, coff), bits)
                if decoded:
                    m, v = builder.load(at(m_at), align=4), builder.load(at(v_at), align=4)
                elif bits == 8:
                    m, v = _gather(builder, _F16, mvals, mcodes), _gather(builder, _F16, vvals, vcodes)
                else:
                    h = _dither_hash(builder, mtable, h0, i)
                    m, v = dither_decode(builder, mtable, mcodes, h), dither_decode(builder, vtable, vcodes, h)
                m, v = builder.fmul(m, mscale), builder.fmul(v, vscale)
                if root:
                    v = builder.fmul(v, v)
                # the rule, as _adam_rule computes it
                gs = builder.fmul(g, gsign)
                gw = builder.select(with_l2, builder.fadd(gs, builder.fmul(l2, p)), gs)  # 0·inf is NaN
                m1 = _call(builder, "llvm.fma.v16f32", _F16, [c1, builder.fsub(gw, m), builder.select(low, m, gw)])
                v1 = builder.fadd(builder.fmul(b2, v), builder.fmul(builder.fmul(b2w, gw), gw))
                s = _call(builder, "llvm.sqrt.v16f32", _F16, [v1])
                q = _divide(builder, m1, builder.fadd(builder.fmul(s, inv), eps))
                p1 = builder.fsub(builder.fmul(p, decay), builder.fmul(lr_t, q))
                io.store(builder.add(p_at, poff), p1)
                v2 = s if root else v1
                builder.store(m1, at(m_at), align=4)
                builder.store(v2, at(v_at), align=4)
                for top, x in ((mtop, m1), (vtop, v2)):
                    bitsx = builder.and_(builder.bitcast(x, _I16), magnitude)
                    old = builder.load(top)
                    builder.store(builder.select(builder.icmp_signed(">", bitsx, old), bitsx, old), top)
            tops = [_call(builder, "llvm.vector.reduce.smax.v16i32", _I32, [builder.load(t)]) for t in (mtop, vtop)]
            return context.make_tuple(builder, signature.return_type, tops)

        f32 = types.float32
        sig = types.UniTuple(types.int32, 2)(
            *[types.int64] * 9, f32, f32, types.boolean, *[f32] * 9, types.int64, plike
        )  # fmt: skip
        return sig, codegen

    return adam_rows


#: ``adam_rows_{bits}``: see :func:`_make_adam_rows` (4-bit second moments are square
#: roots, as the kernels' 4-bit codebook ``sqrt_geo4_dither`` stores them).
adam_rows_8 = _make_adam_rows(8, root=False)
adam_rows_8d = _make_adam_rows(8, root=False, decoded=True)
adam_rows_4 = _make_adam_rows(4, root=True)
