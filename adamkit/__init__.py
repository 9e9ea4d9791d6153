"""adamkit: fast, memory-lean Adam-family optimizers for PyTorch.

Drop-in replacements for ``torch.optim.Adam``, ``AdamW`` and ``Adamax`` with the same
math, arguments and checkpoints.
"""

from .kernels import KernelUnavailableError
from .optim import NONFINITE_MODES, Adam, Adamax, AdamFamily, AdamW

__version__ = "0.1.0"

__all__ = ["NONFINITE_MODES", "Adam", "AdamFamily", "AdamW", "Adamax", "KernelUnavailableError", "__version__"]
