"""Paged optimizer state on the CPU: moments in a memory-mapped file.

bitsandbytes' ``Paged*`` optimizers keep their moments in CUDA unified memory, which
the driver evicts to the host under memory pressure. The CPU's counterpart is a shared
file mapping: the kernel writes its pages back to the file and drops them when memory
is short, and reads them again when they are touched, so state larger than RAM pages
through the operating system instead of failing. ``RLIMIT_DATA`` and the OOM killer's
anonymous-memory accounting do not count it; the page cache holds it while memory
allows, and a step then runs at in-RAM speed.

An :class:`Arena` is one file per optimizer, in ``paged_dir`` (default: the system's
temporary directory), created and unlinked at once: it never outlives the process,
even one that crashes, and the space it takes is freed with its last mapping. Each
buffer is a page-aligned region of it, reserved with ``posix_fallocate`` (a full disk
is an OSError here, when the state is created, never a SIGBUS at a later write),
mapped with ``mmap(MAP_SHARED)`` and seen by torch through ``torch.frombuffer`` (the
mapping lives as long as any tensor on it; then it is unmapped and its region of the
file released). Fresh regions read as zeros without being touched.

After ``fork`` the child remaps every region privately (copy-on-write), so that it can
never write into the parent's state; the child's new buffers go to a new file of its
own. This is not a snapshot, as anonymous memory would be: the child still sees the
parent's later writes to pages the child has not written, and zeros once the parent
frees the state. A child that must read a consistent copy (a fork-based asynchronous
checkpoint) needs one taken before the fork (``state_dict()`` tensors cloned).
Regions are never unmapped at interpreter exit, when a thread or an exit handler may
still read them.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import tempfile
import threading
import weakref
from pathlib import Path

import torch
from torch import Tensor

#: Per-parameter state tensors with fewer elements stay in ordinary memory (as
#: bitsandbytes pages only tensors of 1e5 elements or more).
MIN_PAGED_NUMEL = 100_000
PAGE = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_mmap.restype = ctypes.c_void_p
_munmap = _libc.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_munmap.restype = ctypes.c_int
_MAP_FAILED = ctypes.c_void_p(-1).value
_MAP_FIXED = getattr(mmap, "MAP_FIXED", 0x10)
try:  # Linux: give a freed region's disk space back at once
    _fallocate = _libc.fallocate
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    _fallocate.restype = ctypes.c_int
except AttributeError:  # pragma: no cover (not Linux)
    _fallocate = None
_PUNCH_HOLE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


class _File:
    """An open, unlinked file: closed when neither its arena nor any region uses it (a
    region's release frees its part of this file, never of whatever file reuses the
    descriptor's number)."""

    __slots__ = ("__weakref__", "fd", "pid")

    def __init__(self, directory: Path) -> None:
        fd, path = tempfile.mkstemp(prefix="adamkit-paged-", dir=directory)
        os.unlink(path)  # gone from the directory now; the space lives as long as the mappings
        self.fd, self.pid = fd, os.getpid()
        weakref.finalize(self, os.close, fd)


class _Region:
    """One mapped region: its address, length, file and offset; ``private`` once a
    forked child has remapped it copy-on-write; ``arena``: a weak reference to the arena
    whose free list takes its offset back."""

    __slots__ = ("__weakref__", "address", "arena", "file", "length", "offset", "owner", "private")

    def __init__(self, address: int, length: int, file: _File, offset: int, arena: Arena) -> None:
        self.address, self.length, self.file, self.offset = address, length, file, offset
        self.owner = os.getpid()
        self.private = False
        self.arena = weakref.ref(arena)


#: Every live region by address (for the fork handler and :func:`is_paged`).
_regions: dict[int, _Region] = {}
#: Re-entrant: a garbage collection inside a locked section may release a region.
_lock = threading.RLock()


def _release(region: _Region) -> None:
    """Unmap a region no tensor uses any more, and free its part of the file (only in
    the process that created it: a forked child's copy is private)."""
    with _lock:
        if _regions.get(region.address) is region:
            del _regions[region.address]
    _munmap(region.address, region.length)
    if region.owner == os.getpid() and not region.private:
        if _fallocate is not None:
            _fallocate(region.file.fd, _PUNCH_HOLE, region.offset, region.length)
        arena = region.arena()
        if arena is not None:
            arena._free_region(region)


def _remap_private_in_child() -> None:
    """In a forked child: every region still shared with a file becomes copy-on-write
    (regions already private, from an earlier fork, stay as they are); locks start free."""
    global _lock
    _lock = threading.RLock()
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    for region in list(_regions.values()):
        if region.private:
            continue
        flags = mmap.MAP_PRIVATE | _MAP_FIXED
        address = _mmap(region.address, region.length, prot, flags, region.file.fd, region.offset)
        if address != region.address:  # cannot keep the parent's state safe: stop here, loudly
            os.write(2, b"adamkit: could not remap paged optimizer state privately after fork\n")
            os._exit(70)
        region.private = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_remap_private_in_child)


