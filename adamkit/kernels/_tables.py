"""Address tables: where one kernel call's tensors are, and how the work is cut.

Shared by the optimizers' cached plans and every pointer-based backend (the Numba
kernels on the CPU, the Triton kernels on CUDA): a table row per tensor (its
parameter, gradient and state addresses), the tensors cut into chunks, the chunks
grouped into work units that threads claim.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .._scalars import StepScalars
from ._checks import check_table

#: Elements per parallel work item: large enough to amortize the loop overhead,
#: small enough that a 16M tensor gives every thread many items and a chunk's
#: gradient stays in L2 between the non-finite scan and the update.
CHUNK = 1 << 15
#: Threads claim work in units of about UNIT elements (whole chunks) from a shared
#: counter, so they finish together: split in halves up front, the thread pool's
#: thread started ~0.1 ms late and the caller waited ~0.5 ms for it (16M elements).
#: Units of 4 chunks beat 1 and 16 (16M elements: fp32 1.02-1.03x -> 1.06-1.07x torch
#: fused, bf16 params 0.97x -> 0.99-1.01x): each thread streams longer runs.
UNIT = 4 * CHUNK


@dataclass
class Tables:
    """Everything that locates one call's tensors: see :func:`_adam_kernel`.

    ``ptrs`` columns: param, grad, then the state tensors in the algorithm's order.
    ``scal`` is float64 [n_tensors, 2]: (step_size, inv_bc2_sqrt) per tensor.
    """

    ptrs: np.ndarray
    chunks: np.ndarray
    scal: np.ndarray
    salts: np.ndarray
    param_dtype: torch.dtype
    state_dtype: torch.dtype
    #: the work units (see :func:`unit_table`), or None to cut them at launch;
    #: callers whose chunk table does not change between steps keep them
    units: np.ndarray | None = None
    #: the tensors' device (the Triton kernels' plans; these kernels take CPU tensors)
    device: torch.device | None = None
    #: each tensor's step count (the Triton kernels' quantized plans: dithered codes)
    steps: np.ndarray | None = None


def chunk_table(numels: Sequence[int] | np.ndarray) -> np.ndarray:
    """int64 [n_chunks, 3]: (tensor, start, stop) covering every tensor in CHUNK pieces."""
    numels = np.asarray(numels, dtype=np.int64).reshape(-1)
    pieces = (numels + CHUNK - 1) // CHUNK
    tensor = np.repeat(np.arange(numels.size, dtype=np.int64), pieces)
    first = np.repeat(np.cumsum(pieces) - pieces, pieces)
    start = (np.arange(tensor.size, dtype=np.int64) - first) * CHUNK
    stop = np.minimum(start + CHUNK, numels[tensor])
    return np.stack([tensor, start, stop], axis=1)


def unit_table(chunks: np.ndarray) -> np.ndarray:
    """int64 [n_units + 1]: chunk bounds of work units of about UNIT elements each
    (runs of whole chunks; a chunk is never split)."""
    n = chunks.shape[0]
    done = np.cumsum(chunks[:, 2] - chunks[:, 1])
    if n == 0 or done[-1] <= UNIT:
        return np.array([0, n] if n else [0], dtype=np.int64)
    # a unit ends after the chunk that reaches each multiple of UNIT (chunks hold at
    # most UNIT elements, so no two multiples fall in one chunk)
    ends = np.searchsorted(done, np.arange(UNIT, done[-1], UNIT), side="left") + 1
    return np.concatenate([[0], ends[ends < n], [n]]).astype(np.int64)


def tables_for(
    columns: Sequence[Sequence[Tensor]], s: StepScalars, salts: Sequence[int] | None, fmt: object | None = None
) -> Tables:
    """Tables for lists of tensors (param, grad, state...; quantized state's codes and
    absmax values in turn with a quantized ``fmt``), one step's scalars for all.
    Raises ValueError for tensors the kernels cannot step (:func:`check_table`)."""
    check_table(columns, "cpu", fmt)
    ptrs = np.array([[t.data_ptr() for t in row] for row in zip(*columns)], dtype=np.int64)
    n = len(columns[0])
    scal = np.empty((n, 3))
    scal[:] = (s.step_size, s.inv_bc2_sqrt, s.grad_step)
    salt = np.arange(n, dtype=np.int64) if salts is None else np.asarray(salts, dtype=np.int64)
    return Tables(
        ptrs.reshape(n, len(columns)),
        chunk_table([t.numel() for t in columns[0]]),
        scal,
        salt,
        columns[0][0].dtype,
        columns[2][0].dtype,
    )
