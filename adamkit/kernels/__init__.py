"""Kernels: the reference (pure torch, any device) and, later, fused backends."""

from . import numba_cpu, numba_quant, reference  # noqa: F401  (register their kernels)
from .registry import BACKENDS, Kernel, KernelUnavailableError, register, resolve

__all__ = ["BACKENDS", "Kernel", "KernelUnavailableError", "register", "resolve"]
