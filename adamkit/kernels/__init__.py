"""Kernels: the reference (pure torch, any device), Numba on the CPU, Triton on CUDA."""

import importlib.util
import os

import torch

from . import _cache
from .registry import BACKENDS, Kernel, KernelUnavailableError, register, resolve

_cache.install()  # before any cached kernel is defined: the cache follows every source they use

from . import numba_cpu, numba_quant, reference  # noqa: E402, F401  (register their kernels)

#: Whether the Triton kernels are registered: triton is installed (it is not a
#: dependency of CPU-only installs) and there is a GPU, or its interpreter is on.
HAS_TRITON = importlib.util.find_spec("triton") is not None and (
    os.environ.get("TRITON_INTERPRET", "0") == "1" or torch.cuda.is_available()
)
if HAS_TRITON:
    from . import triton_cuda  # noqa: F401

__all__ = ["BACKENDS", "Kernel", "KernelUnavailableError", "register", "resolve"]