class Arena:
    """Memory-mapped buffers for one optimizer's paged state (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = Path(directory) if directory is not None else Path(tempfile.gettempdir())
        if not self.directory.is_dir():
            raise ValueError(f"paged_dir {str(self.directory)!r} is not a directory")
        self._file: _File | None = None
        self._size = 0
        self._free: dict[int, list[int]] = {}  # released regions' offsets by length, for reuse
        self._lock = threading.RLock()
        self._lock_pid = os.getpid()
        #: bytes of the file in use (regions alive)
        self.nbytes = 0

    def _locked(self) -> threading.RLock:
        """The arena's lock (a new one in a forked child: another thread may have held
        the parent's at the fork)."""
        if self._lock_pid != os.getpid():
            self._lock, self._lock_pid = threading.RLock(), os.getpid()
        return self._lock

    def _free_region(self, region: _Region) -> None:
        with self._locked():
            self.nbytes -= region.length
            if region.file is self._file:
                self._free.setdefault(region.length, []).append(region.offset)

    def _current(self) -> _File:
        """The file new regions go to (a new one in a forked child)."""
        if self._file is None or self._file.pid != os.getpid():
            self._file, self._size, self._free = _File(self.directory), 0, {}
        return self._file

    @property
    def fd(self) -> int | None:
        """The current file's descriptor (None before the first buffer)."""
        return None if self._file is None else self._file.fd

    def zeros(self, numel: int, dtype: torch.dtype) -> Tensor:
        """A flat CPU tensor of ``numel`` zeros of ``dtype`` in the file."""
        nbytes = int(numel) * dtype.itemsize
        length = max(PAGE, -(-nbytes // PAGE) * PAGE)
        with self._locked():
            file = self._current()
            reused = self._free.get(length)
            fd, offset = file.fd, (reused.pop() if reused else self._size)
            try:
                os.posix_fallocate(fd, offset, length)
            except OSError as err:
                if reused is not None and offset != self._size:
                    reused.append(offset)
                raise OSError(
                    err.errno,
                    f"paged optimizer state: cannot reserve {length} bytes in {str(self.directory)!r} "
                    f"({os.strerror(err.errno or errno.EIO)}); free space there or pass another paged_dir",
                ) from None
            prot = mmap.PROT_READ | mmap.PROT_WRITE
            address = _mmap(None, length, prot, mmap.MAP_SHARED, fd, offset)
            if address in (None, _MAP_FAILED):
                code = ctypes.get_errno()
                if _fallocate is not None:
                    _fallocate(fd, _PUNCH_HOLE, offset, length)
                self._free.setdefault(length, []).append(offset)
                raise OSError(code, f"paged optimizer state: mmap of {length} bytes failed: {os.strerror(code)}")
            if offset == self._size:
                self._size += length
            self.nbytes += length
            region = _Region(address, length, file, offset, self)
            buffer = (ctypes.c_uint8 * length).from_address(address)
            # the region lives as long as the buffer, which every tensor on it keeps alive;
            # not released at interpreter exit, when threads or exit handlers may still read it
            weakref.finalize(buffer, _release, region).atexit = False
            buffer._adamkit_region = region  # type: ignore[attr-defined]
            with _lock:
                _regions[address] = region
        return torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes).view(dtype)

    def zeros_like(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        """Zeros of ``t``'s shape and ``dtype``, contiguous, in the file."""
        return self.zeros(t.numel(), dtype).view(t.shape)

    def adopt(self, t: Tensor) -> Tensor:
        """A copy of CPU tensor ``t`` in the file (contiguous, same shape and dtype)."""
        out = self.zeros(t.numel(), t.dtype).view(t.shape)
        out.copy_(t)
        return out


def is_paged(t: Tensor) -> bool:
    """Whether ``t`` lives in a paged arena's mapping (its storage is one of theirs)."""
    if not isinstance(t, Tensor) or t.device.type != "cpu":
        return False
    region = _regions.get(t.untyped_storage().data_ptr())
    return region is not None and region.owner == os.getpid()
