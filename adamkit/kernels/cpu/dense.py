"""Fused CPU kernels in Numba: one pass over memory, all cores, many tensors per call.

One call covers every tensor of a bucket: a table of raw addresses (one row per
tensor: param, grad, then the state tensors) and a table of chunks (tensor, start,
stop). ``torch.get_num_threads()`` threads run the ``nogil`` kernel and claim runs
of chunks from a shared counter until none is left, so 20,000 small tensors cost
one call per thread and one 16M tensor is shared by all threads. Per element the kernel reads param,
grad and the moments once and writes them once (28 bytes for fp32 Adam), with no
temporaries. The step-dependent scalars (``step_size``, ``inv_bc2_sqrt``) come per
tensor, so parameters whose ``step`` lags (frozen for a while) share the call.

Parameters may be fp32, bf16 or fp16 (half types travel as 16-bit integers: NumPy
has no bfloat16; math in fp32, stores rounded to nearest even, or stochastically for
bf16 parameters) with fp32, bf16 or fp16 state; fp64 parameters keep fp64 state.

The rule per element is written once per algorithm (``_adam_rule``, ``_adamax_rule``)
and computes exactly :mod:`adamkit.kernels.reference`: torch's ``lerp`` formula for
the first moment, ``sqrt(v)·inv_bc2_sqrt + ε``, NaN-propagating maxima.

Non-finite gradients (``mask``): before updating a block the kernel checks its
gradient (an integer max over the magnitudes' bits, from L1, against those of
``HUGE``, 2^60 in float32 math). A block with a NaN/±inf or a gradient that large
ends the kernel's pass over that chunk; after the parallel pass :func:`_adam_rest`
finishes such chunks element by element, leaving the parameter and moments of the
elements :func:`_masked` picks (a NaN/±inf gradient, or one whose moments
overflowed) as they were, and counts them. The common loop carries no selects: masking
every element with selects cost 5% on 16M elements (10.4 -> 9.9 ms), and a second,
masking copy of the loop in the same function cost 1 s of compile time.

No fastmath: it would let LLVM reassociate and drop NaN checks, and the loop is
memory-bound anyway (measured: the same speed with and without on this machine).

On AVX2 CPUs without AVX-512, Adam/AdamW's blocks (no AMSGrad, no stochastic
rounding) run through an explicit 8-lane loop instead,
:func:`adamkit.kernels.cpu._avx2_adam.adam_stream` (``STREAM``): the same operations,
bit-identical results, without the spills, re-broadcasts, in-loop branch and per-block
overlap checks of the loop LLVM vectorized there.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import numba
import numpy as np
import torch
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload
from torch import Tensor

from ..._scalars import StepScalars, rule_consts
from .._tables import Tables, tables_for, unit_table
from ..registry import layout_refusal, register
from ._avx2_adam import adam_stream
from ._pool import on_threads
from ._simd import ISA

#: Software prefetch: a chunk is updated in blocks of BLOCK elements, and before each
#: block the kernel asks for the cache lines of the block AHEAD elements further on.
#: The hardware prefetchers alone left the loop waiting on memory between its
#: divisions; measured on 16M elements, 2 threads: fp32 1.02x -> 1.08x torch fused,
#: bf16 state 1.21x -> 1.40x (block 128 / ahead 512 beat 256/1024, 64/256, 256/none).
#: With the state on huge pages (see adamkit._memory) the best distance shrank:
#: block 64 / ahead 256 gave fp32 0.98-1.00x -> 1.03-1.05x, bf16 state 1.23x -> 1.28x,
#: bf16 params 0.94x -> 0.95x (ahead 128, 384, 1024, 2048 and block 32 were slower).
BLOCK = 64
AHEAD = 256
#: Tensors of at most this many elements run in one block, without prefetching: it
#: cost more than it gained on 20k x 1,000 elements (15 -> 18 ms).
BLOCKED = 4096
#: torch dtype -> the NumPy dtype its elements travel as (bf16 and fp16 as bits).
CARRIERS = {
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.bfloat16: np.uint16,
    torch.float16: np.int16,
}
#: Empty arrays of each carrier: the kernels' dtype arguments.
_LIKE = {dtype: np.empty(0, carrier) for dtype, carrier in CARRIERS.items()}
#: State dtypes the kernels take for each parameter dtype.
STATE_DTYPES = {
    torch.float32: (torch.float32, torch.bfloat16, torch.float16),
    torch.bfloat16: (torch.float32, torch.bfloat16, torch.float16),
    torch.float16: (torch.float32, torch.bfloat16, torch.float16),
    torch.float64: (torch.float64,),
}

_U = np.uint64
_M32 = _U(0xFFFFFFFF)


# --------------------------------------------------------------------- primitives
@intrinsic
def _view(typingctx, addr, like):  # noqa: ARG001
    """A raw address as a pointer to ``like``'s dtype (numba has no int-to-pointer)."""
    ptr = types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr))

    return ptr(types.int64, like), codegen


@intrinsic
def _bf16_to_f32(typingctx, h):  # noqa: ARG001
    """bf16 bits (uint16) -> float32: the bits are the top half of a float32."""

    def codegen(context, builder, signature, args):
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _f32_bits(typingctx, x):  # noqa: ARG001
    """The bits of a float32, zero-extended to uint64 (numba's arithmetic stays unsigned)."""

    def codegen(context, builder, signature, args):
        return builder.zext(builder.bitcast(args[0], ir.IntType(32)), ir.IntType(64))

    return types.uint64(types.float32), codegen


