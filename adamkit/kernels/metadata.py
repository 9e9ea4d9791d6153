"""Prefetching tensor metadata: many small tensors' ``.grad`` and ``data_ptr`` at memory speed.

A step over 20,000 small parameters reads each one's ``.grad`` and ``data_ptr()``
from Python. After a step (or a backward pass) has streamed hundreds of megabytes,
the objects behind them are out of every cache, and each read is a chain of
dependent misses: the Python object, its ``TensorImpl``, the ``AutogradMeta``, the
gradient's ``TensorImpl`` and Python object, the ``StorageImpl``. The interpreter
waits for one chain at a time. Measured here on 20,000 parameters after a 560 MB
stream: ``.grad``, ids and parameter addresses took 10.1 ms, 4.2 ms when the lines
were in cache.

:func:`warm` walks the same chains for a slice of parameters in compiled code, one
level at a time across all of them, so the CPU has many misses in flight instead
of one; the Python reads that follow hit L2 (slices of 512 parameters: ~640 KB of
lines). Measured: 10.1 ms -> 6.7 ms for the three reads.

It reads raw memory, so it is careful:

* The offsets of the fields it follows are not assumed: :func:`layout` finds them
  on probe tensors at first use by matching values torch exposes (``_cdata`` is the
  ``TensorImpl`` address, ``untyped_storage()._cdata`` the ``StorageImpl``'s,
  ``id()`` the Python object's), reading through ``/proc/self/mem``, which fails
  cleanly on an unmapped address instead of crashing. Several probes must agree;
  otherwise (another platform, another torch) prefetching is off and nothing else
  changes.
* The kernel then loads only pointer fields of live objects at those offsets, and
  follows a pointer only when it is not null: a parameter's ``TensorImpl`` (the
  plan holds the parameters; it checks every parameter's first hop against
  ``_cdata`` when it is built), its ``AutogradMeta`` (owned by it) and the gradient's
  ``TensorImpl`` (owned by that). The last hops (the gradient's Python object and
  storages) are only prefetched: a prefetch never faults.
* It runs holding the GIL, so no Python code can drop a gradient while it walks.

``ADAMKIT_PREFETCH_METADATA=0`` turns it off.
"""

from __future__ import annotations

import os
import struct
from functools import cache

import numpy as np
import torch
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .numba_cpu import _prefetch

#: Parameters per slice: their metadata lines (~10 per parameter) fit in L2.
SLICE = 512
#: Groups with fewer parameters are read from Python alone: their reads cost little,
#: and the walker's compilation (~0.3 s with an empty Numba cache) is not paid.
MIN_PARAMS = 512
#: Cache lines of a TensorImpl to prefetch (its fields span ~200 bytes, unaligned).
IMPL_LINES = 4
_WORDS = 32  # words searched in each object when calibrating


@intrinsic
def _word(typingctx, addr):  # noqa: ARG001
    """The 64-bit word at a raw address."""

    def codegen(context, builder, signature, args):
        return builder.load(builder.inttoptr(args[0], ir.IntType(64).as_pointer()))

    return types.int64(types.int64), codegen


@njit(inline="always")
def _lines(addr, n):
    for k in range(n):
        _prefetch(addr + 64 * k)


#: what a walk does: the first hop only (checking the layout), find the gradients, or
#: find and prefetch them
FIRST, FIND, WARM = 0, 1, 2


@njit(cache=True)  # holds the GIL: see the module docstring
def _walk(objs, lo, hi, offs, hops, mode):
    """Walk the metadata of ``objs[lo:hi]`` (Python objects of parameters), bringing it
    into cache. ``hops[0]``: the TensorImpl addresses; ``hops[2]`` (unless ``mode`` is
    FIRST): those of the gradients (see ``Walker.grads``).

    offs: (impl in object, storage in impl, autograd meta in impl, grad in meta,
    Python object in impl); hops: int64 [3, len(objs)]; mode: FIRST, FIND or WARM
    (prefetch the gradients' metadata too).
    """
    o_impl, o_storage, o_meta, o_grad, o_pyobj = offs[0], offs[1], offs[2], offs[3], offs[4]
    for i in range(lo, hi):  # each loop's loads are independent: many misses in flight
        hops[0, i] = _word(objs[i] + o_impl)
    if mode == FIRST:
        return
    for i in range(lo, hi):
        impl = hops[0, i]
        _lines(impl, IMPL_LINES)
        _prefetch(_word(impl + o_storage))
        hops[1, i] = _word(impl + o_meta)
    for i in range(lo, hi):
        meta = hops[1, i]
        hops[2, i] = _word(meta + o_grad) if meta != 0 else 0
    if mode == WARM:
        for i in range(lo, hi):
            grad = hops[2, i]
            if grad != 0:
                _lines(grad, IMPL_LINES)
                _prefetch(_word(grad + o_storage))
                _prefetch(_word(grad + o_pyobj))


