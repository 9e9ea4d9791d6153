"""Fused CUDA kernels in Triton: every variant of the rule, many tensors per launch.

One launch covers a whole bucket of tensors, as torch's ``multi_tensor_apply`` does:
a table of raw addresses (one row per tensor: element count, random stream, then the
parameter, gradient and state columns) and a table of work items (tensor, first
element or first block). Each program takes one work item, so 20,000 small tensors
cost one launch, and a 16M tensor is spread over every SM.

* **32/16-bit state** (:func:`_dense_kernel`): ``BLOCK`` elements per program; fp32,
  bf16, fp16 and fp64 parameters (complex ones as pairs of reals), state in fp32,
  bf16 or fp16 (fp64 with fp64 parameters); math in fp32 (fp64 for fp64).
* **8-bit and dithered 4-bit state** (:func:`_quant_kernel`): whole quantization
  blocks per program, as a [rows, block] tile: decode, the rule, each row's new absmax
  (an integer max over the finite magnitudes' bits; a non-finite value is stored
  saturated, as in the reference), encode. 8-bit codes are the nearest value's (the count of midpoints below ``y``, as
  ``torch.searchsorted``) from one table load and an add (:func:`_encode8`); 4-bit
  codes are the dithered positions of :mod:`adamkit.quant.blockwise`, a byte's two
  nibbles joined and split in the element tile.

The rule is written once per algorithm (:func:`_adam_rule`, :func:`_adamax_rule`,
:func:`_nadam_rule`)
and is the reference's: torch's ``lerp`` with its two forms, ``sqrt(v)·inv_bc2_sqrt
+ ε`` with a correctly rounded square root and division (``div_rn``/``sqrt_rn``:
Triton's ``/`` is approximate), NaN-propagating maxima, bf16 stores rounded to
nearest even with integer arithmetic (NaN -> 0x7FC0; bf16 state flushes subnormals,
as the reference does), or stochastically with the numba kernels' counter-based
random bits. Kernels are compiled without contracting ``a·b + c`` into FMAs
(``enable_fp_fusion=False``) so that they compute exactly what the CPU kernels and the
reference compute; the one FMA, torch's lerp, is explicit. The step is memory-bound,
so this costs nothing measurable.

Hyperparameters are runtime values, never ``tl.constexpr``: they arrive in a small
float64 device table (the rule's constants, and ``step_size`` / ``inv_bc2_sqrt`` per
tensor), so changing lr or betas does not recompile, and parameters whose ``step``
lags share the launch. Only the dtypes and the algorithm switches (RULE: the algorithm's name, AMSGRAD,
MASK, SR, the codebook kinds) are constants.

Non-finite gradients (``mask``): the element whose gradient is NaN/±inf, or so large
that its moments overflowed (:func:`_masked`), keeps its parameter and moments, and is
counted with one atomic add per program into a device counter, which the launcher
returns as a tensor: reading it would make every step wait for the GPU, so the
optimizer reads it only once it is ready (see :class:`adamkit.optim.AdamFamily`).

Without a GPU the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set
before this module is imported) on CPU tensors: the tests do so, and then the
``triton`` backend takes CPU tensors when asked for by name (never for ``"auto"``).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from ..._scalars import RULE_CONSTS, RuleConsts, StepScalars, rule_consts
from ...quant import QUANT_BITS, QuantFormat
from ...quant.codebooks import _LOW_BITS, _ONE_BITS, DITHER_STEP, TABLE_BITS, dither_phase, dither_tables, encoder_table
from ...spec import ALGORITHMS
from .._tables import Tables
from ..registry import layout_refusal, register

#: Whether Triton runs its interpreter (CPU tensors, numpy semantics) instead of compiling.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: Devices the kernels take under ``backend="auto"``, and those they take only when
#: asked for by name (the interpreter's CPU tensors).
DEVICES = ("cuda",)
EXPLICIT_DEVICES = ("cpu",) if INTERPRETED else ()

#: Elements per program with 32/16-bit state: 4 warps of 8 elements per thread. A
#: memory-bound step wants many bytes in flight per SM; 1024 is the usual choice for
#: elementwise Triton kernels (tuned on a GPU when one is at hand).
BLOCK = 1024
#: Elements per tile with quantized state (whole blocks: ``rows`` = this / block): 4 per
#: thread. 2048 needed 255 registers and spilled (ptxas); 512 needs 82-119 (about 20
#: resident warps per SM). A program steps QUANT_TILES tiles, so that its tensor's
#: addresses and constants are read once for 2048 elements.
QUANT_TILE = 512
QUANT_TILES = 2
#: Warps per program (Triton's default, 4, for both), and a cap on the registers per
#: thread of the quantized kernel (None: ptxas' choice). For 8-bit AdamW ptxas takes 96
#: (Triton 3.9) or 108 (3.6): 20 or 16 resident warps per SM. A cap of 96 keeps 20 with
#: 3.6 too, but spills in its bf16 AMSGrad variants; ``scripts/tune-cuda.py`` times the
#: choices on a GPU.
DENSE_WARPS = 4
QUANT_WARPS = 4
QUANT_MAXNREG: int | None = None

#: What each launch setting may be: (allowed values, what they are).
_SETTINGS: dict[str, tuple[tuple[int | None, ...], str]] = {
    "BLOCK": (tuple(1 << k for k in range(6, 15)), "a power of two from 64 to 16384"),
    "DENSE_WARPS": ((1, 2, 4, 8, 16), "1, 2, 4, 8 or 16"),
    "QUANT_TILE": (tuple(1 << k for k in range(6, 14)), "a power of two from 64 to 8192"),
    "QUANT_TILES": (tuple(range(1, 17)), "an int from 1 to 16"),
    "QUANT_WARPS": ((1, 2, 4, 8, 16), "1, 2, 4, 8 or 16"),
    "QUANT_MAXNREG": ((None, *range(24, 256)), "None (ptxas' choice) or an int from 24 to 255"),
}


def launch_settings(**changes: int | None) -> dict[str, int | None]:
    """The kernels' launch settings (``BLOCK``, ``DENSE_WARPS``, ``QUANT_TILE``,
    ``QUANT_TILES``, ``QUANT_WARPS``, ``QUANT_MAXNREG``; see the module's constants),
    as they were before this call; keywords change them, for the launches that follow
    (each new combination compiles once). All are checked before any is changed.
    ``scripts/tune-cuda.py`` times them on a GPU and prints the call for the fastest:

        adamkit.kernels.cuda.triton_kernels.launch_settings(BLOCK=2048, DENSE_WARPS=8)
    """
    checked = {}
    for name, value in changes.items():
        if name not in _SETTINGS:
            raise TypeError(f"launch_settings: unknown setting {name!r}; the settings are {sorted(_SETTINGS)}")
        allowed, words = _SETTINGS[name]
        integral = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
        if not (value is None or integral) or value not in allowed:
            raise ValueError(f"launch_settings: {name} must be {words}, got {value!r}")
        checked[name] = None if value is None else int(value)
    before = {name: globals()[name] for name in _SETTINGS}
    globals().update(checked)
    return before


#: The row length of state with one absmax per tensor (``block_wise=False``).
DEFAULT_ROW = {8: 256, 4: 128}
#: float32 entries per state in the codebooks' table: at 8 bits the 256 values, then
#: the packed encoder table (:func:`_carry_table`, 6658 int32 entries).
_BOOK = 7168
BOOK = tl.constexpr(_BOOK)
_ENC_SHIFT = 23 - TABLE_BITS
# the packed table's constants, as the kernels read them: its entries lie at 256 in a
# state's book, and the slice of magnitude bits ``b`` at ``(b >> _ENC_SHIFT) - (LOW >> _ENC_SHIFT)``
_ENC_LOW, _ENC_BASE = tl.constexpr(_LOW_BITS), tl.constexpr(256 - (_LOW_BITS >> _ENC_SHIFT))
_ENC_SHIFT, _ENC_HALF = tl.constexpr(_ENC_SHIFT), tl.constexpr(((_ONE_BITS - _LOW_BITS) >> _ENC_SHIFT) + 1)
#: Width of the address table: numel, random stream, then up to 8 pointers (param,
#: grad, and codes/absmax of up to three state tensors).
_COLS = 10

_TL = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64}
#: State dtypes the dense kernel keeps for each parameter dtype (as the numba kernels).
STATE_DTYPES = {
    torch.float32: (torch.float32, torch.bfloat16, torch.float16),
    torch.bfloat16: (torch.float32, torch.bfloat16, torch.float16),
    torch.float16: (torch.float32, torch.bfloat16, torch.float16),
    torch.float64: (torch.float64,),
    torch.complex64: (torch.complex64,),
    torch.complex128: (torch.complex128,),
}
#: Parameter dtypes of quantized state (math in float32).
QUANT_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: ``reference.HUGE``: gradient magnitudes from which masking looks at the new moments.
_HUGE32, _HUGE64 = tl.constexpr(2.0**60), tl.constexpr(2.0**508)
#: Indices into the constants table (float64, on the device); with stochastic
#: rounding, the step's random seed follows them (``_SEED``).
_LOW, _B1W, _C1, _B2, _B2W, _EPS, _DECAY, _L2, _GSIGN, _SEED = range(10)
assert RULE_CONSTS == ("low", "b1w", "c1", "b2", "b2w", "eps", "decay", "l2", "gsign"), "the table's order"
#: Columns of the per-tensor scalars (float64): step_size, inv_bc2_sqrt, the dither
#: phases the codes were written at and are written at (``dither_phase`` of t-1, t),
#: grad_step (NAdam's; the kernels index the columns as ``5 * t + k``).
SCALARS = 5
_M32 = 0xFFFFFFFF


# --------------------------------------------------------------------------- helpers
@triton.jit
def _hash32(x):
    """Wellons' lowbias32 on uint32 lanes (the numba kernels' and the reference's)."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _stream(row, consts):
    """A tensor's stochastic-rounding stream: the step's seed (``consts[_SEED]``) mixed
    with the tensor's salt hash (address table column 1), as the numba kernels'
    ``_tensor_seed``: the address table stays the same from step to step."""
    return _hash32(tl.load(consts + 9).to(tl.uint32) + tl.load(row + 1).to(tl.uint32))


