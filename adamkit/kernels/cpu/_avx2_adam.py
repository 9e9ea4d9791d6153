"""Adam/AdamW's rule in 8-lane AVX2 IR, and the 32/16-bit state loop built on it.

:func:`adam_rule` is :func:`adamkit.kernels.cpu.dense._adam_rule` (without AMSGrad)
operation for operation on 8 lanes: ``vdivps`` and ``vsqrtps``, correctly rounded, so
results are bit-identical to the numba loop. Two loops use it: the 8-bit block loop
(:mod:`adamkit.kernels.cpu._avx2_quant`) and :func:`adam_stream`, which updates float32,
bf16 or fp16 state (the plain and ``state_bits=16`` formats) in place.

Why a hand-written loop for what LLVM vectorizes from the numba loop: on the AMD Zen 3
this was written on (AVX2, no AVX-512), the vectorized numba loop reloaded the rule's
constants from the stack and re-broadcast others in every iteration (16 registers do
not hold them beside the loop's values in a function that large), branched on the
lerp's form inside the loop, and checked the arrays for overlap before every 64-element
block; storing bf16 state narrowed each select's mask with two shuffles. The README's
performance section has the figures.
"""

from __future__ import annotations

from typing import NamedTuple

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._avx512_adam import _call, _prefetch  # width-agnostic IR helpers (no AVX-512 instruction)

#: Lanes per vector.
LANES = 8
_F32 = ir.FloatType()
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_F8 = ir.VectorType(_F32, LANES)
_I8V = ir.VectorType(_I32, LANES)
#: Elements ahead whose cache lines :func:`adam_stream` prefetches (numba_cpu's
#: block loop asks 256 ahead; the same distance here).
AHEAD = 256


def _splat(value: int) -> ir.Constant:
    return ir.Constant(_I8V, [value] * LANES)


def _fsplat(value: float) -> ir.Constant:
    return ir.Constant(_F8, [value] * LANES)


def _broadcast(builder: ir.IRBuilder, x: ir.Value) -> ir.Value:
    vec = _F8 if x.type == _F32 else _I8V
    one = builder.insert_element(ir.Constant(vec, ir.Undefined), x, ir.Constant(_I32, 0))
    return builder.shuffle_vector(one, ir.Constant(vec, ir.Undefined), ir.Constant(_I8V, [0] * LANES))


#: The element types :class:`_Params` takes (numba's carriers: bf16 and fp16 travel as
#: 16-bit integers).
KINDS = {types.float32: "f32", types.uint16: "bf16", types.int16: "f16"}


class _Params:
    """Loads and stores 8 elements of one dtype as <8 x float>: float32; bf16 (the top
    half of a float32; stored rounded to nearest even, NaN as 0x7FC0, as
    :func:`adamkit.kernels.cpu.dense._f32_to_bf16`, and with ``ftz`` subnormals as ±0, as
    the bf16 state's :func:`~adamkit.kernels.cpu.dense._f32_to_bf16_ftz`); fp16
    (``vcvtph2ps``/``vcvtps2ph``)."""

    def __init__(self, builder: ir.IRBuilder, dtype: types.Type, ftz: bool = False) -> None:
        self.builder, self.kind, self.ftz = builder, KINDS[dtype], ftz
        self.size = 4 if self.kind == "f32" else 2
        self.vec = _F8 if self.kind == "f32" else ir.VectorType(ir.IntType(16), LANES)

    def load(self, addr: ir.Value) -> ir.Value:
        b = self.builder
        x = b.load(b.inttoptr(addr, self.vec.as_pointer()), align=self.size)
        if self.kind == "bf16":
            return b.bitcast(b.shl(b.zext(x, _I8V), _splat(16)), _F8)
        if self.kind == "f16":
            return b.fpext(b.bitcast(x, ir.VectorType(ir.HalfType(), LANES)), _F8)
        return x

    def store(self, addr: ir.Value, x: ir.Value) -> None:
        b = self.builder
        if self.kind == "bf16":
            # the selects on the float32 lanes, before the rounding: selecting on the
            # rounded bits, LLVM narrowed the mask to 16-bit lanes (two more shuffles)
            if self.ftz:  # |x| < 2^-126 (subnormal or zero) -> its sign, which rounds to ±0
                tiny = b.fcmp_ordered("<", _call(b, "llvm.fabs.v8f32", _F8, [x]), _fsplat(2.0**-126))
                x = b.select(tiny, b.bitcast(b.and_(b.bitcast(x, _I8V), _splat(-(2**31))), _F8), x)
            x = b.select(b.fcmp_unordered("uno", x, x), b.bitcast(_splat(0x7FC00000), _F8), x)  # rounds to 0x7FC0
            bits = b.bitcast(x, _I8V)
            lsb = b.and_(b.lshr(bits, _splat(16)), _splat(1))
            x = b.trunc(b.lshr(b.add(bits, b.add(lsb, _splat(0x7FFF))), _splat(16)), self.vec)
        elif self.kind == "f16":
            x = b.bitcast(b.fptrunc(x, ir.VectorType(ir.HalfType(), LANES)), self.vec)
        b.store(x, b.inttoptr(addr, self.vec.as_pointer()), align=self.size)


