"""Paged optimizer state on CUDA: moments in CUDA managed (unified) memory.

As bitsandbytes' ``Paged*`` optimizers do: a paged group's large state tensors are
allocated with ``cudaMallocManaged`` and prefetched to their GPU before each step; when
the GPU's memory runs short the driver evicts their pages to the host and brings them
back on access, so state larger than the device trains instead of failing. Block
scales, small tensors and ``step`` stay ordinary device tensors.

The allocation goes through NVIDIA's ``cuda-bindings`` (``pip install
'adamkit[cuda]'``; no C++ extension): the buffer is handed to torch through
``__cuda_array_interface__``, torch keeps the owner alive as long as any tensor views
the buffer, and the owner frees it with ``cudaFree`` when it goes.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from torch import Tensor

from ._paged import MIN_PAGED_NUMEL

__all__ = ["MIN_PAGED_NUMEL", "ManagedArena", "is_managed", "runtime"]

_INSTALL = "pip install 'adamkit[cuda]' (NVIDIA's cuda-bindings; for a CUDA 12 driver: 'cuda-bindings<13')"


def runtime() -> Any:
    """NVIDIA's CUDA runtime bindings (``cuda.bindings.runtime``), or RuntimeError saying
    how to install them."""
    try:
        from cuda.bindings import runtime as rt
    except ImportError:
        try:  # cuda-python before the bindings were split out
            from cuda import cudart as rt  # type: ignore[no-redef]
        except ImportError:
            raise RuntimeError(f"paged optimizer state on CUDA needs NVIDIA's cuda-bindings: {_INSTALL}") from None
    return rt


def _check(result: Any, what: str) -> Any:
    """``result``'s values after its error code, or RuntimeError naming the call."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        name = getattr(err, "name", str(err))
        raise RuntimeError(f"paged optimizer state: {what} failed with {name} ({_INSTALL} if the driver is older)")
    return rest[0] if len(rest) == 1 else rest


class _Buffer:
    """One managed allocation, freed when torch drops its last view of it."""

    def __init__(self, rt: Any, nbytes: int, device: int) -> None:
        self.rt, self.nbytes, self.device = rt, nbytes, device
        self.ptr = int(
            _check(rt.cudaMallocManaged(nbytes, int(rt.cudaMemAttachGlobal)), f"cudaMallocManaged({nbytes})")
        )
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (self.ptr, False),
            "version": 3,
            "strides": None,
        }

    def free(self) -> None:
        ptr, self.ptr = self.ptr, 0
        if ptr:
            self.rt.cudaFree(ptr)

    def __del__(self) -> None:
        try:
            self.free()
        except Exception:  # noqa: BLE001,S110 - at interpreter exit the runtime may be gone
            pass


_lock = threading.Lock()
_live: weakref.WeakValueDictionary[int, _Buffer] = weakref.WeakValueDictionary()


def is_managed(t: Tensor) -> bool:
    """Whether ``t``'s storage is one of these managed buffers."""
    if not isinstance(t, Tensor) or t.device.type != "cuda":
        return False
    return t.untyped_storage().data_ptr() in _live


class ManagedArena:
    """Managed buffers of one optimizer's paged CUDA state (see the module docstring)."""

    def __init__(self) -> None:
        self.rt = runtime()
        self._buffers: weakref.WeakSet[_Buffer] = weakref.WeakSet()
        self._lock = threading.Lock()

    def zeros(self, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A flat tensor of ``numel`` zeros of ``dtype`` in managed memory, on ``device``."""
        device = torch.device(device)
        index = device.index if device.index is not None else torch.cuda.current_device()
        nbytes = max(1, int(numel) * dtype.itemsize)
        with torch.cuda.device(index):
            buf = _Buffer(self.rt, nbytes, index)
            try:
                raw = torch.as_tensor(buf, device=torch.device("cuda", index))
            except Exception:
                buf.free()
                raise
        with self._lock:
            self._buffers.add(buf)
        with _lock:
            _live[buf.ptr] = buf
        out = raw[: int(numel) * dtype.itemsize].view(dtype)
        out.zero_()  # managed memory is not zeroed by the driver
        return out

    def zeros_like(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        return self.zeros(t.numel(), dtype, t.device).view(t.shape)

    def adopt(self, t: Tensor) -> Tensor:
        """A copy of CUDA tensor ``t`` in managed memory (contiguous, same shape and dtype)."""
        out = self.zeros(t.numel(), t.dtype, t.device).view(t.shape)
        out.copy_(t)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of managed memory alive."""
        with self._lock:
            return sum(b.nbytes for b in self._buffers if b.ptr)

    def prefetch(self, device: torch.device | None = None) -> int:
        """Queue the prefetch of every live buffer (of ``device``, if given) to its GPU on
        that GPU's current stream; the count queued."""
        with self._lock:
            buffers = [b for b in self._buffers if b.ptr and (device is None or b.device == device.index)]
        for b in buffers:
            stream = torch.cuda.current_stream(b.device).cuda_stream
            _prefetch(self.rt, b.ptr, b.nbytes, b.device, stream)
        return len(buffers)


def _prefetch(rt: Any, ptr: int, nbytes: int, device: int, stream: int) -> None:
    """``cudaMemPrefetchAsync`` to GPU ``device``: CUDA 13's signature (a location and
    flags), else CUDA 12's (a device ordinal)."""
    if hasattr(rt, "cudaMemLocation"):
        loc = rt.cudaMemLocation()
        loc.type = rt.cudaMemLocationType.cudaMemLocationTypeDevice
        loc.id = device
        try:
            result = rt.cudaMemPrefetchAsync(ptr, nbytes, loc, 0, stream)
        except TypeError:  # CUDA 12's bindings: (ptr, count, device, stream)
            result = rt.cudaMemPrefetchAsync(ptr, nbytes, device, stream)
    else:
        result = rt.cudaMemPrefetchAsync(ptr, nbytes, device, stream)
    _check(result, "cudaMemPrefetchAsync")