@triton.jit
def _bf16(x, FTZ: tl.constexpr, SR: tl.constexpr, rnd):
    """float32 -> bf16, rounded to nearest even (or up with probability equal to the
    dropped fraction when SR; ``rnd`` holds 32 random bits); NaN -> 0x7FC0; with FTZ,
    magnitudes below 2^-126 to zeros of their sign first."""
    if FTZ:
        x = tl.where(tl.abs(x) < 1.1754943508222875e-38, x * 0.0, x)
    bits = tl.where(x != x, 0x7FC00000, x.to(tl.uint32, bitcast=True))
    if SR:
        bits = bits + (rnd & 0xFFFF)
    else:
        bits = bits + (0x7FFF + ((bits >> 16) & 1))
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _cast(x, T: tl.constexpr, FTZ: tl.constexpr, SR: tl.constexpr, rnd):
    """Float lanes ``x`` as ``T`` (bf16: :func:`_bf16`'s rounding)."""
    if T == tl.bfloat16:
        y = _bf16(x.to(tl.float32), FTZ, SR, rnd)
    else:
        y = x.to(T)
    return y


@triton.jit
def _nan_max(a, b):
    """``torch.maximum``: NaN if either is NaN."""
    return tl.where((a != a) | (b != b), a + b, tl.maximum(a, b))


@triton.jit
def _sqrt(x):
    """Correctly rounded square root (Triton's ``tl.sqrt`` is approximate in float32)."""
    if x.dtype == tl.float64:
        y = tl.sqrt(x)  # correctly rounded in float64
    else:
        y = tl.sqrt_rn(x)
    return y


@triton.jit
def _div(a, b):
    """Correctly rounded division (``/`` is approximate in float32)."""
    if a.dtype == tl.float64:
        q = a / b
    else:
        q = tl.div_rn(a, b)
    return q


@triton.jit
def _ptr(row, col, T: tl.constexpr, ALIGNED: tl.constexpr = False):
    """Column ``col``'s address of a table row as a pointer to ``T``; ALIGNED: the
    launcher checked that every such address is a multiple of 16 bytes, which lets
    Triton load and store 16 bytes per instruction (it cannot know it of an address
    read from memory: without the hint every element is its own 4-byte access)."""
    ptr = tl.load(row + col).to(tl.pointer_type(T))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


#: Compiled kernels look tables up with inline PTX (the interpreter cannot run it).
_ASM_GATHER = tl.constexpr(not INTERPRETED)


@triton.jit
def _gather(base, index):
    """``tl.load(base + index)`` for a lookup in a read-only table. Compiled, it is one
    ``ld.global.nc`` per element as an elementwise op: Triton 3.6's coalescing pass
    lays a load through data-dependent 2-D pointers out column-major (ties in its
    contiguity sort), and the layout pass then moved the whole tile through shared
    memory around each lookup (3.6: 166 SASS instructions per element for 8-bit AdamW,
    133 with this; 3.9, which breaks the tie row-major, 128 either way)."""
    if _ASM_GATHER:
        x = tl.inline_asm_elementwise("ld.global.nc.b32 $0, [$1];", "=r,l", [base + index], dtype=tl.float32,
                                      is_pure=True, pack=1)  # fmt: skip
    else:
        x = tl.load(base + index)
    return x


@triton.jit
def _consts(consts, W: tl.constexpr):
    """The rule's constants (``_LOW``...) as ``W`` scalars, loaded once per program."""
    return (tl.load(consts).to(W), tl.load(consts + 1).to(W), tl.load(consts + 2).to(W), tl.load(consts + 3).to(W),
            tl.load(consts + 4).to(W), tl.load(consts + 5).to(W), tl.load(consts + 6).to(W),
            tl.load(consts + 7).to(W), tl.load(consts + 8).to(W))  # fmt: skip


@triton.jit
def _l2(g, p, c):
    """``±g + l2·θ`` (one FMA), or ``±g`` when l2 is 0: never ``0·θ``, NaN for an
    infinite parameter (whose moments stay finite, as torch's)."""
    gs = g * c[8]
    return tl.where(c[7] != 0, tl.fma(tl.zeros_like(p) + c[7], p, gs), gs)


@triton.jit
def _masked(g, m1, v1, x1):
    """Which elements ``nonfinite="mask"`` leaves alone (``reference.masked_elements``):
    a NaN/±inf gradient, or one of magnitude ``HUGE`` or more (2^60 in float32 math,
    2^508 in float64) whose new moments are not all finite. A NaN/±inf gradient always
    makes ``v`` (Adamax: ``u``) NaN/inf (``β2 < 1``), so its own test is left out: with
    it, the one-absmax-per-tensor kernel's first pass spilled registers on sm_90."""
    if g.dtype == tl.float64:
        tame = tl.abs(g) < _HUGE64
    else:
        tame = tl.abs(g) < _HUGE32
    return ~tame & (((m1 - m1) != 0) | ((v1 - v1) != 0) | ((x1 - x1) != 0))


@triton.jit
def _adam_rule(g, p, m, v, x, c, lr_t, inv, AMSGRAD: tl.constexpr):
    """Adam/AdamW for float lanes: new (p, m, v, v_max); ``reference.adam_rule_``
    operation for operation, rounded as torch's CPU ops round (measured bit for bit):
    ``add(alpha)`` is one FMA, ``addcmul`` ``fma(value·a, b, self)``, ``addcdiv``
    ``self + (value·a) / b``, and torch's lerp ``m + w·(g-m)`` for ``w < 0.5`` and
    ``g - (g-m)·(1-w)`` otherwise, fused (``c1`` is ``w`` or ``-(1-w)``, ``low`` picks
    the base); ``c``: :func:`_consts`."""
    g = _l2(g, p, c)
    base = tl.where(c[0] != 0, m, g)
    m1 = tl.fma(tl.zeros_like(g) + c[2], g - m, base)
    v1 = tl.fma(c[4] * g, g, c[3] * v)
    if AMSGRAD:
        x1 = _nan_max(x, v1)
    else:
        x1 = v1
    denom = _sqrt(x1) * inv + c[5]
    p1 = p * c[6] + _div(-lr_t * m1, denom)
    return p1, m1, v1, x1