@intrinsic
def _f16_to_f32(typingctx, h):  # noqa: ARG001
    """fp16 bits (int16) -> float32 (exact; LLVM's fpext, vcvtph2ps on x86)."""

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.int16), codegen


@intrinsic
def _f32_to_f16(typingctx, x):  # noqa: ARG001
    """float32 -> fp16 bits (int16), rounded to nearest even as torch's ``.half()``."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.int16(types.float32), codegen


@intrinsic
def _fma(typingctx, a, b, c):  # noqa: ARG001
    """``a·b + c`` rounded once (llvm.fma; one instruction with FMA3/AVX-512).

    torch's lerp is fused this way on the CPU; without it the first moment differed
    from torch's in cancellations (m + w·(g-m) ≈ 0).
    """
    sig = a(a, a, a)

    def codegen(context, builder, signature, args):
        ty = context.get_value_type(signature.return_type)
        name = "llvm.fma.f64" if isinstance(ty, ir.DoubleType) else "llvm.fma.f32"
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty, ty, ty]), name)
        return builder.call(fn, args)

    return sig, codegen


@intrinsic
def _f32_to_bf16(typingctx, x):  # noqa: ARG001
    """float32 -> bf16 bits (uint16), rounded to nearest even as torch; NaN -> 0x7FC0.

    In 32-bit integer IR: written with numba's integers it ran in 64-bit lanes (half
    the SIMD width) and made bf16 state compute-bound (12.1 ms vs 8.8 on 16M).
    """

    def codegen(context, builder, signature, args):
        return _bf16_rne_ir(builder, args[0])

    return types.uint16(types.float32), codegen


def _bf16_rne_ir(builder: ir.IRBuilder, x: ir.Value, ftz: bool = False) -> ir.Value:
    """IR: float32 ``x`` -> bf16 bits, round to nearest even, NaN -> 0x7FC0; with
    ``ftz``, subnormal inputs to ±0. The selects are on the float32 value, before the
    rounding, and the result is truncated once: selecting on the truncated (or the
    rounded) bits made LLVM narrow each mask to 16-bit lanes, two shuffles per select
    on AVX2."""
    f32, i32, i16 = ir.FloatType(), ir.IntType(32), ir.IntType(16)
    if ftz:  # |x| < 2^-126 (subnormal or zero) -> its sign, which rounds to ±0
        fabs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32]), "llvm.fabs.f32")
        tiny = builder.fcmp_ordered("<", builder.call(fabs, [x]), ir.Constant(f32, 2.0**-126))
        sign = builder.and_(builder.bitcast(x, i32), ir.Constant(i32, -(2**31)))
        x = builder.select(tiny, builder.bitcast(sign, f32), x)
    nan = builder.bitcast(ir.Constant(i32, 0x7FC00000), f32)  # rounds to 0x7FC0
    bits = builder.bitcast(builder.select(builder.fcmp_unordered("uno", x, x), nan, x), i32)
    lsb = builder.and_(builder.lshr(bits, ir.Constant(i32, 16)), ir.Constant(i32, 1))
    rounded = builder.add(bits, builder.add(lsb, ir.Constant(i32, 0x7FFF)))
    return builder.trunc(builder.lshr(rounded, ir.Constant(i32, 16)), i16)


class _BFloat(ir.Type):
    """LLVM's ``bfloat`` type (llvmlite's IR builder has no class for it)."""

    def _to_string(self) -> str:
        return "bfloat"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _BFloat)

    def __hash__(self) -> int:
        return hash("bfloat")


#: Whether this CPU converts float32 to bf16 in one instruction (AVX512-BF16's
#: VCVTNEPS2BF16), which LLVM emits for ``fptrunc float to bfloat``. Not where
#: ``ADAMKIT_SIMD`` caps the SIMD below AVX-512: the AVX2 loop rounds in integers, and
#: the two conversions differ on NaN payloads, so every element must take the same one.
HW_BF16 = ISA == "avx512" and bool(llvm_binding.get_host_cpu_features().get("avx512bf16", False))


@intrinsic
def _f32_to_bf16_ftz(typingctx, x):  # noqa: ARG001
    """float32 -> bf16 bits, rounded to nearest even, subnormal inputs flushed to ±0.

    The state format of ``state_bits=16``. With AVX512-BF16 one instruction per 16
    elements (VCVTNEPS2BF16 flushes subnormals; NaN stays NaN), else the integer
    rounding of :func:`_f32_to_bf16` plus the flush. The bf16-state kernel is nearly
    compute-bound (the divider: sqrt and a division per element); measured on a 16M
    tensor, 2 threads: 1.10x -> 1.25-1.29x torch fused fp32 AdamW (in cache, one thread:
    0.80 -> 0.68 ns per element). Subnormal moments (below 1.2e-38) are meaningless
    beside ``eps``; the reference flushes them too (``reference.flush_subnormals_``).
    """

    def codegen(context, builder, signature, args):
        if HW_BF16:
            return builder.bitcast(builder.fptrunc(args[0], _BFloat()), ir.IntType(16))
        return _bf16_rne_ir(builder, args[0], ftz=True)

    return types.uint16(types.float32), codegen


@intrinsic
def _wide_vectors(typingctx):
    """Let LLVM vectorize the calling function with 512-bit registers.

    LLVM's x86 cost model prefers 256-bit vectors on AVX-512 CPUs (clock throttling on
    old Xeons) unless a function says otherwise with ``"prefer-vector-width"="512"``,
    as clang's ``-mprefer-vector-width=512`` does. Measured on a 16M tensor here: fp32
    state 0.97x -> 1.02x torch fused, bf16 state 1.06x -> 1.24x (fewer instructions per
    element leave the core free to keep more memory requests in flight). Ignored on CPUs
    without AVX-512. llvmlite only lets known attributes through ``add``; the string
    attribute is valid LLVM and goes into the function's definition as written.
    """

    def codegen(context, builder, signature, args):
        set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def _prefetch(typingctx, addr):  # noqa: ARG001
    """Ask for the cache line at a raw address (llvm.prefetch: a read, kept in all levels)."""

    def codegen(context, builder, signature, args):
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        read, keep, data = ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)
        builder.call(fn, [builder.inttoptr(args[0], i8p), read, keep, data])
        return context.get_dummy_value()

    return types.void(types.int64), codegen


@njit(inline="always")
def _ahead(ptrs, t, lo, hi, plike, slike):
    """Prefetch every column's lines of tensor ``t``'s elements ``lo : min(lo + BLOCK, hi)``."""
    for col in range(ptrs.shape[1]):
        size = plike.itemsize if col < 2 else slike.itemsize
        base = ptrs[t, col]
        for off in range(lo * size, min(lo + BLOCK, hi) * size, 64):
            _prefetch(base + off)


@njit(inline="always")
def _nan_to_bf16(x, r):
    """``r``, or bf16's quiet NaN where ``x`` is NaN: an arithmetic select (a ternary
    here made numba's inliner emit a phi out of scope)."""
    ok = _U(x == x)
    return np.uint16(r * ok + _U(0x7FC0) * (_U(1) - ok))