def _peek(fd: int, addr: int, n: int) -> list[int] | None:
    """``n`` words at ``addr``, or None if unreadable (read through /proc/self/mem)."""
    try:
        data = os.pread(fd, 8 * n, addr)
    except (OSError, OverflowError, ValueError):
        return None
    return list(struct.unpack(f"<{n}Q", data)) if len(data) == 8 * n else None


def _find(words: list[int] | None, value: int) -> int | None:
    return None if words is None or value not in words else 8 * words.index(value)


def _probe_offsets(fd: int, p: torch.Tensor) -> tuple[int, ...] | None:
    g = p.grad
    assert g is not None
    o_impl = _find(_peek(fd, id(p), 8), p._cdata)
    impl = _peek(fd, p._cdata, _WORDS)
    o_storage = _find(impl, p.untyped_storage()._cdata)
    o_pyobj = _find(_peek(fd, p._cdata, _WORDS), id(p))
    if None in (o_impl, o_storage, o_pyobj) or impl is None:
        return None
    for k, w in enumerate(impl):  # the autograd meta: the pointer to a struct holding the grad's impl
        if w and w % 8 == 0 and 8 * k not in (o_storage, o_pyobj):
            o_grad = _find(_peek(fd, w, _WORDS), g._cdata)
            if o_grad is not None:
                return (o_impl, o_storage, 8 * k, o_grad, o_pyobj)  # type: ignore[return-value]
    return None


@cache
def layout() -> np.ndarray | None:
    """The field offsets :func:`_warm` follows, found on probe tensors; None: off."""
    if os.environ.get("ADAMKIT_PREFETCH_METADATA", "1") == "0" or struct.calcsize("P") != 8:
        return None
    try:
        fd = os.open("/proc/self/mem", os.O_RDONLY)
    except OSError:
        return None
    try:
        found = set()
        for dtype, size in ((torch.float32, 3), (torch.bfloat16, 1000), (torch.float64, 0)):
            for make in (torch.zeros, lambda *a, **k: torch.nn.Parameter(torch.zeros(*a, **k))):
                p = make(size, dtype=dtype).requires_grad_()
                p.grad = torch.ones_like(p)
                found.add(_probe_offsets(fd, p))
    finally:
        os.close(fd)
    if len(found) != 1 or None in found:
        return None
    return np.array(found.pop(), dtype=np.int64)


class Walker:
    """Walks the metadata of a fixed list of parameters (see the module docstring)."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        offs = layout() if len(params) >= MIN_PARAMS else None
        self.params = list(params)  # the walk reads these objects: they must stay alive
        self.objs = np.fromiter(map(id, params), dtype=np.int64, count=len(params))
        self.hops = np.zeros((3, len(params)), dtype=np.int64)
        if offs is not None:  # every parameter's first hop must be its TensorImpl
            impls = np.fromiter((p._cdata for p in params), dtype=np.int64, count=len(params))
            _walk(self.objs, 0, len(params), offs, self.hops, FIRST)
            if not np.array_equal(self.hops[0], impls):
                offs = None
        self.offs = offs
        #: whether :meth:`grads` may stand in for reading ``.grad``: plain tensors only
        #: (a subclass may define ``grad`` or ``__torch_function__`` differently)
        self.finds_grads = offs is not None and all(type(p) in (torch.Tensor, torch.nn.Parameter) for p in params)

    @property
    def active(self) -> bool:
        return self.offs is not None

    def warm(self, lo: int, hi: int) -> None:
        """Prefetch parameters ``lo:hi``'s metadata and their gradients'."""
        _walk(self.objs, lo, hi, self.offs, self.hops, WARM)

    def grads(self, lo: int, hi: int) -> np.ndarray:
        """Prefetch parameters ``lo:hi``'s metadata; the TensorImpl address of each one's
        gradient (``._cdata`` of ``.grad``), a view valid until the next call. Without a
        gradient: the address of torch's undefined-tensor singleton, or 0 for a tensor
        without autograd metadata; neither is a live gradient's."""
        _walk(self.objs, lo, hi, self.offs, self.hops, FIND)
        return self.hops[2, lo:hi]