@triton.jit
def _adamax_rule(g, p, m, u, c, lr_t):
    """Adamax for float lanes: new (p, m, u); ``reference.adamax_rule_``, rounded as
    :func:`_adam_rule` says."""
    g = _l2(g, p, c)
    base = tl.where(c[0] != 0, m, g)
    m1 = tl.fma(tl.zeros_like(g) + c[2], g - m, base)
    u1 = _nan_max(c[3] * u, tl.abs(g) + c[5])
    return p + _div(-lr_t * m1, u1), m1, u1


@triton.jit
def _nadam_rule(g, p, m, v, c, lr_t, inv, gstep):
    """NAdam for float lanes: new (p, m, v); ``reference.nadam_rule_``, rounded as
    :func:`_adam_rule` says (``gstep``, ``lr_t``: the gradient's and the momentum's
    coefficients)."""
    g = _l2(g, p, c)
    base = tl.where(c[0] != 0, m, g)
    m1 = tl.fma(tl.zeros_like(g) + c[2], g - m, base)
    v1 = tl.fma(c[4] * g, g, c[3] * v)
    denom = _sqrt(v1) * inv + c[5]
    p1 = p * c[6] + _div(-gstep * g, denom)
    return p1 + _div(-lr_t * m1, denom), m1, v1


@triton.jit
def _grad(g_ptr, offs, mask, scale_ptr, W: tl.constexpr, SCALED: tl.constexpr):
    """The gradient in ``W`` lanes, divided by the AMP scale when SCALED."""
    g = tl.load(g_ptr + offs, mask=mask, other=0).to(W)
    if SCALED:
        g = _div(g, tl.zeros_like(g) + tl.load(scale_ptr).to(W))
    return g


@triton.jit
def _go(flags_ptr, like, SCALED: tl.constexpr):
    """False if the AMP scaler found an inf/NaN (``found_inf`` != 0), shaped like the
    integer tensor ``like``: the step is skipped by masking every load and store with
    it (no data-dependent branch)."""
    go = like == like
    if SCALED:
        go = (tl.zeros_like(like).to(tl.float32) + tl.load(flags_ptr)) == 0.0
    return go


# ------------------------------------------------------------------- 32/16-bit state
@triton.jit
def _dense_body(row, t, offs, mask, scal, consts, count, amp,
                P: tl.constexpr, S: tl.constexpr, W: tl.constexpr, RULE: tl.constexpr, AMSGRAD: tl.constexpr,
                MASK: tl.constexpr, SR: tl.constexpr, FTZ: tl.constexpr, SCALED: tl.constexpr,
                ALIGNED: tl.constexpr):  # fmt: skip
    """The elements ``offs`` of tensor ``t``. ``mask`` is the same for all of them in a
    full block (only found_inf), so loads and stores go 16 bytes at a time; the elements
    :func:`_masked` picks get their loaded values stored back, bit for bit."""
    p_ptr, g_ptr = _ptr(row, 2, P, ALIGNED), _ptr(row, 3, P, ALIGNED)
    m_ptr, v_ptr = _ptr(row, 4, S, ALIGNED), _ptr(row, 5, S, ALIGNED)
    lr_t, inv = tl.load(scal + 5 * t).to(W), tl.load(scal + 5 * t + 1).to(W)
    rnd = offs.to(tl.uint32)
    if SR:
        rnd = _hash32(_stream(row, consts) + offs.to(tl.uint32) * 0x9E3779B1)
    g = _grad(g_ptr, offs, mask, amp, W, SCALED)
    if SCALED:  # the unscaled gradient written back, as torch's fused kernels do
        tl.store(g_ptr + offs, _cast(g, P, False, False, rnd), mask=mask)
    p_raw = tl.load(p_ptr + offs, mask=mask, other=0)
    m_raw = tl.load(m_ptr + offs, mask=mask, other=0)
    v_raw = tl.load(v_ptr + offs, mask=mask, other=0)
    p, m, v = p_raw.to(W), m_raw.to(W), v_raw.to(W)
    if RULE == "adamax":
        p1, m1, v1 = _adamax_rule(g, p, m, v, _consts(consts, W), lr_t)
        x1 = v1
    elif RULE == "nadam":
        gstep = tl.load(scal + 5 * t + 4).to(W)
        p1, m1, v1 = _nadam_rule(g, p, m, v, _consts(consts, W), lr_t, inv, gstep)
        x1 = v1
    else:
        x = v
        if AMSGRAD:
            x_ptr = _ptr(row, 6, S, ALIGNED)
            x_raw = tl.load(x_ptr + offs, mask=mask, other=0)
            x = x_raw.to(W)
        p1, m1, v1, x1 = _adam_rule(g, p, m, v, x, _consts(consts, W), lr_t, inv, AMSGRAD)
    ok = offs == offs
    if MASK:
        ok = ~_masked(g, m1, v1, x1)
        bad = tl.sum((mask & ~ok).to(tl.int32), axis=0)
        tl.atomic_add(count, bad, mask=bad > 0, sem="relaxed")  # one atomic per program would serialize in L2
    if AMSGRAD:
        tl.store(x_ptr + offs, tl.where(ok, _cast(x1, S, FTZ, False, rnd), x_raw), mask=mask)
    tl.store(p_ptr + offs, tl.where(ok, _cast(p1, P, False, SR, rnd), p_raw), mask=mask)
    tl.store(m_ptr + offs, tl.where(ok, _cast(m1, S, FTZ, False, rnd), m_raw), mask=mask)
    tl.store(v_ptr + offs, tl.where(ok, _cast(v1, S, FTZ, False, rnd), v_raw), mask=mask)


@triton.jit
def _dense_kernel(meta, work, scal, consts, count, amp,
                  P: tl.constexpr, S: tl.constexpr, W: tl.constexpr, RULE: tl.constexpr, AMSGRAD: tl.constexpr,
                  MASK: tl.constexpr, SR: tl.constexpr, FTZ: tl.constexpr, SCALED: tl.constexpr,
                  BLOCK: tl.constexpr, ALIGNED: tl.constexpr):  # fmt: skip
    """One work item (tensor, first element) of a dense-state step: a full block of
    BLOCK elements without an element mask (vectorized accesses), or a tensor's tail.

    meta: int64 [n, _COLS] (numel, stream, p, g, m, v, v_max); work: int64 [items, 2];
    scal: float64 [n, SCALARS] (step_size, inv_bc2_sqrt, phases, grad_step); consts: float64 (``_LOW``...);
    count: int32 [1], masked elements; amp: float32 [2] (grad scale, found_inf).
    """
    w = tl.program_id(0)
    t = tl.load(work + 2 * w)
    row = meta + t * 10
    start = tl.load(work + 2 * w + 1)
    if ALIGNED:
        start = tl.multiple_of(start, BLOCK)  # work items start at multiples of BLOCK
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    n = tl.load(row)
    go = _go(amp + 1, offs, SCALED)
    if start + BLOCK <= n:
        _dense_body(row, t, offs, go, scal, consts, count, amp, P, S, W, RULE, AMSGRAD, MASK, SR, FTZ, SCALED,
                    ALIGNED)  # fmt: skip
    else:
        _dense_body(row, t, offs, go & (offs < n), scal, consts, count, amp, P, S, W, RULE, AMSGRAD, MASK, SR,
                    FTZ, SCALED, ALIGNED)  # fmt: skip


# ------------------------------------------------------------------- quantized state
@triton.jit
def _encode8(y, packed):
    """The nearest 8-bit code of normalized values ``y`` (ties to the lower code; NaN:
    255), exactly as a binary search over the 255 midpoints (``torch.searchsorted``),
    with one load from the packed table of :func:`_carry_table` (``packed``: its int32
    entries, stored as float32 bits): the magnitude's exponent and top 7 fraction bits
    pick a slice holding at most one midpoint, and adding the magnitude's low 16 bits
    (their complement below zero) to the entry carries into its code exactly when the
    value lies past that midpoint."""
    y = tl.where(y < 1.0, y, 1.0)  # NaN and +inf: 1.0 (code 255); the rest of [-1, 1] as it is
    y = tl.where(y > -1.0, y, -1.0)
    bits = y.to(tl.int32, bitcast=True)
    sign = bits >> 31  # 0, or -1 below zero
    mag = tl.maximum(bits & 0x7FFFFFFF, _ENC_LOW)
    entry = _gather(packed, (mag >> _ENC_SHIFT) + (sign & _ENC_HALF)).to(tl.int32, bitcast=True)
    return (entry + ((mag ^ sign) & 0xFFFF)) >> 16


