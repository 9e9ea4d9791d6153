"""adamkit: fast, memory-lean Adam-family optimizers for PyTorch.

Drop-in replacements for ``torch.optim.Adam``, ``AdamW``, ``Adamax`` and ``NAdam`` with the same
math, arguments and checkpoints.
"""

from . import bnb
from .bnb import (
    Adam8bit,
    Adam32bit,
    AdamW8bit,
    AdamW32bit,
    GlobalOptimManager,
    PagedAdam,
    PagedAdam8bit,
    PagedAdam32bit,
    PagedAdamW,
    PagedAdamW8bit,
    PagedAdamW32bit,
    keep_embeddings_32bit,
)
from .kernels import KernelUnavailableError
from .offload import CPUOffload
from .optim import NONFINITE_MODES, Adam, Adamax, AdamFamily, AdamW, NAdam

__version__ = "0.1.0"

__all__ = [
    "NONFINITE_MODES",
    "Adam",
    "Adam8bit",
    "Adam32bit",
    "AdamFamily",
    "AdamW",
    "AdamW8bit",
    "CPUOffload",
    "AdamW32bit",
    "Adamax",
    "GlobalOptimManager",
    "KernelUnavailableError",
    "NAdam",
    "PagedAdam",
    "PagedAdam8bit",
    "PagedAdam32bit",
    "PagedAdamW",
    "PagedAdamW8bit",
    "PagedAdamW32bit",
    "__version__",
    "bnb",
    "keep_embeddings_32bit",
]
