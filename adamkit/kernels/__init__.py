"""Kernels: the reference (pure torch, any device), Numba on the CPU, Triton on CUDA.

* :mod:`.registry`: (algorithm, device, state format) -> kernel entry and what it can do;
* :mod:`.reference`: the specification, in torch ops;
* :mod:`.cpu`: Numba kernels (dense and quantized state) and their SIMD code;
* :mod:`.cuda`: Triton kernels;
* :mod:`._tables` and :mod:`._checks`: the address tables pointer-based kernels share,
  and the checks at their boundary.
"""

import importlib.util
import os

import torch

from . import cpu, reference  # noqa: F401  (register their kernels)
from .registry import BACKENDS, Kernel, KernelUnavailableError, register, resolve

#: Whether the Triton kernels are registered: triton is installed (it is not a
#: dependency of CPU-only installs) and there is a GPU, or its interpreter is on.
HAS_TRITON = importlib.util.find_spec("triton") is not None and (
    os.environ.get("TRITON_INTERPRET", "0") == "1" or torch.cuda.is_available()
)
if HAS_TRITON:
    from . import cuda  # noqa: F401

__all__ = ["BACKENDS", "Kernel", "KernelUnavailableError", "register", "resolve"]