def _carry_table(packed: np.ndarray) -> np.ndarray:
    """:func:`adamkit.quant.encoder_table`'s packed entries (``candidate << 16 | low``)
    rewritten so that ``(entry + low16(|y|)) >> 16`` is the code, ``low16`` complemented
    below zero (:func:`_encode8`): above zero ``low`` becomes ``0xFFFF - low`` (a carry
    exactly when ``low16(|y|) > low``); below zero it stays (a carry exactly when the
    complement exceeds ``0xFFFF - low``, that is ``low16(|y|) < low``)."""
    out = packed.astype(np.int64)
    half = out.size // 2
    out[:half] = (out[:half] & ~0xFFFF) | (0xFFFF - (out[:half] & 0xFFFF))
    return out.astype(np.int32)


@triton.jit
def _dither_hash(j, phase):
    """``(j · DITHER_ALONG + phase) mod 2^32`` for element indices ``j``."""
    return j.to(tl.uint32) * 3242174889 + phase


@triton.jit
def _decode4(code, h, tab, scale, ROOT: tl.constexpr):
    """Dithered 4-bit codes to values (``tab``: float32 rows values, rate, offset, up,
    down of 16 entries); squared for a root codebook."""
    back = (32768 - (h >> 16).to(tl.int32)).to(tl.float32)
    slope = _gather(tab, tl.where(back >= 0, 48, 64) + code)  # up or down: one load
    x = (_gather(tab, code) + back * slope) * scale
    if ROOT:
        x = x * x
    return x


@triton.jit
def _encode4(y, h, tab):
    """Normalized values to dithered 4-bit codes (the reference's float32 and integer
    operations): the interval from the value's cell (one of 32, see
    :class:`adamkit.quant.codebooks.DitherTables`) and one compare with the value inside
    it, the position in 2^-16 codes, the dither."""
    low = tl.load(tab)
    y = tl.minimum(tl.where(y > low, y, low), 2.0)  # NaN: as L[0]; above 1: code 15
    cell = (y * tl.load(tab + 144) + tl.load(tab + 145)).to(tl.int32)
    cell = tl.minimum(tl.maximum(cell, 0), 31)
    k = _gather(tab + 112, cell).to(tl.int32, bitcast=True) + (y >= _gather(tab + 80, cell)).to(tl.int32)
    position = (y * _gather(tab + 16, k) + _gather(tab + 32, k)).to(tl.int32)
    return tl.minimum((position + (h >> 16).to(tl.int32)) >> 16, 15)


@triton.jit
def _magnitude_top(x):
    """The rows' largest finite magnitudes' bits (int32)."""
    bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return tl.max(tl.where(bits < 0x7F800000, bits, 0), axis=1)


@triton.jit
def _inverse(top):
    """(absmax, 1 / absmax, scale) from the magnitude bits, as the reference's
    ``quantize``: ``inv`` 0 for an all-zero block; a subnormal absmax's rows are
    multiplied by ``scale`` = 2^64 first (its inverse would overflow), others by 1."""
    absmax = top.to(tl.float32, bitcast=True)
    positive = absmax > 0
    scale = tl.where(absmax < 1.1754943508222875e-38, 1.8446744073709552e19, 1.0)
    inv = tl.div_rn(tl.full(absmax.shape, 1.0, tl.float32), tl.where(positive, absmax * scale, 1.0))
    return absmax, tl.where(positive, inv, 0.0), scale


@triton.jit
def _decode(codes, cb, cmask, book, scale, h, BITS: tl.constexpr, ROOT: tl.constexpr,
            ROWS: tl.constexpr, E: tl.constexpr):  # fmt: skip
    """The decoded [ROWS, E] state from the code bytes at ``cb`` ([ROWS, E] at 8 bits;
    [ROWS, E/2] at 4 bits, the low nibble the even element: both nibbles are taken
    apart and interleaved back, so that elements stay in order)."""
    byte = tl.load(codes + cb, mask=cmask, other=0).to(tl.int32)
    if BITS == 8:
        x = _gather(book, byte) * scale
    else:
        code = tl.reshape(tl.join(byte & 15, byte >> 4), [ROWS, E])
        x = _decode4(code, h, book, scale, ROOT)
    return x


