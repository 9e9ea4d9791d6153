"""The CUDA kernels, in Triton (:mod:`.triton_kernels`); imported only where triton is
installed and a GPU (or Triton's interpreter) is there."""

from . import triton_kernels  # noqa: F401  (register their kernels)
