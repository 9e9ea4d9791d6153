"""Adamax: Adam with the infinity norm, torch.optim's math and arguments."""

from __future__ import annotations

import os
from typing import Any

from torch import Tensor

from ._base import AdamFamily


class Adamax(AdamFamily):
    r"""Adamax with torch.optim's semantics (L2 weight decay coupled into the gradient).

    .. math::
        \begin{aligned}
        & g_t \leftarrow \nabla f_t(\theta_{t-1}) \quad (\text{negated if } \textit{maximize}),
          \qquad g_t \leftarrow g_t + \lambda\theta_{t-1} \\
        & m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
          u_t \leftarrow \max(\beta_2 u_{t-1}, |g_t| + \epsilon) \\
        & \theta_t \leftarrow \theta_{t-1} - \frac{\gamma}{1-\beta_1^t}\,\frac{m_t}{u_t}
        \end{aligned}

    Unlike MLX's Adamax, the first moment is bias-corrected, as in torch. ε is added
    to ``|g|`` inside the max (torch), not to the denominator.

    Args:
        params: iterable of parameters or of param-group dicts.
        lr: learning rate γ (default 2e-3; a float or a 1-element tensor).
        betas: (β1, β2), each in [0, 1).
        eps: ε.
        weight_decay: λ (coupled L2).
        foreach: accepted for compatibility (positional, as in torch).
        maximize: maximize the objective instead of minimizing it.
        differentiable: a step autograd records, as in torch; see :class:`adamkit.Adam`.
        capturable: keep ``step`` on the parameters' device and compute the step
            scalars there, with no host read, so that ``step()`` can be captured in a
            CUDA graph (the Triton kernels; see the README).
        fused: None picks the fastest kernel available, True demands a fused kernel
            (or raises), False forces the reference implementation.
        backend: ``"auto"``, ``"reference"``, ``"numba"`` or ``"triton"``.
        state_bits: 32 (float32 state; float64 for float64 parameters), 16
            (bfloat16), 8 or 4 (block-wise quantized); see :class:`adamkit.Adam`.
        stochastic_rounding: stochastic rounding of bf16 parameters; see
            :class:`adamkit.Adam`.
        nonfinite: ``"mask"`` (default), ``"skip"``, ``"propagate"`` or ``"raise"``;
            see :class:`adamkit.Adam`.
        block_size, block_wise, quant_map, min_quant_size, percentile_clipping, paged, paged_dir: quantized state
            and clipping; see :class:`adamkit.Adam`.

    Example:
        >>> import torch, adamkit
        >>> opt = adamkit.Adamax(torch.nn.Linear(4, 1).parameters())
    """

    algorithm = "adamax"

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 2e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
        state_bits: int = 32,
        stochastic_rounding: bool = False,
        nonfinite: str = "mask",
        block_size: int | None = None,
        block_wise: bool = True,
        quant_map: str = "dynamic",
        min_quant_size: int = 4096,
        percentile_clipping: int = 100,
        paged: bool = False,
        paged_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=tuple(betas) if isinstance(betas, list) else betas,
            eps=eps,
            weight_decay=weight_decay,
            foreach=foreach,
            maximize=maximize,
            differentiable=differentiable,
            capturable=capturable,
            fused=fused,
            backend=backend,
            state_bits=state_bits,
            stochastic_rounding=stochastic_rounding,
            block_size=block_size,
            block_wise=block_wise,
            quant_map=quant_map,
            min_quant_size=min_quant_size,
            percentile_clipping=percentile_clipping,
            paged=paged,
        )
        super().__init__(params, defaults, nonfinite=nonfinite, paged_dir=paged_dir)