@njit(inline="always")
def _f32_to_bf16_sr(x, rnd):
    """float32 -> bf16 bits, rounded stochastically: up with probability equal to the
    dropped fraction, so the rounding is unbiased. ``rnd``: 16 random bits."""
    return _nan_to_bf16(x, (_f32_bits(x) + (rnd & _U(0xFFFF))) >> _U(16))


@njit(inline="always")
def _hash32(x):
    """A 32-bit integer mixer (Wellons' lowbias32) on the low 32 bits of a uint64."""
    x ^= x >> _U(16)
    x = (x * _U(0x7FEB352D)) & _M32
    x ^= x >> _U(15)
    x = (x * _U(0x846CA68B)) & _M32
    x ^= x >> _U(16)
    return x


@njit(inline="always")
def _tensor_seed(seed, salt):
    """Per-tensor stream of stochastic rounding: the step's seed and the tensor's salt."""
    return _hash32((_U(seed) + _hash32(_U(salt) & _M32)) & _M32)


@njit(inline="always")
def _random_bits(stream, j):
    """Random bits for element ``j`` of a tensor (Weyl step, then the mixer)."""
    return _hash32((stream + ((_U(j) * _U(0x9E3779B1)) & _M32)) & _M32)


def _load(a, i):
    raise NotImplementedError  # replaced by the overload in jitted code


def _store(a, i, x):
    raise NotImplementedError


def _store_param(a, i, x, sr, stream, j):
    raise NotImplementedError


@overload(_load, inline="always")
def _load_ol(a, i):
    """Element ``i`` of ``a`` as a float (half types widened to float32)."""
    if a.dtype == types.uint16:
        return lambda a, i: _bf16_to_f32(a[i])
    if a.dtype == types.int16:
        return lambda a, i: _f16_to_f32(a[i])
    return lambda a, i: a[i]


@overload(_store, inline="always")
def _store_ol(a, i, x):
    """Store a float into ``a[i]``, rounding to nearest even for half types."""
    if a.dtype == types.uint16:

        def impl(a, i, x):
            a[i] = _f32_to_bf16_ftz(x)

    elif a.dtype == types.int16:

        def impl(a, i, x):
            a[i] = _f32_to_f16(x)

    else:

        def impl(a, i, x):
            a[i] = x

    return impl


@overload(_store_param, inline="always")
def _store_param_ol(a, i, x, sr, stream, j):
    """Store a parameter element: stochastic rounding when asked, for bf16 only."""
    if a.dtype == types.uint16:

        def impl(a, i, x, sr, stream, j):
            if sr:
                a[i] = _f32_to_bf16_sr(x, _random_bits(stream, j))
            else:
                a[i] = _f32_to_bf16(x)

        return impl
    return lambda a, i, x, sr, stream, j: _store(a, i, x)


@njit(inline="always")
def _nan_max(a, b):
    # torch.maximum: NaN wins
    return a if (a > b or a != a) else b


@njit(inline="always")
def _piece(ptrs, t, col, lo, hi, like):
    """Elements ``lo:hi`` of column ``col`` of tensor ``t`` as an array view.

    Loops over such views from 0 vectorize; loops from ``lo`` to ``hi`` over the whole
    tensor did not (measured 2x slower).
    """
    return numba.carray(_view(ptrs[t, col] + lo * like.itemsize, like), hi - lo)


