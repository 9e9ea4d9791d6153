"""Fused CPU kernels in Numba: one pass over memory, all cores, many tensors per call.

One call covers every tensor of a bucket: a table of raw addresses (one row per
tensor) and a table of chunks (tensor, start, stop) over which a ``prange`` loop runs,
so a bucket of 20,000 small tensors costs one call, and one 16M tensor is split
across all threads. Per element the kernel reads param, grad and the moments once
and writes them once (28 bytes for fp32 Adam), with no temporaries.

The rule per element is written once per algorithm (``_adam_elements``,
``_adamax_elements``), inlined into its kernel, and computes exactly
:mod:`adamkit.kernels.reference`: torch's ``lerp`` formula for the first moment,
``sqrt(v)·inv_bc2_sqrt + ε``, NaN-propagating maxima. With ``mask`` an element whose
gradient is NaN/±inf is written back unchanged (a select, so the loop stays
vectorized) and counted.

No fastmath: it would let LLVM reassociate and drop NaN checks, and the loop is
memory-bound anyway (measured: the same speed with and without on this machine).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numba
import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import intrinsic
from torch import Tensor

from .._scalars import StepScalars
from .registry import register

#: Elements per parallel work item: large enough to amortize the loop overhead,
#: small enough that a 16M tensor gives every thread many items.
CHUNK = 1 << 15
#: Parameter dtypes the kernels take; their state must have the same dtype.
DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


@intrinsic
def _view(typingctx, addr, like):  # noqa: ARG001
    """A raw address as a pointer to ``like``'s dtype (numba has no int-to-pointer)."""
    ptr = types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr))

    return ptr(types.int64, like), codegen


@njit(inline="always")
def _lerp(m, g, w):
    # torch's lerp: exact at both ends, the form chosen by the weight
    # both forms, then a select: a branch here stopped vectorization (15% slower)
    d = g - m
    low, high = m + w * d, g - d * (1 - w)
    return low if w < 0.5 else high


@njit(inline="always")
def _nan_max(a, b):
    # torch.maximum: NaN wins
    return a if (a > b or a != a) else b


@njit(inline="always")
def _adam_rule(g, p, m, v, x, b1w, b2, b2w, eps, lr_t, inv, decay, l2, amsgrad, maximize, mask):
    """One element of Adam/AdamW: new (p, m, v, v_max) and 1 if masked, else 0."""
    g = -g if maximize else g
    ok = (not mask) or (g - g == 0)  # False for NaN and ±inf
    g = g + l2 * p
    m1 = _lerp(m, g, b1w)
    v1 = b2 * v + b2w * g * g
    x1 = _nan_max(x, v1) if amsgrad else v1
    p1 = p * decay - lr_t * (m1 / (np.sqrt(x1) * inv + eps))
    # selects, not branches: the loop stays branch-free and vectorizes
    return (p1 if ok else p), (m1 if ok else m), (v1 if ok else v), (x1 if ok else x), (not ok)


# Two loops, so that without AMSGrad no fifth array is touched: a store to it, even
# behind a branch that is never taken, stops LLVM vectorizing (measured 3.5x slower).
# Both load every operand before storing (the right-hand side is evaluated first).
@njit(inline="always")
def _adam_loop(p, g, m, v, b1w, b2, b2w, eps, lr_t, inv, decay, l2, maximize, mask):
    bad = 0
    for i in range(p.shape[0]):
        p[i], m[i], v[i], _, b = _adam_rule(
            g[i], p[i], m[i], v[i], v[i], b1w, b2, b2w, eps, lr_t, inv, decay, l2, False, maximize, mask
        )
        bad += b
    return bad


@njit(inline="always")
def _amsgrad_loop(p, g, m, v, x, b1w, b2, b2w, eps, lr_t, inv, decay, l2, maximize, mask):
    bad = 0
    for i in range(p.shape[0]):
        p[i], m[i], v[i], x[i], b = _adam_rule(
            g[i], p[i], m[i], v[i], x[i], b1w, b2, b2w, eps, lr_t, inv, decay, l2, True, maximize, mask
        )
        bad += b
    return bad


@njit(inline="always")
def _chunk(ptrs, chunks, c, col, like):
    """Column ``col`` of chunk ``c`` as an array: a view of just the chunk's elements.

    Loops over such views from 0 vectorize; loops from ``lo`` to ``hi`` over the whole
    tensor did not (measured 2x slower).
    """
    t, lo, hi = chunks[c, 0], chunks[c, 1], chunks[c, 2]
    return numba.carray(_view(ptrs[t, col] + lo * like.itemsize, like), hi - lo)


@njit(parallel=True, cache=True)
def _adam_kernel(ptrs, chunks, like, b1w, b2, b2w, eps, lr_t, inv, decay, l2, amsgrad, maximize, mask):
    """ptrs: int64 [n_tensors, 5] (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq)."""
    bad = np.zeros(chunks.shape[0], np.int64)
    for c in prange(chunks.shape[0]):
        p, g = _chunk(ptrs, chunks, c, 0, like), _chunk(ptrs, chunks, c, 1, like)
        m, v = _chunk(ptrs, chunks, c, 2, like), _chunk(ptrs, chunks, c, 3, like)
        if amsgrad:
            x = _chunk(ptrs, chunks, c, 4, like)
            bad[c] = _amsgrad_loop(p, g, m, v, x, b1w, b2, b2w, eps, lr_t, inv, decay, l2, maximize, mask)
        else:
            bad[c] = _adam_loop(p, g, m, v, b1w, b2, b2w, eps, lr_t, inv, decay, l2, maximize, mask)
    return bad.sum()