@triton.jit
def _encode(codes, cb, cmask, x, scaling, mask, h, book, BITS: tl.constexpr, ROWS: tl.constexpr, E: tl.constexpr,
            FLOOR: tl.constexpr):  # fmt: skip
    """Store the codes of the [ROWS, E] values ``x`` at the bytes ``cb``, normalized by
    ``scaling`` (:func:`_new_absmax`): a non-finite value saturated to ±absmax (NaN to
    +), as the reference's ``quantize`` (4 bits: even and odd elements' codes split
    apart and packed in one byte, a missing odd element's code 0, as the reference
    pads). FLOOR (8 bits, the unsigned map): a value above 0 takes code 1 at least."""
    absmax, inv, scale = scaling
    x = tl.where((x - x) == 0, x, tl.where(x < 0, -absmax[:, None], absmax[:, None])) * scale[:, None]
    y = x * inv[:, None]
    if BITS == 8:
        code = _encode8(y, book + _ENC_BASE)
        if FLOOR:
            code = tl.where(x > 0, tl.maximum(code, 1), code)
        tl.store(codes + cb, code.to(tl.uint8), mask=cmask)
    else:
        lo, hi = tl.split(tl.reshape(tl.where(mask, _encode4(y, h, book), 0), [ROWS, E // 2, 2]))
        tl.store(codes + cb, (lo | (hi << 4)).to(tl.uint8), mask=cmask)


@triton.jit
def _new_absmax(y, state_top, absmax_ptr, blk, live, PASS: tl.constexpr, ROWS: tl.constexpr):
    """The rows' new absmax, its inverse and scale (:func:`_inverse`; PASS 0: each
    row's, stored; PASS 2: the tensor's, from ``state_top``, stored by the row of block 0)."""
    if PASS == 0:
        absmax, inv, scale = _inverse(_magnitude_top(y))
        tl.store(absmax_ptr + blk, absmax, mask=live)
    else:
        absmax, inv, scale = _inverse(tl.zeros([ROWS], tl.int32) + tl.load(state_top))
        tl.store(absmax_ptr + blk * 0, absmax, mask=live & (blk == 0))
    return absmax, inv, scale


@triton.jit
def _quant_body(ptrs, s, c, blk, live, offs, mask, cb, cmask, books, amp, top,
                P: tl.constexpr, RULE: tl.constexpr, AMSGRAD: tl.constexpr, MASK: tl.constexpr, SR: tl.constexpr,
                SCALED: tl.constexpr, BITS: tl.constexpr, ROOT: tl.constexpr, ROWS: tl.constexpr,
                E: tl.constexpr, PASS: tl.constexpr):  # fmt: skip
    """Blocks ``blk`` (rows of the [ROWS, E] tile ``offs``; ``live``: the rows to step,
    ``mask`` the elements, ``cb``/``cmask`` their code bytes) of one tensor (``ptrs``:
    param, grad, then codes and absmax per state; ``s``: its step size, inv_bc2_sqrt,
    dither phases and random stream; ``c``: :func:`_consts`): decode, the rule, the
    parameters stored, each row's new absmax, encode. Masked elements keep their
    decoded moments (re-encoded with the row) and their parameter's bits. Returns the
    masked elements as int32 ones in the tile (the kernel sums them once).

    PASS 0: block-wise state. One absmax per tensor (``block_wise=False``) takes two
    launches, ``top`` pointing at the tensor's row of a zeroed int32 [n, 6] scratch
    table: PASS 1 computes the new moments and only takes their largest magnitudes
    (an atomic max per state into ``top[0:3]``) and copies the old absmax into
    ``top[3:6]``; PASS 2 computes them again, decodes with that copy (block 0's absmax
    is overwritten meanwhile), encodes with ``top[0:3]`` and stores everything."""
    p_ptr, g_ptr, mc, ma, sc, sa, xc, xa = ptrs
    lr_t, inv_bc, phase_old, phase_new, stream, gstep = s
    g = _grad(g_ptr, offs, mask, amp, tl.float32, SCALED)
    if SCALED and PASS != 1:
        tl.store(g_ptr + offs, _cast(g, P, False, False, offs), mask=mask)
    p_raw = tl.load(p_ptr + offs, mask=mask, other=0)
    p = p_raw.to(tl.float32)
    h = _dither_hash(offs, phase_old)
    if PASS == 0:
        m_old = tl.load(ma + blk, mask=live, other=0.0)
        v_old = tl.load(sa + blk, mask=live, other=0.0)
        x_old = v_old
        if AMSGRAD:
            x_old = tl.load(xa + blk, mask=live, other=0.0)
    else:  # one absmax: PASS 1 reads it and keeps a copy, which PASS 2 reads
        olds = top + 3 + tl.arange(0, ROWS) * 0
        if PASS == 1:
            m_old, v_old = tl.load(ma + blk * 0), tl.load(sa + blk * 0)
            tl.store(olds, m_old.to(tl.int32, bitcast=True))
            tl.store(olds + 1, v_old.to(tl.int32, bitcast=True))
        else:
            m_old = tl.load(olds).to(tl.float32, bitcast=True)
            v_old = tl.load(olds + 1).to(tl.float32, bitcast=True)
        x_old = v_old
        if AMSGRAD:
            if PASS == 1:
                x_old = tl.load(xa + blk * 0)
                tl.store(olds + 2, x_old.to(tl.int32, bitcast=True))
            else:
                x_old = tl.load(olds + 2).to(tl.float32, bitcast=True)
    m = _decode(mc, cb, cmask, books, m_old[:, None], h, BITS, False, ROWS, E)
    v = _decode(sc, cb, cmask, books + BOOK, v_old[:, None], h, BITS, ROOT, ROWS, E)
    x = v
    if AMSGRAD:
        x = _decode(xc, cb, cmask, books + 2 * BOOK, x_old[:, None], h, BITS, ROOT, ROWS, E)
    if RULE == "adamax":
        p1, m1, v1 = _adamax_rule(g, p, m, v, c, lr_t)
        x1 = v1
    elif RULE == "nadam":
        p1, m1, v1 = _nadam_rule(g, p, m, v, c, lr_t, inv_bc, gstep)
        x1 = v1
    else:
        p1, m1, v1, x1 = _adam_rule(g, p, m, v, x, c, lr_t, inv_bc, AMSGRAD)
    ok = mask
    bad = tl.zeros([ROWS, E], tl.int32)
    if MASK:
        ok = mask & ~_masked(g, m1, v1, x1)
        bad = (mask & ~ok).to(tl.int32)
    rnd = offs.to(tl.uint32)
    if SR:
        rnd = _hash32(stream + offs.to(tl.uint32) * 0x9E3779B1)
    if PASS != 1:
        tl.store(p_ptr + offs, tl.where(ok, _cast(p1, P, False, SR, rnd), p_raw), mask=mask)
    m1, v1, x1 = tl.where(ok, m1, m), tl.where(ok, v1, v), tl.where(ok, x1, x)
    if ROOT:
        v1, x1 = tl.sqrt_rn(v1), tl.sqrt_rn(x1)
    zero = tl.zeros_like(m1)
    m1, v1, x1 = tl.where(mask, m1, zero), tl.where(mask, v1, zero), tl.where(mask, x1, zero)
    if PASS == 1:  # the tensor's largest magnitudes so far; nothing else is written
        tl.atomic_max(top, tl.max(_magnitude_top(m1), axis=0), sem="relaxed")
        tl.atomic_max(top + 1, tl.max(_magnitude_top(v1), axis=0), sem="relaxed")
        if AMSGRAD:
            tl.atomic_max(top + 2, tl.max(_magnitude_top(x1), axis=0), sem="relaxed")
        bad = tl.zeros([ROWS, E], tl.int32)  # counted by PASS 2
    else:
        h = _dither_hash(offs, phase_new)
        scaling = _new_absmax(m1, top, ma, blk, live, PASS, ROWS)
        _encode(mc, cb, cmask, m1, scaling, mask, h, books, BITS, ROWS, E, False)
        scaling = _new_absmax(v1, top + 1, sa, blk, live, PASS, ROWS)
        _encode(sc, cb, cmask, v1, scaling, mask, h, books + BOOK, BITS, ROWS, E, True)
        if AMSGRAD:
            scaling = _new_absmax(x1, top + 2, xa, blk, live, PASS, ROWS)
            _encode(xc, cb, cmask, x1, scaling, mask, h, books + 2 * BOOK, BITS, ROWS, E, True)
    return bad


@triton.jit
def _quant_kernel(meta, work, scal, consts, books, count, amp, block, tops,
                  P: tl.constexpr, RULE: tl.constexpr, AMSGRAD: tl.constexpr, MASK: tl.constexpr,
                  SR: tl.constexpr, SCALED: tl.constexpr, BITS: tl.constexpr, ROOT: tl.constexpr,
                  ROWS: tl.constexpr, E: tl.constexpr, TILES: tl.constexpr, ALIGNED: tl.constexpr,
                  PASS: tl.constexpr = 0):  # fmt: skip
    """One work item (tensor, first block) of a quantized-state step: TILES tiles, one
    after the other, of ROWS blocks of ``block`` elements as a [ROWS, E] tile (E:
    ``block`` rounded up to a power of two). The tensor's addresses, scalars and the
    rule's constants are read once per item. ALIGNED: ``block`` is E and every address
    is 16-byte aligned, so a tile of whole blocks runs without an element mask, its
    elements and codes 16 bytes per access; a tensor's last tile runs masked.

    meta: int64 [n, _COLS] (numel, stream, p, g, then codes and absmax per state);
    books: float32, BOOK per state (8 bits: values at 0, :func:`_carry_table` at 256;
    4 bits: values, rate, offset, up, down, 16 each, then the 32 cells' thresholds and
    firsts, the cell scale and offset); tops: int32 [n, 6], zeroed, for one absmax
    per tensor (PASS 1 and 2, see :func:`_quant_body`; ``block`` then only cuts the
    tensor into rows); the rest as :func:`_dense_kernel`.
    """
    w = tl.program_id(0)
    t = tl.load(work + 2 * w)
    row = meta + t * 10
    n = tl.load(row)
    first = tl.load(work + 2 * w + 1)
    ptrs = (_ptr(row, 2, P, ALIGNED), _ptr(row, 3, P, ALIGNED), _ptr(row, 4, tl.uint8, ALIGNED),
            _ptr(row, 5, tl.float32), _ptr(row, 6, tl.uint8, ALIGNED), _ptr(row, 7, tl.float32),
            _ptr(row, 8, tl.uint8, ALIGNED), _ptr(row, 9, tl.float32))  # fmt: skip
    scal_row = scal + 5 * t
    stream = tl.full([], 0, tl.uint32)
    if SR:
        stream = _stream(row, consts)
    s = (tl.load(scal_row).to(tl.float32), tl.load(scal_row + 1).to(tl.float32),
         tl.load(scal_row + 2).to(tl.uint32), tl.load(scal_row + 3).to(tl.uint32), stream,
         tl.load(scal_row + 4).to(tl.float32))  # fmt: skip
    c = _consts(consts, tl.float32)
    top = tops + 6 * t
    go = _go(amp + 1, tl.arange(0, ROWS), SCALED)
    cols = tl.arange(0, E).to(tl.int64)
    pairs = tl.arange(0, E * BITS // 8).to(tl.int64)
    bad = tl.zeros([ROWS, E], tl.int32)
    for i in range(TILES):
        b0 = first + i * ROWS
        blk = b0 + tl.arange(0, ROWS).to(tl.int64)
        if ALIGNED and (b0 + ROWS) * E <= n:
            every = tl.broadcast_to(go[:, None], [ROWS, E])  # constant along rows: whole accesses
            every_byte = tl.broadcast_to(go[:, None], [ROWS, E * BITS // 8])
            bad += _quant_body(ptrs, s, c, blk, go, blk[:, None] * E + cols[None, :], every,
                               blk[:, None] * (E * BITS // 8) + pairs[None, :], every_byte, books, amp, top, P,
                               RULE, AMSGRAD, MASK, SR, SCALED, BITS, ROOT, ROWS, E, PASS)  # fmt: skip
        elif b0 * block < n:
            live = go & (blk * block < n)
            offs = blk[:, None] * block + cols[None, :]
            cb = blk[:, None] * (block * BITS // 8) + pairs[None, :]
            mask = live[:, None] & (cols[None, :] < block) & (offs < n)
            cmask = live[:, None] & (pairs[None, :] < block * BITS // 8) & (cb * (8 // BITS) < n)
            bad += _quant_body(ptrs, s, c, blk, live, offs, mask, cb, cmask, books, amp, top, P, RULE, AMSGRAD,
                               MASK, SR, SCALED, BITS, ROOT, ROWS, E, PASS)  # fmt: skip
    if MASK and PASS != 1:
        total = tl.sum(tl.sum(bad, axis=1), axis=0)
        tl.atomic_add(count, total, mask=total > 0, sem="relaxed")  # one atomic per program that masked anything


# ------------------------------------------------------------------------ launchers
def unsupported(param_dtype: torch.dtype, fmt: object, contiguous: bool) -> str | None:
    """Why these kernels cannot take such a parameter, or None if they can."""
    if not contiguous and isinstance(fmt, QuantFormat):
        return "the quantized triton kernels need contiguous parameters and gradients"
    if not contiguous:
        return layout_refusal("triton")
    if isinstance(fmt, QuantFormat):
        if param_dtype not in QUANT_PARAM_DTYPES:
            allowed = [str(d) for d in QUANT_PARAM_DTYPES]
            return f"the quantized triton kernels take {allowed} parameters, not {param_dtype}"
        if fmt.bits == 4 and not fmt.dither:
            return "the quantized triton kernels take dithered 4-bit state"
        return None
    if param_dtype not in STATE_DTYPES:
        return f"the triton kernels take {sorted(map(str, STATE_DTYPES))} parameters, not {param_dtype}"
    if fmt not in STATE_DTYPES[param_dtype]:
        allowed = sorted(map(str, STATE_DTYPES[param_dtype]))
        return f"the triton kernels keep the state of {param_dtype} parameters in {allowed}, not {fmt}"
    return None


def _np_hash32(x: np.ndarray) -> np.ndarray:
    """:func:`_hash32` on uint64 arrays holding 32-bit values."""
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x7FEB352D)) & np.uint64(_M32)
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x846CA68B)) & np.uint64(_M32)
    return x ^ (x >> np.uint64(16))


def _salt_hashes(salts: Sequence[int] | np.ndarray | None, n: int) -> np.ndarray:
    """Each tensor's salt, hashed: the part of the numba kernels' ``_tensor_seed`` that
    does not change from step to step (:func:`_stream` adds the step's seed)."""
    salt = np.arange(n, dtype=np.uint64) if salts is None else np.asarray(salts, dtype=np.int64).astype(np.uint64)
    return _np_hash32(salt & np.uint64(_M32)).astype(np.int64)


def _items(counts: np.ndarray, per_item: int) -> np.ndarray:
    """int64 [items, 2]: (tensor, first unit) covering ``counts[t]`` units per tensor in
    runs of ``per_item``."""
    pieces = (counts + per_item - 1) // per_item
    tensor = np.repeat(np.arange(counts.size, dtype=np.int64), pieces)
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)
    return np.stack([tensor, (np.arange(tensor.size, dtype=np.int64) - first) * per_item], axis=1)


def host_consts(consts: RuleConsts) -> np.ndarray:
    """The rule's constants as the kernels' float64 table (``_LOW``...; cast to the work
    dtype in the kernel: the numba kernels' values to the bit)."""
    return np.array([float(x) for x in consts], dtype=np.float64)


def device_tables(
    steps: Tensor, step_size: Tensor, inv: Tensor, consts: RuleConsts, decay: Tensor | None
) -> tuple[Tensor, Tensor]:
    """A capturable step's (per-tensor scalars, constants) on the device, from step
    counts and scalars computed there (float64 [n]): the per-tensor table of
    :func:`host_scalars`' layout, the dither phases of the step before and this one
    from ``steps``; the constants kept by value (inside a CUDA graph capture nothing can
    be copied from the host), with ``decay`` computed on the device from a tensor lr."""
    dither = torch.stack([steps - 1, steps]).to(torch.int64) * DITHER_STEP % 2**32
    scal = torch.stack([step_size, inv, dither[0].double(), dither[1].double(), torch.zeros_like(inv)], dim=1)
    scal = scal.contiguous()
    host = host_consts(consts)
    table = _device_tables(host.view(np.int64), steps.device, capturable=True).view(torch.float64)
    if decay is not None:
        table = torch.cat([table[:_DECAY], decay.reshape(1).to(torch.float64), table[_DECAY + 1 :]])
    return scal, table


def host_scalars(s: StepScalars, n: int) -> np.ndarray:
    """float64 [n, SCALARS]: one step's scalars for every tensor."""
    step = int(s.step)
    out = np.empty((n, SCALARS), dtype=np.float64)
    first = s.first_index
    out[:] = (s.step_size, s.inv_bc2_sqrt, dither_phase(step - 1, first), dither_phase(step, first), s.grad_step)
    return out


#: Address and work tables already on the GPU, by their contents: the same tensors
#: step after step cost no host-to-device copy, and a step captured in a CUDA graph
#: (which cannot copy from pageable memory) finds the tables its warm-up step made.
#: The address table holds nothing that changes from step to step (stochastic
#: rounding's seed travels with the constants), and the work items are kept by the
#: tensors' sizes alone: gradients at new addresses cost one small copy.
_TABLES: dict[tuple[Any, ...], Tensor] = {}
_TABLES_KEPT = 64
#: Tables a CUDA graph was captured with: its replays read them, so they are never
#: evicted (evicted, their memory could be reused while the graph still points at it).
_CAPTURED: dict[tuple[Any, ...], Tensor] = {}


def _device_tables(
    host: np.ndarray,
    device: torch.device,
    build: Callable[[], np.ndarray] | None = None,
    kind: Any = None,
    capturable: bool = False,
) -> Tensor:
    """``host`` on ``device``, from the cache; or, with ``build``, what it builds from
    ``host`` (only when ``(kind, host)`` is not in the cache: a launch's work items
    follow from its tensors' sizes, and hashing them instead cost ~1 ms a step for
    GPT-2's 120,000 items). ``capturable``: for a capturable step, the only kind that
    may run inside a CUDA graph capture (``step()`` refuses the others), so the only
    one that asks the GPU whether a capture is under way."""
    key = (device, kind, host.tobytes())
    found = _CAPTURED.get(key)
    if found is not None:
        return found
    found = _TABLES.get(key)
    capturing = capturable and device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if found is None:
        if capturing:
            raise RuntimeError(
                "adamkit: a step is being captured in a CUDA graph with tensors it has not seen; "
                "run one step of the same optimizer on the same tensors before capturing (a warm-up step)"
            )
        if len(_TABLES) >= _TABLES_KEPT:
            _TABLES.pop(next(iter(_TABLES)))
        found = _TABLES[key] = _to_device(host if build is None else build(), device)
    elif capturing:
        _CAPTURED[key] = _TABLES.pop(key)
    return found


def _to_device(host: np.ndarray, device: torch.device) -> Tensor:
    """``host`` copied to ``device`` without waiting for the GPU: through pinned memory
    (a copy from pageable memory first waits for the stream's earlier work, a host sync
    every step). torch's caching host allocator keeps the pinned buffer until the copy
    is done."""
    if device.type != "cuda":
        return torch.from_numpy(host.copy()).to(device)
    pinned = torch.empty(host.shape, dtype=torch.from_numpy(host[:0]).dtype, pin_memory=True)
    pinned.numpy()[...] = host
    return pinned.to(device, non_blocking=True)


@functools.cache
def _books(names: tuple[str, ...], bits: int, device: torch.device) -> Tensor:
    """The codebooks' tables the quantized kernel reads, BOOK floats per state."""
    out = np.zeros((3, _BOOK), dtype=np.float32)
    for k, name in enumerate(names):
        if bits == 8:
            packed, _, values = encoder_table(name)
            out[k, :256] = values
            out[k, 256 : 256 + packed.size] = _carry_table(packed).view(np.float32)
        else:  # values, rate, offset, up, down; cells' thresholds and firsts; cell scale and offset
            tab = dither_tables(name)
            for r, values in enumerate((tab.values, tab.rate, tab.offset, tab.up, tab.down)):
                out[k, 16 * r : 16 * r + 16] = values
            out[k, 80:112], out[k, 112:144] = tab.threshold, tab.first.astype(np.int32).view(np.float32)
            out[k, 144:146] = tab.cell_scale, tab.cell_offset
    return torch.from_numpy(out.reshape(-1)).to(device)


def _amp(device: torch.device, amp: tuple[Tensor | None, Tensor | None] | None) -> Tensor | None:
    """float32 [2] on the device: the AMP grad scale (1 if none) and found_inf (0 if none)."""
    if amp is None or (amp[0] is None and amp[1] is None):
        return None
    scale, found = amp
    one = torch.ones((), dtype=torch.float32, device=device)
    parts = [  # the scaler's tensors may be another device's (it keeps one per device)
        one if scale is None else scale.reshape(()).to(device, torch.float32),
        0 * one if found is None else found.reshape(()).to(device, torch.float32),
    ]
    return torch.stack(parts)


def _device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """``device`` made the current CUDA device for the launches: Triton launches on the
    current device's current stream, whatever device the tensors are on (torch's own
    ops take it from their tensors), so parameters on ``cuda:1`` while ``cuda:0`` is
    current would otherwise be stepped by a kernel on the wrong GPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _maxnreg() -> dict[str, int]:
    """The quantized kernel's register cap as a launch option (none if unset)."""
    return {} if QUANT_MAXNREG is None else {"maxnreg": QUANT_MAXNREG}


def _launch(
    columns: list[list[Tensor]], scalars: tuple[Tensor, Tensor] | tuple[np.ndarray, np.ndarray], **kw: Any
) -> int | Tensor:
    """Launch one kernel over every tensor of ``columns`` (param, grad, then the state
    columns); keywords and result: :func:`_launch_addresses`'s."""
    params = columns[0]
    if not params:
        return 0
    if params[0].is_complex():
        columns = [[torch.view_as_real(t) for t in col] for col in columns]
        params = columns[0]
    n = len(params)
    ptrs = np.array([[t.data_ptr() for t in col] for col in columns], dtype=np.int64).T.reshape(n, len(columns))
    numels = np.fromiter((p.numel() for p in params), dtype=np.int64, count=n)
    state = columns[2][0].dtype if kw["fmt"] is None else None
    return _launch_addresses(ptrs, numels, params[0].dtype, state, params[0].device, scalars, **kw)


def _launch_addresses(
    ptrs: np.ndarray,
    numels: np.ndarray,
    pdtype: torch.dtype,
    sdtype: torch.dtype | None,
    device: torch.device,
    scalars: tuple[Tensor, Tensor] | tuple[np.ndarray, np.ndarray],
    *,
    rule: str,
    fmt: QuantFormat | None,
    books: tuple[str, ...],
    amsgrad: bool,
    mask_nonfinite: bool,
    sr_seed: int | None,
    salts: Sequence[int] | np.ndarray | None,
    amp: tuple[Tensor | None, Tensor | None] | None,
    count: Tensor | None = None,
) -> int | Tensor:
    """Launch one kernel over tensors given by address (``ptrs`` [n, columns]: param,
    grad, then the state columns; ``numels``: elements each, 0 to leave one out) with
    ``scalars``, (per-tensor [n, SCALARS], constants), on the host (copied over) or
    already on the device (a capturable step). The masked count: an int on the CPU,
    else a device tensor; 0 when the caller's ``count`` was added to."""
    n = ptrs.shape[0]
    meta = np.zeros((n, _COLS), dtype=np.int64)
    meta[:, 0] = numels
    if sr_seed is not None:
        meta[:, 1] = _salt_hashes(salts, n)
    meta[:, 2 : 2 + ptrs.shape[1]] = ptrs
    if fmt is None:
        units, per_item = numels, BLOCK
    else:  # one absmax per tensor: rows of a block's length (two passes, see _quant_body)
        block = int(fmt.block_size or DEFAULT_ROW[fmt.bits])
        width = triton.next_power_of_2(block)
        rows = max(1, QUANT_TILE // width)
        units, per_item = -(-numels // block), rows * QUANT_TILES
    if not units.any():
        return 0
    with _device_guard(device):  # Triton launches on the current device's stream
        scal, consts = scalars
        on_device = not isinstance(scal, np.ndarray)  # a capturable step's scalars
        meta_d = _device_tables(meta.reshape(-1), device, capturable=on_device)
        items_d = _device_tables(
            units, device, lambda: _items(units, per_item).reshape(-1), ("items", per_item), capturable=on_device
        )
        n_items = items_d.shape[0] // 2
        if not on_device:
            seed = [] if sr_seed is None else [float(sr_seed & _M32)]
            buf = _to_device(np.concatenate([scal.reshape(-1), consts, seed]), device)
            scal, consts = buf[: scal.size], buf[scal.size :]
        elif sr_seed is not None:
            raise ValueError("stochastic rounding takes the host's step scalars (capturable steps reject it)")
        kept = count is not None  # the caller's counter: it reads it when it wants to
        if count is None:
            count = torch.zeros(1, dtype=torch.int32, device=device)
        amp_d = _amp(device, amp)
        scaled = amp_d is not None
        flags = dict(RULE=rule, AMSGRAD=amsgrad, MASK=mask_nonfinite, SR=sr_seed is not None, SCALED=scaled)
        grid = (n_items,)
        if fmt is None:
            assert sdtype is not None
            _dense_kernel[grid](
                meta_d, items_d, scal, consts, count, amp_d if scaled else count,
                P=_TL[pdtype], S=_TL[sdtype], W=_TL[torch.float64 if pdtype == torch.float64 else torch.float32],
                FTZ=sdtype == torch.bfloat16, BLOCK=BLOCK, ALIGNED=bool((ptrs % 16 == 0).all()), enable_fp_fusion=False,
                num_warps=DENSE_WARPS, **flags,
            )  # fmt: skip
        else:
            from ...quant import codebook

            root = codebook(books[1]).root
            tabs = _books(books + (books[-1],) * (3 - len(books)), fmt.bits, device)
            accessed = ptrs[:, [0, 1, *range(2, ptrs.shape[1], 2)]]  # param, grad, codes (not absmax)
            aligned = width == block and block % 32 == 0 and bool((accessed % 16 == 0).all())
            passes = (0,) if fmt.block_size else (1, 2)
            tops = count if fmt.block_size else torch.zeros((n, 6), dtype=torch.int32, device=device)
            for step_pass in passes:
                _quant_kernel[grid](
                    meta_d, items_d, scal, consts, tabs, count, amp_d if scaled else count, block, tops,
                    P=_TL[pdtype], BITS=fmt.bits, ROOT=root, ROWS=rows, E=width, TILES=QUANT_TILES, ALIGNED=aligned,
                    PASS=step_pass, enable_fp_fusion=False, num_warps=QUANT_WARPS, **_maxnreg(), **flags,
                )  # fmt: skip
        if not mask_nonfinite or kept:
            return 0
        return int(count.item()) if device.type == "cpu" else count[0]


def _tables_step(
    rule: str,
    amsgrad: bool,
    tab: Tables,
    s: StepScalars | tuple[Tensor, Tensor],
    *,
    maximize: bool,
    mask_nonfinite: bool,
    sr_seed: int | None,
    amp: tuple[Tensor | None, Tensor | None] | None = None,
    count: Tensor | None = None,
) -> int | Tensor:
    """A step over a cached plan's address tables (:class:`adamkit.kernels.cpu.dense.Tables`;
    quantized state when ``tab.state_dtype`` is a :class:`QuantFormat`): tensors without
    a chunk in ``tab.chunks`` are left out. ``s``: the host's step scalars (per-tensor
    values from ``tab.scal`` and ``tab.steps``), or a capturable step's (per-tensor
    scalars, constants) on the device (:func:`host_scalars`' and :func:`host_consts`'
    layouts); ``amp`` and ``count`` as for :func:`adam_`."""
    n = tab.ptrs.shape[0]
    if tab.chunks.shape[0] == 0:
        return 0
    assert tab.device is not None, "a plan's tables name their device"
    numels = np.zeros(n, dtype=np.int64)
    np.maximum.at(numels, tab.chunks[:, 0], tab.chunks[:, 2])
    fmt = tab.state_dtype if isinstance(tab.state_dtype, QuantFormat) else None
    names = () if fmt is None else tuple(fmt.codebook(k).name for k in ALGORITHMS[rule].state_keys(amsgrad))
    if isinstance(s, StepScalars):
        scal = np.zeros((n, SCALARS), dtype=np.float64)
        scal[:, :2] = tab.scal[:, :2]
        if tab.scal.shape[1] > 2:  # grad_step (NAdam's ``tensor_scalars``)
            scal[:, 4] = tab.scal[:, 2]
        if fmt is not None:
            assert tab.steps is not None, "quantized plans name each tensor's step"
            steps = tab.steps.astype(np.int64)
            scal[:, 2] = ((steps - 1) * DITHER_STEP) & _M32
            scal[:, 3] = (steps * DITHER_STEP) & _M32
        work = np.float64 if tab.param_dtype == torch.float64 else np.float32
        scalars: tuple = (scal, host_consts(rule_consts(s, maximize, work)))
    else:
        scalars = s
    return _launch_addresses(
        tab.ptrs, numels, tab.param_dtype, None if fmt else tab.state_dtype, tab.device, scalars, rule=rule,
        fmt=fmt, books=names, amsgrad=amsgrad, mask_nonfinite=mask_nonfinite, sr_seed=sr_seed, salts=tab.salts,
        amp=amp, count=count,
    )  # fmt: skip


def adam_tables_(tab: Tables, s: StepScalars | tuple[Tensor, Tensor], *, amsgrad: bool, **kw: Any) -> int | Tensor:
    """Fused Adam/AdamW over a cached plan's tables (keywords: :func:`_tables_step`'s);
    the masked count."""
    return _tables_step("adam", amsgrad, tab, s, **kw)


def adamax_tables_(
    tab: Tables, s: StepScalars | tuple[Tensor, Tensor], *, amsgrad: bool = False, **kw: Any
) -> int | Tensor:
    """Fused Adamax over a cached plan's tables (keywords: :func:`_tables_step`'s); the
    masked count."""
    if amsgrad:
        raise ValueError("Adamax has no AMSGrad variant")
    return _tables_step("adamax", False, tab, s, **kw)


def nadam_tables_(
    tab: Tables, s: StepScalars | tuple[Tensor, Tensor], *, amsgrad: bool = False, **kw: Any
) -> int | Tensor:
    """Fused NAdam over a cached plan's tables (keywords: :func:`_tables_step`'s); the
    masked count."""
    if amsgrad:
        raise ValueError("NAdam has no AMSGrad variant")
    return _tables_step("nadam", False, tab, s, **kw)


def _step(
    rule: str,
    amsgrad: bool,
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: Mapping[str, Sequence[Tensor]],
    s: StepScalars | tuple[Tensor, Tensor],
    fmt: QuantFormat | None,
    maximize: bool,
    mask_nonfinite: bool,
    sr_seed: int | None,
    salts: Sequence[int] | None,
    amp: tuple[Tensor | None, Tensor | None] | None,
    count: Tensor | None,
) -> int | Tensor:
    keys = ALGORITHMS[rule].state_keys(amsgrad)
    if fmt is None:
        columns = [list(params), list(grads)] + [list(state[k]) for k in keys]
        names: tuple[str, ...] = ()
    else:
        columns = [list(params), list(grads)] + [
            list(state[f"{k}_{part}"]) for k in keys for part in ("codes", "absmax")
        ]
        names = tuple(fmt.codebook(k).name for k in keys)
    if isinstance(s, StepScalars):
        work = np.float64 if params and params[0].dtype in (torch.float64, torch.complex128) else np.float32
        scalars: tuple = (
            host_scalars(s, len(params)),
            host_consts(rule_consts(s, maximize, work)),
        )
    else:
        scalars = s
    return _launch(
        columns, scalars, rule=rule, fmt=fmt, books=names, amsgrad=amsgrad, mask_nonfinite=mask_nonfinite,
        sr_seed=sr_seed, salts=salts, amp=amp, count=count,
    )  # fmt: skip


_BITS = (32, 16, *QUANT_BITS)


@register(
    "adam",
    backend="triton",
    device_types=DEVICES,
    explicit_device_types=EXPLICIT_DEVICES,
    state_bits=_BITS,
    unsupported=unsupported,
    tables=adam_tables_,
    amp_scale=True,
    device_tables=device_tables,
)
def adam_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: Mapping[str, Sequence[Tensor]],
    s: StepScalars | tuple[Tensor, Tensor],
    *,
    fmt: QuantFormat | None = None,
    amsgrad: bool,
    maximize: bool,
    mask_nonfinite: bool,
    sr_seed: int | None = None,
    salts: Sequence[int] | None = None,
    amp: tuple[Tensor | None, Tensor | None] | None = None,
    count: Tensor | None = None,
) -> int | Tensor:
    """Fused Adam/AdamW over one bucket, dense or quantized state (see :func:`unsupported`).

    ``s``: the host's step scalars, or (per-tensor scalars, constants) on the device
    (:func:`host_scalars`' and :func:`host_consts`' layouts: a capturable step);
    ``amp``: GradScaler's (grad_scale, found_inf); ``count``: a device counter to add
    masked elements to."""
    return _step("adam", amsgrad, params, grads, state, s, fmt, maximize, mask_nonfinite, sr_seed, salts, amp, count)


@register(
    "adamax",
    backend="triton",
    device_types=DEVICES,
    explicit_device_types=EXPLICIT_DEVICES,
    state_bits=_BITS,
    unsupported=unsupported,
    tables=adamax_tables_,
    amp_scale=True,
    device_tables=device_tables,
)
def adamax_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: Mapping[str, Sequence[Tensor]],
    s: StepScalars | tuple[Tensor, Tensor],
    *,
    fmt: QuantFormat | None = None,
    amsgrad: bool = False,
    maximize: bool,
    mask_nonfinite: bool,
    sr_seed: int | None = None,
    salts: Sequence[int] | None = None,
    amp: tuple[Tensor | None, Tensor | None] | None = None,
    count: Tensor | None = None,
) -> int | Tensor:
    """Fused Adamax over one bucket, dense or quantized state (arguments: :func:`adam_`)."""
    if amsgrad:
        raise ValueError("Adamax has no AMSGrad variant")
    return _step("adamax", False, params, grads, state, s, fmt, maximize, mask_nonfinite, sr_seed, salts, amp, count)


@register(
    "nadam",
    backend="triton",
    device_types=DEVICES,
    explicit_device_types=EXPLICIT_DEVICES,
    state_bits=_BITS,
    unsupported=unsupported,
    tables=nadam_tables_,
    amp_scale=True,
)
def nadam_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: Mapping[str, Sequence[Tensor]],
    s: StepScalars | tuple[Tensor, Tensor],
    *,
    fmt: QuantFormat | None = None,
    amsgrad: bool = False,
    maximize: bool,
    mask_nonfinite: bool,
    sr_seed: int | None = None,
    salts: Sequence[int] | None = None,
    amp: tuple[Tensor | None, Tensor | None] | None = None,
    count: Tensor | None = None,
) -> int | Tensor:
    """Fused NAdam over one bucket, dense or quantized state (arguments: :func:`adam_`)."""
    if amsgrad:
        raise ValueError("NAdam has no AMSGrad variant")
    return _step("nadam", False, params, grads, state, s, fmt, maximize, mask_nonfinite, sr_seed, salts, amp, count)
