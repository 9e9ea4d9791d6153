"""torch.optim.Optimizer subclasses: Adam, AdamW, Adamax, NAdam."""

from ._base import NONFINITE_MODES, AdamFamily
from .adam import Adam, AdamW
from .adamax import Adamax
from .nadam import NAdam

__all__ = ["NONFINITE_MODES", "Adam", "AdamFamily", "AdamW", "Adamax", "NAdam"]