@intrinsic
def _fetch_add(typingctx, addr):  # noqa: ARG001
    """Atomically add 1 to the int64 at a raw address; the value before."""

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        ptr = builder.inttoptr(args[0], i64.as_pointer())
        return builder.atomic_rmw("add", ptr, ir.Constant(i64, 1), "monotonic")

    return types.int64(addr), codegen


@njit(inline="always")
def _claim(units, counter):
    """The next work unit's chunks ``(c_lo, c_hi)``, or ``(0, 0)`` when none is left.

    ``units`` (int64 [n_units + 1]) cuts the chunk table into runs of about UNIT
    elements; ``counter`` (int64 [1]) is incremented by every thread of the call, so
    threads take units as they become free and finish together.
    """
    u = _fetch_add(counter.ctypes.data)
    if u >= units.shape[0] - 1:
        return 0, 0
    return units[u], units[u + 1]


@njit(inline="always")
def _blocks(lo, hi):
    """(step, prefetch?) for a chunk: blocks of BLOCK with prefetching, or one piece."""
    blocked = hi - lo > BLOCKED
    return (BLOCK if blocked else max(hi - lo, 1)), blocked


#: Gradient magnitudes from which masking looks at the new moments, in float32 and
#: float64 math (``reference.HUGE``): below, a finite gradient's moments cannot overflow.
HUGE32 = np.float32(2.0**60)
HUGE64 = 2.0**508


def _tame(a):
    raise NotImplementedError


@overload(_tame, inline="always")
def _tame_ol(a):
    """Whether every element of gradient ``a`` is below ``HUGE`` in magnitude (so finite):
    the largest magnitude's bits against HUGE's (an integer max vectorizes; a float
    reduction would not). fp16 never reaches 2^60: its infinity's bits."""
    if a.dtype in (types.uint16, types.int16):
        limit = np.uint32(0x5D80 if a.dtype == types.uint16 else 0x7C00)

        def impl(a):
            worst = np.uint32(0)
            for i in range(a.shape[0]):
                worst = max(worst, np.uint32(a[i]) & np.uint32(0x7FFF))
            return worst < limit

    elif a.dtype == types.float32:
        limit = np.uint32(0x5D800000)  # HUGE32's bits

        def impl(a):
            worst = np.uint32(0)
            for i in range(a.shape[0]):
                worst = max(worst, np.uint32(_f32_bits(a[i]) & _U(0x7FFFFFFF)))
            return worst < limit

    else:

        def impl(a):
            bad = np.uint32(0)
            for i in range(a.shape[0]):
                bad |= np.uint32(not (abs(a[i]) < HUGE64))
            return bad == 0

    return impl


def _huge(x):
    raise NotImplementedError


@overload(_huge, inline="always")
def _huge_ol(x):
    """``not |x| < HUGE`` for one float of the math dtype (NaN included)."""
    limit = HUGE64 if x == types.float64 else HUGE32
    return lambda x: not (abs(x) < limit)


@njit(inline="always")
def _masked(g, m1, v1, x1):
    """Whether ``nonfinite="mask"`` leaves an element alone (``reference.masked_elements``):
    its gradient is NaN/±inf, or so large that a new moment overflowed."""
    return _huge(g) and not (g - g == 0 and m1 - m1 == 0 and v1 - v1 == 0 and x1 - x1 == 0)


# -------------------------------------------------------------------- Adam / AdamW
@njit(inline="always")
def _adam_rule(g, p, m, v, x, low, b1w, c1, b2, b2w, eps, lr_t, inv, decay, l2, gsign, amsgrad):
    """One element of Adam/AdamW: new (p, m, v, v_max).

    torch's lerp is ``m + w·(g-m)`` for ``w < 0.5`` and ``g - (g-m)·(1-w)`` otherwise;
    ``c1`` is ``w`` or ``-(1-w)`` and ``low`` says which base: both forms in one,
    fused as torch's CPU lerp is.
    """
    g = g * gsign  # gsign ±1: exact, and no branch on maximize
    g = g + l2 * p if l2 != 0 else g  # never l2·p unused: 0·inf is NaN
    m1 = _fma(c1, g - m, m if low else g)
    v1 = b2 * v + b2w * g * g
    x1 = _nan_max(x, v1) if amsgrad else v1
    return p * decay - lr_t * (m1 / (np.sqrt(x1) * inv + eps)), m1, v1, x1


@njit(inline="always")
def _nadam_rule(g, p, m, v, low, c1, b2, b2w, eps, lr_t, inv, gstep, decay, l2, gsign):
    """One element of NAdam: new (p, m, v); ``gstep`` and ``lr_t`` are the gradient's and
    the momentum's coefficients (``reference.nadam_rule_``)."""
    g = g * gsign
    g = g + l2 * p if l2 != 0 else g
    m1 = _fma(c1, g - m, m if low else g)
    v1 = b2 * v + b2w * g * g
    d = np.sqrt(v1) * inv + eps
    # torch's addcdiv twice, as the reference: ``p + (value·a) / b``, rounded as it rounds
    # (the two terms may nearly cancel: their rounding shows in small parameters)
    p1 = p * decay + (-gstep * g) / d
    return p1 + (-lr_t * m1) / d, m1, v1