@njit(inline="always")
def _adamax_rule(g, p, m, u, b1w, b2, eps, lr_t, l2, maximize, mask):
    """One element of Adamax: new (p, m, u) and 1 if masked, else 0."""
    g = -g if maximize else g
    ok = (not mask) or (g - g == 0)
    g = g + l2 * p
    m1 = _lerp(m, g, b1w)
    u1 = _nan_max(b2 * u, np.abs(g) + eps)
    p1 = p - lr_t * (m1 / u1)
    return (p1 if ok else p), (m1 if ok else m), (u1 if ok else u), (not ok)


@njit(parallel=True, cache=True)
def _adamax_kernel(ptrs, chunks, like, b1w, b2, eps, lr_t, l2, maximize, mask):
    """ptrs: int64 [n_tensors, 4] (param, grad, exp_avg, exp_inf)."""
    bad = np.zeros(chunks.shape[0], np.int64)
    for c in prange(chunks.shape[0]):
        p, g = _chunk(ptrs, chunks, c, 0, like), _chunk(ptrs, chunks, c, 1, like)
        m, u = _chunk(ptrs, chunks, c, 2, like), _chunk(ptrs, chunks, c, 3, like)
        n_bad = 0
        for i in range(p.shape[0]):
            p[i], m[i], u[i], b = _adamax_rule(g[i], p[i], m[i], u[i], b1w, b2, eps, lr_t, l2, maximize, mask)
            n_bad += b
        bad[c] = n_bad
    return bad.sum()


def unsupported(param_dtype: torch.dtype, state_dtype: torch.dtype, contiguous: bool) -> str | None:
    """Why these kernels cannot take such a tensor, or None if they can."""
    if param_dtype not in DTYPES:
        return f"the numba kernels take {sorted(map(str, DTYPES))} parameters, not {param_dtype}"
    if state_dtype != param_dtype:
        return f"the numba kernels keep state in the parameter's dtype, not {state_dtype}"
    if not contiguous:
        return "the numba kernels need contiguous parameters, gradients and state"
    return None


def _tables(columns: Sequence[Sequence[Tensor]]) -> tuple[np.ndarray, np.ndarray]:
    """Address table [n_tensors, len(columns)] and chunk table [n_chunks, 3]."""
    ptrs = np.array([[t.data_ptr() for t in row] for row in zip(*columns)], dtype=np.int64)
    sizes = [t.numel() for t in columns[0]]
    chunks = [(i, lo, min(lo + CHUNK, n)) for i, n in enumerate(sizes) for lo in range(0, n, CHUNK)]
    return ptrs.reshape(len(sizes), len(columns)), np.array(chunks, dtype=np.int64).reshape(-1, 3)


def _threads() -> None:
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


@register("adam", backend="numba", device_types=("cpu",), unsupported=unsupported)
def adam_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: Mapping[str, Sequence[Tensor]],
    s: StepScalars,
    *,
    amsgrad: bool,
    maximize: bool,
    mask_nonfinite: bool,
) -> int:
    """Fused Adam/AdamW over one bucket (contiguous fp32/fp64, state in the same dtype)."""
    if not params:
        return 0
    vmax = state["max_exp_avg_sq"] if amsgrad else state["exp_avg_sq"]
    ptrs, chunks = _tables([params, grads, state["exp_avg"], state["exp_avg_sq"], vmax])
    f = DTYPES[params[0].dtype]
    _threads()
    return int(
        _adam_kernel(
            ptrs, chunks, np.empty(0, f), f(1 - s.beta1), f(s.beta2), f(1 - s.beta2), f(s.eps),
            f(s.step_size), f(s.inv_bc2_sqrt), f(s.decay), f(s.l2), amsgrad, maximize, mask_nonfinite,
        )
    )  # fmt: skip


@register("adamax", backend="numba", device_types=("cpu",), unsupported=unsupported)
def adamax_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state: Mapping[str, Sequence[Tensor]],
    s: StepScalars,
    *,
    amsgrad: bool = False,
    maximize: bool,
    mask_nonfinite: bool,
) -> int:
    """Fused Adamax over one bucket (contiguous fp32/fp64, state in the same dtype)."""
    if amsgrad:
        raise ValueError("Adamax has no AMSGrad variant")
    if not params:
        return 0
    ptrs, chunks = _tables([params, grads, state["exp_avg"], state["exp_inf"]])
    f = DTYPES[params[0].dtype]
    _threads()
    return int(
        _adamax_kernel(
            ptrs, chunks, np.empty(0, f), f(1 - s.beta1), f(s.beta2), f(s.eps), f(s.step_size), f(s.l2),
            maximize, mask_nonfinite,
        )
    )  # fmt: skip
