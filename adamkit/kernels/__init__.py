"""Kernels: the reference (pure torch, any device) and, later, fused backends."""

from . import reference  # noqa: F401  (registers the reference kernels)
from .registry import BACKENDS, Kernel, KernelUnavailableError, register, resolve

__all__ = ["BACKENDS", "Kernel", "KernelUnavailableError", "register", "resolve"]