@njit(inline="always")
def _rule(g, p, m, v, x, low, b1w, c1, b2, b2w, eps, lr_t, inv, gstep, decay, l2, gsign, amsgrad, nadam):
    """Adam/AdamW (with AMSGrad) or NAdam (``nadam``, a literal): new (p, m, v, v_max)."""
    if nadam:
        p1, m1, v1 = _nadam_rule(g, p, m, v, low, c1, b2, b2w, eps, lr_t, inv, gstep, decay, l2, gsign)
        return p1, m1, v1, v1
    return _adam_rule(g, p, m, v, x, low, b1w, c1, b2, b2w, eps, lr_t, inv, decay, l2, gsign, amsgrad)


# Without AMSGrad no fifth array may be touched: a store to it, even behind a branch
# that is never taken, stops LLVM vectorizing (measured 3.5x slower). So ``amsgrad``
# is a literal at each call site, and the rule is inlined into loops that differ
# only in it. Every operand is loaded before anything is stored.
@njit(inline="always")
def _adam_loop(p, g, m, v, x, j0, sc, stream, amsgrad, nadam):
    low, b1w, c1, b2, b2w, eps, lr_t, inv, decay, l2, gsign, sr, gstep = sc
    for i in range(p.shape[0]):
        xi = _load(x, i) if amsgrad else _load(v, i)
        p1, m1, v1, x1 = _rule(
            _load(g, i), _load(p, i), _load(m, i), _load(v, i), xi,
            low, b1w, c1, b2, b2w, eps, lr_t, inv, gstep, decay, l2, gsign, amsgrad, nadam,
        )  # fmt: skip
        _store_param(p, i, p1, sr, stream, j0 + i)
        _store(m, i, m1)
        _store(v, i, v1)
        if amsgrad:
            _store(x, i, x1)


#: Whether Adam/AdamW's blocks (no AMSGrad, no stochastic rounding, float32/bf16/fp16)
#: go through the explicit AVX2 loop (:func:`adamkit.kernels.cpu._avx2_adam.adam_stream`)
#: instead of the numba loop LLVM vectorizes. Not with AVX-512, where the numba loop
#: in 512-bit vectors met the goals (see :func:`_wide_vectors`).
STREAM = ISA == "avx2"


@njit(inline="always")
def _streams(plike, sr, amsgrad, nadam):
    """Whether a block goes through the AVX2 loop (Adam/AdamW; half or float32
    parameters: not fp64)."""
    if STREAM:  # a lone global in the condition: numba drops the branch elsewhere
        return not amsgrad and not nadam and not sr and plike.itemsize < 8
    return False


@njit(inline="always")
def _adam_block(p, g, m, v, x, j0, sc, stream, amsgrad, nadam):
    """:func:`_adam_loop` over a block, its whole vectors by the AVX2 loop when it can."""
    done = 0
    if STREAM:
        low, b1w, c1, b2, b2w, eps, lr_t, inv, decay, l2, gsign, sr, gstep = sc
        if _streams(p, sr, amsgrad, nadam):
            n = p.shape[0] // 8
            args = (low, c1, b2, b2w, eps, decay, l2, gsign, lr_t, inv, p, m)
            done = 8 * adam_stream(p.ctypes.data, g.ctypes.data, m.ctypes.data, v.ctypes.data, n, *args)
    if done < p.shape[0]:
        _adam_loop(p[done:], g[done:], m[done:], v[done:], x[done:], j0 + done, sc, stream, amsgrad, nadam)


@njit(inline="always")
def _adam_chunks(ptrs, chunks, units, counter, stops, scal, salts, plike, slike, consts, sr, seed, amsgrad, mask,
                 nadam):  # fmt: skip
    """Adam/AdamW, or NAdam with ``nadam``, over the work units this thread claims.

    With ``mask``, a chunk stops at the first block whose gradient has a NaN/±inf or
    a magnitude of at least ``HUGE``:
    ``stops[chunk]`` gets the block's first element, and :func:`_adam_rest` finishes
    the chunk element by element. Returns the number of chunks stopped.

    ptrs: int64 [n_tensors, 4 or 5] (param, grad, exp_avg, exp_avg_sq[, max_exp_avg_sq]);
    chunks: int64 [n_chunks, 3] (tensor, start, stop); units, counter: see :func:`_claim`;
    scal: [n_tensors, 2 or 3] (step_size, inv_bc2_sqrt[, grad_step]: the algorithm's
    ``tensor_scalars``) in the math dtype; salts: int64
    [n_tensors] (stochastic rounding streams); consts: :class:`adamkit._scalars.RuleConsts`.
    """
    _wide_vectors()
    c = consts
    low, b1w, c1, b2, b2w, eps, decay, l2, gsign = c.low, c.b1w, c.c1, c.b2, c.b2w, c.eps, c.decay, c.l2, c.gsign
    stopped = 0
    while True:
        c_lo, c_hi = _claim(units, counter)
        if c_lo == c_hi:
            break
        for c in range(c_lo, c_hi):
            t, lo, hi = chunks[c, 0], chunks[c, 1], chunks[c, 2]
            stream = _tensor_seed(seed, salts[t]) if sr else _U(0)
            gstep = scal[t, 2] if nadam else scal[t, 0] * 0
            sc = (low, b1w, c1, b2, b2w, eps, scal[t, 0], scal[t, 1], decay, l2, gsign, sr, gstep)
            step, blocked = _blocks(lo, hi)
            for b in range(lo, hi, step):
                e = min(b + step, hi)
                if blocked and not _streams(plike, sr, amsgrad, nadam):  # adam_stream prefetches itself
                    _ahead(ptrs, t, b + AHEAD, hi, plike, slike)
                p, g = _piece(ptrs, t, 0, b, e, plike), _piece(ptrs, t, 1, b, e, plike)
                m, v = _piece(ptrs, t, 2, b, e, slike), _piece(ptrs, t, 3, b, e, slike)
                x = _piece(ptrs, t, 4, b, e, slike) if amsgrad else v
                if mask and not _tame(g):  # left to _adam_rest from here on
                    stops[c] = b
                    stopped += 1
                    break
                _adam_block(p, g, m, v, x, b, sc, stream, amsgrad, nadam)
    return stopped


