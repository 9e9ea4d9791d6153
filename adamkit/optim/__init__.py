"""torch.optim.Optimizer subclasses: Adam, AdamW, Adamax."""

from ._base import NONFINITE_MODES, AdamFamily
from .adam import Adam, AdamW
from .adamax import Adamax

__all__ = ["NONFINITE_MODES", "Adam", "AdamFamily", "AdamW", "Adamax"]
