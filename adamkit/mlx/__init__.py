"""adamkit for MLX: torch.optim's Adam family as ``mlx.optimizers.Optimizer`` subclasses,
with 8- and 4-bit state and checkpoints that cross between torch and MLX.

Needs MLX (``pip install "adamkit[mlx]"``; on Linux that is ``mlx[cpu]``). See docs/mlx.md.
"""

try:
    import mlx.core  # noqa: F401
except ImportError as err:  # pragma: no cover - exercised where MLX is absent
    raise ImportError('adamkit.mlx needs MLX: pip install "adamkit[mlx]" (on Linux: mlx[cpu])') from err

from .convert import load_torch_state_dict, to_torch_state_dict
from .optimizers import Adam, Adamax, AdamFamily, AdamW, NAdam

__all__ = ["Adam", "AdamFamily", "AdamW", "Adamax", "NAdam", "load_torch_state_dict", "to_torch_state_dict"]