# One compiled function per (rule, amsgrad, mask), generated by _variant: the first step
# compiles only the one it needs. Serial and nogil, run on a thread pool (see _launch):
# numba's parallel=True took 6.7 s to compile all four Adam variants in one function,
# these 1.3-1.7 s each. error_model="numpy": with numba's default ("python") every
# division checks for a zero divisor and may raise, and that branch stopped LLVM
# vectorizing (4x slower).
_J = dict(nogil=True, cache=True, error_model="numpy")


def _variant(rule: str, amsgrad: bool, mask: bool) -> Callable[..., int]:
    """The compiled kernel of one variant. ``rule`` and the flags are constants of the
    closure: numba prunes the branches not taken before typing, so each variant holds
    only its own code, and caches each variant on its own."""

    @njit(**_J)
    def kernel(ptrs, chunks, units, counter, stops, scal, salts, plike, slike, consts, sr, seed):
        if rule == "adamax":
            return _adamax_chunks(
                ptrs, chunks, units, counter, stops, scal, salts, plike, slike, consts, sr, seed, mask
            )  # fmt: skip
        if rule == "nadam":
            return _adam_chunks(
                ptrs, chunks, units, counter, stops, scal, salts, plike, slike, consts, sr, seed, False, mask, True
            )  # fmt: skip
        if amsgrad:
            return _adam_chunks(
                ptrs, chunks, units, counter, stops, scal, salts, plike, slike, consts, sr, seed, True, mask, False
            )  # fmt: skip
        return _adam_chunks(
            ptrs, chunks, units, counter, stops, scal, salts, plike, slike, consts, sr, seed, False, mask, False
        )  # fmt: skip

    kernel.__name__ = kernel.__qualname__ = f"_{rule}{'_amsgrad' if amsgrad else ''}{'_masked' if mask else ''}"
    return kernel


_KERNELS = {
    (rule, amsgrad, mask): _variant(rule, amsgrad, mask)
    for rule, amsgrad in (("adam", False), ("adam", True), ("adamax", False), ("nadam", False))
    for mask in (False, True)
}


# The rare path, compiled the first time a non-finite gradient shows up: scalar code
# that skips the elements _masked picks (their parameter and moments stay as they
# were) and counts them. Kept apart so the common kernels carry neither the
# selects (they cost 5% on 16M elements) nor a second copy of the loop (compile time).
@njit(nogil=True, cache=True, error_model="numpy")
def _adam_rest(ptrs, chunks, stops, scal, salts, plike, slike, consts, sr, seed, amsgrad, nadam):
    c = consts
    low, b1w, c1, b2, b2w, eps, decay, l2, gsign = c.low, c.b1w, c.c1, c.b2, c.b2w, c.eps, c.decay, c.l2, c.gsign
    bad = 0
    for c in range(chunks.shape[0]):
        if stops[c] < 0:
            continue
        t, lo, hi = chunks[c, 0], stops[c], chunks[c, 2]
        stream = _tensor_seed(seed, salts[t]) if sr else _U(0)
        lr_t, inv = scal[t, 0], scal[t, 1]
        gstep = scal[t, 2] if nadam else lr_t * 0
        p, g = _piece(ptrs, t, 0, lo, hi, plike), _piece(ptrs, t, 1, lo, hi, plike)
        m, v = _piece(ptrs, t, 2, lo, hi, slike), _piece(ptrs, t, 3, lo, hi, slike)
        x = _piece(ptrs, t, 4, lo, hi, slike) if amsgrad else v
        for i in range(hi - lo):
            gi = _load(g, i)
            xi = _load(x, i) if amsgrad else _load(v, i)
            p1, m1, v1, x1 = _rule(
                gi, _load(p, i), _load(m, i), _load(v, i), xi,
                low, b1w, c1, b2, b2w, eps, lr_t, inv, gstep, decay, l2, gsign, amsgrad, nadam,
            )  # fmt: skip
            if _masked(gi, m1, v1, x1):
                bad += 1
                continue
            _store_param(p, i, p1, sr, stream, lo + i)
            _store(m, i, m1)
            _store(v, i, v1)
            if amsgrad:
                _store(x, i, x1)
    return bad