class RuleConstants(NamedTuple):
    """The rule's per-call values, broadcast to 8 lanes (``low``, ``with_l2``: scalar i1)."""

    low: ir.Value
    c1: ir.Value
    b2: ir.Value
    b2w: ir.Value
    eps: ir.Value
    decay: ir.Value
    l2: ir.Value
    gsign: ir.Value
    lr_t: ir.Value
    inv: ir.Value
    with_l2: ir.Value

    @classmethod
    def of(cls, builder: ir.IRBuilder, low: ir.Value, *floats: ir.Value) -> RuleConstants:
        """From scalars: ``low``, then c1, b2, b2w, eps, decay, l2, gsign, lr_t, inv."""
        with_l2 = builder.fcmp_ordered("!=", floats[5], ir.Constant(_F32, 0.0))
        return cls(low, *(_broadcast(builder, x) for x in floats), with_l2)


def rule_loops(builder: ir.IRBuilder, k: RuleConstants, count: ir.Value, body) -> None:
    """``body(index, l2)`` in a loop of ``count``, built twice, with and without the L2
    term, and one chosen before it: a select per vector in the loop (its mask held in a
    register) cost ~5 % of the 8-bit block loop, where registers are short."""
    with builder.if_else(k.with_l2) as (with_l2, without):
        for branch, l2 in ((with_l2, True), (without, False)):
            with branch, cgutils.for_range(builder, count) as loop:
                body(loop.index, l2)


def adam_rule(
    builder: ir.IRBuilder, k: RuleConstants, g: ir.Value, p: ir.Value, m: ir.Value, v: ir.Value, l2: bool
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """8 lanes of :func:`adamkit.kernels.cpu.dense._adam_rule` (no AMSGrad), operation
    for operation: the new (p, m, v); ``l2``: whether the L2 term is added (never
    ``0·θ``: NaN for an infinite parameter)."""
    b = builder
    gw = b.fmul(g, k.gsign)
    if l2:
        gw = b.fadd(gw, b.fmul(k.l2, p))
    m1 = _call(b, "llvm.fma.v8f32", _F8, [k.c1, b.fsub(gw, m), b.select(k.low, m, gw)])
    v1 = b.fadd(b.fmul(k.b2, v), b.fmul(b.fmul(k.b2w, gw), gw))
    q = b.fdiv(m1, b.fadd(b.fmul(_call(b, "llvm.sqrt.v8f32", _F8, [v1]), k.inv), k.eps))
    return b.fsub(b.fmul(p, k.decay), b.fmul(k.lr_t, q)), m1, v1


@intrinsic
def adam_stream(typingctx, p_at, g_at, m_at, v_at, count, low, c1, b2, b2w, eps, decay, l2, gsign, lr_t, inv,
                plike, slike):  # fmt: skip  # noqa: ARG001
    """Adam/AdamW (no AMSGrad) over ``8·count`` elements in place: parameters and
    gradients of ``plike``'s dtype, moments of ``slike``'s (bf16 state stored with
    subnormals flushed). Returns the number of vectors done: ``count``, or 0 for dtypes
    it does not take (float64), which the caller's numba loop then does."""
    ok = plike.dtype in KINDS and slike.dtype in KINDS

    def codegen(context, builder, signature, args):
        if not ok:
            return ir.Constant(_I64, 0)
        p_at, g_at, m_at, v_at, count = args[:5]
        k = RuleConstants.of(builder, *args[5:15])
        io, st = _Params(builder, signature.args[-2].dtype), _Params(builder, signature.args[-1].dtype, ftz=True)

        def body(index: ir.Value, l2: bool) -> None:
            pos = builder.mul(index, ir.Constant(_I64, LANES))
            at = {}
            for name, base, size in (("p", p_at, io.size), ("g", g_at, io.size), ("m", m_at, st.size),
                                     ("v", v_at, st.size)):  # fmt: skip
                at[name] = builder.add(base, builder.mul(pos, ir.Constant(_I64, size)))
                if AHEAD:
                    _prefetch(builder, builder.add(at[name], ir.Constant(_I64, AHEAD * size)))
            g, p = io.load(at["g"]), io.load(at["p"])
            m, v = st.load(at["m"]), st.load(at["v"])
            p1, m1, v1 = adam_rule(builder, k, g, p, m, v, l2)
            io.store(at["p"], p1)
            st.store(at["m"], m1)
            st.store(at["v"], v1)

        rule_loops(builder, k, count, body)
        return count

    floats = (c1, b2, b2w, eps, decay, l2, gsign, lr_t, inv)
    if ok and any(x != types.float32 for x in floats):
        raise TypeError("adam_stream: float32 rule constants expected")
    return types.int64(p_at, g_at, m_at, v_at, count, low, *floats, plike, slike), codegen
