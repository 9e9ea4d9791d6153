"""NAdam: Adam with Nesterov momentum, torch.optim's math and arguments."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ._base import AdamFamily


class NAdam(AdamFamily):
    r"""NAdam with torch.optim's semantics: momentum decay ψ, L2 weight decay coupled into
    the gradient unless ``decoupled_weight_decay=True``.

    .. math::
        \begin{aligned}
        & g_t \leftarrow \nabla f_t(\theta_{t-1}) \quad (\text{negated if } \textit{maximize});
          \quad g_t \leftarrow g_t + \lambda\theta_{t-1} \text{ or }
          \theta_{t-1} \leftarrow (1-\gamma\lambda)\theta_{t-1} \text{ (decoupled)} \\
        & \mu_t \leftarrow \beta_1\big(1 - \tfrac12\,0.96^{t\psi}\big), \quad
          \mu_{t+1} \leftarrow \beta_1\big(1 - \tfrac12\,0.96^{(t+1)\psi}\big), \quad
          \Pi_t \leftarrow \Pi_{t-1}\,\mu_t \quad (\texttt{mu\_product}) \\
        & m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
          v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        & \theta_t \leftarrow \theta_{t-1}
          - \frac{\gamma(1-\mu_t)}{1-\Pi_t}\,\frac{g_t}{d_t}
          - \frac{\gamma\mu_{t+1}}{1-\Pi_t\mu_{t+1}}\,\frac{m_t}{d_t}, \qquad
          d_t = \sqrt{v_t / (1-\beta_2^t)} + \epsilon
        \end{aligned}

    The state is torch's: ``step``, ``mu_product`` (a scalar per parameter, kept on the
    CPU in the dtype of ``step``), ``exp_avg``, ``exp_avg_sq`` — so checkpoints load both
    ways with ``torch.optim.NAdam``.

    Args:
        params: iterable of parameters or of param-group dicts.
        lr: learning rate γ (default 2e-3; a float or a 1-element tensor).
        betas: (β1, β2), each in [0, 1).
        eps: ε added to the denominator.
        weight_decay: λ.
        momentum_decay: ψ (default 4e-3).
        decoupled_weight_decay: decay the parameter (AdamW-style) instead of adding
            λθ to the gradient.
        foreach: accepted for compatibility.
        maximize: maximize the objective instead of minimizing it.
        capturable: not supported (``mu_product`` is history kept on the host):
            NotImplementedError.
        differentiable: a step autograd records, as in torch; see :class:`adamkit.Adam`.
        fused, backend, state_bits, stochastic_rounding, nonfinite, block_size,
        block_wise, quant_map, min_quant_size, percentile_clipping, paged, paged_dir: see :class:`adamkit.Adam`.

    Example:
        >>> import torch, adamkit
        >>> opt = adamkit.NAdam(torch.nn.Linear(4, 1).parameters(), lr=2e-3)
    """

    algorithm = "nadam"

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 2e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum_decay: float = 4e-3,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
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
            momentum_decay=momentum_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
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

    def _check_new_group(self, group: Mapping[str, Any], where: str) -> None:
        """torch.optim.NAdam's check of ``momentum_decay``."""
        psi = group.get("momentum_decay", 4e-3)
        if isinstance(psi, bool) or not isinstance(psi, (int, float)) or not 0.0 <= psi < float("inf"):
            raise ValueError(f"Invalid momentum_decay value: {psi}{where}")