# -------------------------------------------------------------------------- Adamax
@njit(inline="always")
def _adamax_rule(g, p, m, u, low, c1, b2, eps, lr_t, l2, gsign):
    """One element of Adamax: new (p, m, u)."""
    g = g * gsign
    g = g + l2 * p if l2 != 0 else g
    m1 = _fma(c1, g - m, m if low else g)
    u1 = _nan_max(b2 * u, np.abs(g) + eps)
    return p - lr_t * (m1 / u1), m1, u1


@njit(inline="always")
def _adamax_loop(p, g, m, u, j0, sc, stream):
    low, c1, b2, eps, lr_t, l2, gsign, sr = sc
    for i in range(p.shape[0]):
        p1, m1, u1 = _adamax_rule(_load(g, i), _load(p, i), _load(m, i), _load(u, i), low, c1, b2, eps, lr_t, l2, gsign)
        _store_param(p, i, p1, sr, stream, j0 + i)
        _store(m, i, m1)
        _store(u, i, u1)


@njit(inline="always")
def _adamax_chunks(ptrs, chunks, units, counter, stops, scal, salts, plike, slike, consts, sr, seed, mask):
    """Adamax; ptrs: int64 [n_tensors, 4] (param, grad, exp_avg, exp_inf); the rest as
    :func:`_adam_chunks`."""
    _wide_vectors()
    c = consts
    low, c1, b2, eps, l2, gsign = c.low, c.c1, c.b2, c.eps, c.l2, c.gsign
    stopped = 0
    while True:
        c_lo, c_hi = _claim(units, counter)
        if c_lo == c_hi:
            break
        for c in range(c_lo, c_hi):
            t, lo, hi = chunks[c, 0], chunks[c, 1], chunks[c, 2]
            stream = _tensor_seed(seed, salts[t]) if sr else _U(0)
            sc = (low, c1, b2, eps, scal[t, 0], l2, gsign, sr)
            step, blocked = _blocks(lo, hi)
            for b in range(lo, hi, step):
                e = min(b + step, hi)
                if blocked:
                    _ahead(ptrs, t, b + AHEAD, hi, plike, slike)
                p, g = _piece(ptrs, t, 0, b, e, plike), _piece(ptrs, t, 1, b, e, plike)
                m, u = _piece(ptrs, t, 2, b, e, slike), _piece(ptrs, t, 3, b, e, slike)
                if mask and not _tame(g):  # left to _adamax_rest from here on
                    stops[c] = b
                    stopped += 1
                    break
                _adamax_loop(p, g, m, u, b, sc, stream)
    return stopped


@njit(nogil=True, cache=True, error_model="numpy")
def _adamax_rest(ptrs, chunks, stops, scal, salts, plike, slike, consts, sr, seed):
    """Adamax's rare path: see :func:`_adam_rest`."""
    c = consts
    low, c1, b2, eps, l2, gsign = c.low, c.c1, c.b2, c.eps, c.l2, c.gsign
    bad = 0
    for c in range(chunks.shape[0]):
        if stops[c] < 0:
            continue
        t, lo, hi = chunks[c, 0], stops[c], chunks[c, 2]
        stream = _tensor_seed(seed, salts[t]) if sr else _U(0)
        p, g = _piece(ptrs, t, 0, lo, hi, plike), _piece(ptrs, t, 1, lo, hi, plike)
        m, u = _piece(ptrs, t, 2, lo, hi, slike), _piece(ptrs, t, 3, lo, hi, slike)
        lr_t = scal[t, 0]
        for i in range(hi - lo):
            gi = _load(g, i)
            p1, m1, u1 = _adamax_rule(gi, _load(p, i), _load(m, i), _load(u, i), low, c1, b2, eps, lr_t, l2, gsign)
            if _masked(gi, m1, u1, u1):
                bad += 1
                continue
            _store_param(p, i, p1, sr, stream, lo + i)
            _store(m, i, m1)
            _store(u, i, u1)
    return bad


# ------------------------------------------------------------------------ launchers
def unsupported(param_dtype: torch.dtype, state_dtype: torch.dtype, contiguous: bool) -> str | None:
    """Why these kernels cannot take such a tensor, or None if they can."""
    if param_dtype not in STATE_DTYPES:
        return f"the numba kernels take {sorted(map(str, STATE_DTYPES))} parameters, not {param_dtype}"
    if state_dtype not in STATE_DTYPES[param_dtype]:
        allowed = sorted(map(str, STATE_DTYPES[param_dtype]))
        return f"the numba kernels keep the state of {param_dtype} parameters in {allowed}, not {state_dtype}"
    if not contiguous:
        return layout_refusal("numba")
    return None


def _launch(
    kernel: Callable[..., int],
    rest: Callable[..., int] | None,
    tab: Tables,
    work: type,
    consts: tuple,
    sr_seed: int | None,
) -> int:
    """Run ``kernel`` on torch.get_num_threads() threads (the caller is one of them), all
    claiming work units from one counter; then ``rest`` (the masking kernels' rare path)
    over the chunks they left. Returns the number of elements masked."""
    plike, slike = _LIKE[tab.param_dtype], _LIKE[tab.state_dtype]
    units = unit_table(tab.chunks) if tab.units is None else tab.units
    counter = np.zeros(1, dtype=np.int64)
    stops = np.full(tab.chunks.shape[0] if rest is not None else 0, -1, dtype=np.int64)
    scal = tab.scal.astype(work)
    tail = (plike, slike, consts, sr_seed is not None, sr_seed or 0)
    args = (tab.ptrs, tab.chunks, units, counter, stops, scal, tab.salts, *tail)
    stopped = sum(on_threads(kernel, args, units.size - 1))
    if not stopped:
        return 0
    return int(rest(tab.ptrs, tab.chunks, stops, scal, tab.salts, *tail))


