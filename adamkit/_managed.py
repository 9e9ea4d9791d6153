"""Paged optimizer state on CUDA: moments in CUDA managed (unified) memory.

As bitsandbytes' ``Paged*`` optimizers do: a paged group's large state tensors are
allocated with ``cudaMallocManaged`` and prefetched to their GPU before the group's
step (a group at a time, so that state larger than the GPU is not all asked for at once); when
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
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ._paged import MIN_PAGED_NUMEL

__all__ = ["MIN_PAGED_NUMEL", "ManagedArena", "check_device", "is_managed", "runtime"]

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


def _attribute(rt: Any, name: str, device: int) -> int:
    """A device attribute (``cudaDevAttr...``) of GPU ``device``."""
    return int(_check(rt.cudaDeviceGetAttribute(getattr(rt.cudaDeviceAttr, name), device), f"{name} of GPU {device}"))


def check_device(device: int) -> None:
    """RuntimeError unless GPU ``device`` can allocate managed memory (cuda-bindings
    installed, a driver that supports it)."""
    rt = runtime()
    if not _attribute(rt, "cudaDevAttrManagedMemory", device):
        raise RuntimeError(f"paged optimizer state: GPU {device} cannot allocate CUDA managed memory; use paged=False")


class ManagedArena:
    """Managed buffers of one optimizer's paged CUDA state (see the module docstring)."""

    def __init__(self) -> None:
        self.rt = runtime()
        self._buffers: weakref.WeakSet[_Buffer] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._can_prefetch: dict[int, bool] = {}

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

    def prefetch(self, tensors: Iterable[Tensor] | None = None) -> int:
        """Queue the prefetch of the buffers under ``tensors`` (every live buffer if None)
        to their GPU on its current stream; the count queued. A GPU without concurrent
        managed access (Windows, WSL2, some Jetson boards) is not prefetched to: its
        driver moves the pages on access, as bitsandbytes leaves it."""
        with self._lock:
            if tensors is None:
                buffers = [b for b in self._buffers if b.ptr]
            else:
                wanted = {t.untyped_storage().data_ptr() for t in tensors if is_managed(t)}
                buffers = [b for b in self._buffers if b.ptr and b.ptr in wanted]
        count = 0
        for b in buffers:
            can = self._can_prefetch.get(b.device)
            if can is None:
                can = self._can_prefetch[b.device] = bool(
                    _attribute(self.rt, "cudaDevAttrConcurrentManagedAccess", b.device)
                )
            if can:
                stream = torch.cuda.current_stream(b.device).cuda_stream
                _prefetch(self.rt, b.ptr, b.nbytes, b.device, stream)
                count += 1
        return count


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
