"""Allocating the optimizer's state: large flat buffers on transparent huge pages.

An Adam step streams every byte of its state through the CPU once, and on 4 KiB
pages it pays a TLB miss every 4 KiB of every stream while the hardware prefetchers
stop at each page boundary. Measured here (16M fp32 elements, 2 threads), with the
moments on 2 MiB pages the fused step took 12.1 -> 11.4 ms, and 10.6 ms once the
parameter and gradient were too (torch allocates those; see the README).

torch's CPU allocator does not ask for huge pages unless ``THP_MEM_ALLOC_ENABLE=1``
is set when the process starts; numpy does for arrays of 4 MiB and more. We ask
for the state we allocate ourselves: :func:`zeros` reserves the memory untouched
(``torch.empty``), advises the kernel (``madvise(MADV_HUGEPAGE)``) on the 2 MiB-aligned
part of it, then writes the zeros, so the first touch takes huge pages where the
system allows (``/sys/kernel/mm/transparent_hugepage/enabled`` ``always`` or
``madvise``). Elsewhere, or with ``ADAMKIT_HUGE_PAGES=0``, it is ``torch.zeros``.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch
from torch import Tensor

#: Linux's MADV_HUGEPAGE, and the huge page size on x86-64 and most arm64 kernels.
MADV_HUGEPAGE = 14
HUGE_PAGE = 2 << 20
#: Buffers smaller than this stay on ordinary pages (at most one huge page would fit).
MIN_BYTES = 2 * HUGE_PAGE


def _load_madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux") or os.environ.get("ADAMKIT_HUGE_PAGES", "1") == "0":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise = _load_madvise()


def advise_huge_pages(t: Tensor) -> bool:
    """Ask for huge pages under a CPU tensor's storage (its 2 MiB-aligned part); whether
    the kernel accepted. Only pages touched afterwards are affected."""
    if _madvise is None or t.device.type != "cpu":
        return False
    storage = t.untyped_storage()
    if storage.nbytes() < MIN_BYTES:
        return False
    start = storage.data_ptr()
    lo = -(-start // HUGE_PAGE) * HUGE_PAGE
    hi = (start + storage.nbytes()) // HUGE_PAGE * HUGE_PAGE
    return hi > lo and _madvise(lo, hi - lo, MADV_HUGEPAGE) == 0


def zeros(numel: int, dtype: torch.dtype) -> Tensor:
    """A flat CPU tensor of zeros, on huge pages where the system allows."""
    t = torch.empty(numel, dtype=dtype)
    advise_huge_pages(t)
    return t.zero_()


def zeros_like(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``torch.zeros_like(t, dtype=dtype)`` (same layout), on huge pages where the
    system allows if on the CPU."""
    out = torch.empty_like(t, dtype=dtype, memory_format=torch.preserve_format)
    advise_huge_pages(out)
    return out.zero_()
