"""Kernels: the reference (pure torch, any device) and, later, fused backends."""

from . import _cache
from .registry import BACKENDS, Kernel, KernelUnavailableError, register, resolve

_cache.install()  # before any cached kernel is defined: the cache follows every source they use

from . import numba_cpu, numba_quant, reference  # noqa: E402, F401  (register their kernels)

__all__ = ["BACKENDS", "Kernel", "KernelUnavailableError", "register", "resolve"]