def _work_dtype(tab: Tables) -> type:
    return np.float64 if tab.param_dtype == torch.float64 else np.float32


def adam_tables_(
    tab: Tables, s: StepScalars, *, amsgrad: bool, maximize: bool, mask_nonfinite: bool, sr_seed: int | None = None
) -> int:
    """Fused Adam/AdamW over tables (see :class:`Tables`); returns the masked count."""
    if tab.chunks.shape[0] == 0:
        return 0
    work = _work_dtype(tab)
    consts = rule_consts(s, maximize, work)
    rest = functools.partial(_adam_rest, amsgrad=amsgrad, nadam=False) if mask_nonfinite else None
    return _launch(_KERNELS["adam", amsgrad, mask_nonfinite], rest, tab, work, consts, sr_seed)


def nadam_tables_(
    tab: Tables, s: StepScalars, *, amsgrad: bool = False, maximize: bool, mask_nonfinite: bool,
    sr_seed: int | None = None,
) -> int:  # fmt: skip
    """Fused NAdam over tables (``tab.scal``: step_size, inv_bc2_sqrt, grad_step); returns
    the masked count."""
    if amsgrad:
        raise ValueError("NAdam has no AMSGrad variant")
    if tab.chunks.shape[0] == 0:
        return 0
    consts = rule_consts(s, maximize, _work_dtype(tab))
    rest = functools.partial(_adam_rest, amsgrad=False, nadam=True) if mask_nonfinite else None
    return _launch(_KERNELS["nadam", False, mask_nonfinite], rest, tab, _work_dtype(tab), consts, sr_seed)


def adamax_tables_(
    tab: Tables, s: StepScalars, *, amsgrad: bool, maximize: bool, mask_nonfinite: bool, sr_seed: int | None = None
) -> int:
    """Fused Adamax over tables (see :class:`Tables`); returns the masked count."""
    if amsgrad:
        raise ValueError("Adamax has no AMSGrad variant")
    if tab.chunks.shape[0] == 0:
        return 0
    work = _work_dtype(tab)
    consts = rule_consts(s, maximize, work)
    rest = _adamax_rest if mask_nonfinite else None
    return _launch(_KERNELS["adamax", False, mask_nonfinite], rest, tab, work, consts, sr_seed)


@register(
    "adam", backend="numba", device_types=("cpu",), state_bits=(32, 16), unsupported=unsupported, tables=adam_tables_
)
def adam_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: Mapping[str, Sequence[Tensor]],
    s: StepScalars,
    *,
    amsgrad: bool,
    maximize: bool,
    mask_nonfinite: bool,
    sr_seed: int | None = None,
    salts: Sequence[int] | None = None,
) -> int:
    """Fused Adam/AdamW over one bucket of tensors (see :func:`unsupported` for which)."""
    if not params:
        return 0
    columns = [params, grads, state["exp_avg"], state["exp_avg_sq"]] + ([state["max_exp_avg_sq"]] if amsgrad else [])
    tab = tables_for(columns, s, salts)
    return adam_tables_(tab, s, amsgrad=amsgrad, maximize=maximize, mask_nonfinite=mask_nonfinite, sr_seed=sr_seed)


@register(
    "adamax",
    backend="numba",
    device_types=("cpu",),
    state_bits=(32, 16),
    unsupported=unsupported,
    tables=adamax_tables_,
)
def adamax_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: Mapping[str, Sequence[Tensor]],
    s: StepScalars,
    *,
    amsgrad: bool = False,
    maximize: bool,
    mask_nonfinite: bool,
    sr_seed: int | None = None,
    salts: Sequence[int] | None = None,
) -> int:
    """Fused Adamax over one bucket of tensors (see :func:`unsupported` for which)."""
    if amsgrad:
        raise ValueError("Adamax has no AMSGrad variant")
    if not params:
        return 0
    tab = tables_for([params, grads, state["exp_avg"], state["exp_inf"]], s, salts)
    return adamax_tables_(tab, s, amsgrad=False, maximize=maximize, mask_nonfinite=mask_nonfinite, sr_seed=sr_seed)


@register(
    "nadam", backend="numba", device_types=("cpu",), state_bits=(32, 16), unsupported=unsupported, tables=nadam_tables_
)
def nadam_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: Mapping[str, Sequence[Tensor]],
    s: StepScalars,
    *,
    amsgrad: bool = False,
    maximize: bool,
    mask_nonfinite: bool,
    sr_seed: int | None = None,
    salts: Sequence[int] | None = None,
) -> int:
    """Fused NAdam over one bucket of tensors (see :func:`unsupported` for which)."""
    if not params:
        return 0
    tab = tables_for([params, grads, state["exp_avg"], state["exp_avg_sq"]], s, salts)
    return nadam_tables_(tab, s, amsgrad=amsgrad, maximize=maximize, mask_nonfinite=mask_nonfinite, sr_seed=sr_seed)
