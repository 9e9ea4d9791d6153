"""Adam and AdamW: torch.optim's math and arguments, adamkit's kernels."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ._base import AdamFamily

_MATH = r"""
    .. math::
        \begin{aligned}
        & g_t \leftarrow \nabla f_t(\theta_{t-1}) \quad (\text{negated if } \textit{maximize}) \\
        & \text{Adam: } g_t \leftarrow g_t + \lambda\theta_{t-1} \qquad
          \text{AdamW: } \theta_{t-1} \leftarrow (1-\gamma\lambda)\,\theta_{t-1} \\
        & m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
          v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        & \hat v_t \leftarrow \max(\hat v_{t-1}, v_t) \text{ if } \textit{amsgrad} \text{ else } v_t \\
        & \theta_t \leftarrow \theta_{t-1} - \frac{\gamma}{1-\beta_1^t}\,
          \frac{m_t}{\sqrt{\hat v_t}\,/\sqrt{1-\beta_2^t} + \epsilon}
        \end{aligned}
"""

_ARGS = """
    Args:
        params: iterable of parameters or of param-group dicts.
        lr: learning rate γ (a float or a 1-element tensor).
        betas: (β1, β2), each in [0, 1).
        eps: ε added to the denominator.
        weight_decay: λ.
        amsgrad: use the running maximum of ``v`` (AMSGrad).
        foreach: accepted for compatibility; the reference is always multi-tensor. As
            in torch, ``foreach=True`` refuses a tensor ``lr`` or betas unless capturable.
        maximize: maximize the objective instead of minimizing it.
        capturable: keep ``step`` on the parameters' device and compute the step
            scalars there, with no host read, so that ``step()`` can be captured in a
            CUDA graph (the Triton kernels; see the README).
        differentiable: as in torch, ``step()`` runs with autograd recording, so that
            the new parameters and state carry a graph back to the gradients, the old
            state and tensor hyperparameters: the reference rule, one tensor at a time,
            in place on the parameters and state, out of place where autograd needs the
            old values. Not with ``fused=True`` (RuntimeError, as torch), a fused
            ``backend``, ``state_bits`` other than 32, ``capturable``,
            ``stochastic_rounding`` or ``percentile_clipping`` (ValueError).
        fused: None picks the fastest kernel available, True demands a fused kernel
            (or raises), False forces the reference implementation.
        backend: ``"auto"``, ``"reference"``, ``"numba"`` or ``"triton"``.
        state_bits: bits per element of the optimizer state. 32: float32 (float64
            for float64 parameters) — for bf16/fp16 parameters too, where torch keeps
            their dtype; 16: bfloat16 moments (math still in float32); 8 and 4:
            block-wise quantized moments (see :mod:`adamkit.quant`): one code per
            element (two per byte at 4 bits) plus one float32 absmax per block, for
            real floating-point parameters of at least ``min_quant_size`` elements
            (smaller ones keep 32-bit state, as bitsandbytes does).
        stochastic_rounding: store bf16 parameters rounded stochastically (unbiased,
            reproducible under ``torch.manual_seed``: one draw from torch's generator
            per step) instead of to nearest, so that updates smaller than half a bf16
            ulp are not lost in pure-bf16 training. Other dtypes ignore it.
        nonfinite: what a NaN/±inf gradient element does: ``"mask"`` (default; that
            element's parameter and moments stay unchanged, and so do those of an
            element whose gradient is so large (``|g| >= 2^60``) that its moments
            would overflow; it is counted in ``.nonfinite_count`` and a warning is
            issued once), ``"skip"`` (the whole
            step is skipped for every parameter, steps not incremented),
            ``"propagate"`` (torch's behaviour) or ``"raise"`` (FloatingPointError,
            nothing changed).
        block_size: elements per absmax of quantized state (default 256 at 8 bits,
            128 at 4 bits).
        block_wise: False keeps one absmax per tensor (bitsandbytes'
            ``block_wise=False``): less accurate, and stepped by the reference (two
            passes), not the fused kernels.
        quant_map: the codebooks of 8-bit state: ``"dynamic"`` (default,
            bitsandbytes' dynamic maps) or ``"tapered"`` (float-like maps whose codes
            are computed from a float's bits: more accurate, and a faster host step;
            see docs/quantized-state.md). 4-bit state keeps its own maps.
        min_quant_size: tensors with fewer elements keep 32-bit state (default 4096,
            bitsandbytes' ``min_8bit_size``).
        percentile_clipping: bitsandbytes' adaptive clipping: each parameter keeps the
            squared norms of its last 100 gradients and a gradient whose norm exceeds
            the ``percentile_clipping``-th smallest of them is scaled down to it. 100
            (default) turns it off.
        paged: keep the moments of CPU parameters in a memory-mapped file (bitsandbytes'
            ``is_paged``; see :mod:`adamkit._paged`): the operating system pages them out
            under memory pressure, so state larger than RAM trains instead of failing.
            Tensors under 100,000 elements, block scales and ``step`` stay in ordinary
            memory. Results are bit for bit those of unpaged state.
        paged_dir: the directory of the paged state's file (default: the system's
            temporary directory). The file is unlinked as soon as it is created.
"""


class Adam(AdamFamily):
    __doc__ = (
        """Adam with torch.optim's semantics: L2 weight decay coupled into the gradient,
    unless ``decoupled_weight_decay=True`` (then it is AdamW).
"""
        + _MATH
        + _ARGS
        + """        decoupled_weight_decay: decay the parameter instead (AdamW).

    Example:
        >>> import torch, adamkit
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = adamkit.Adam(model.parameters(), lr=1e-3)
        >>> model(torch.randn(8, 4)).pow(2).mean().backward()
        >>> opt.step(); opt.zero_grad()
"""
    )

    algorithm = "adam"

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
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
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
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
        """torch.optim.Adam's checks of tensor hyperparameters: betas are both tensors or
        neither, and with ``foreach=True`` a tensor lr or betas need ``capturable=True``
        (adamkit has no separate foreach path, but raises where torch does)."""
        betas = group["betas"]
        tensors = [isinstance(b, Tensor) for b in betas]
        if any(tensors) and not all(tensors):
            raise ValueError(f"betas must be either both floats or both Tensors{where}")
        if group.get("foreach") and not group.get("capturable"):
            for name, value in [("lr", group["lr"]), ("betas[0]", betas[0]), ("betas[1]", betas[1])]:
                if isinstance(value, Tensor):
                    raise ValueError(
                        f"{name} as a Tensor is not supported for capturable=False and foreach=True{where}"
                    )


class AdamW(Adam):
    __doc__ = (
        """AdamW: Adam with decoupled weight decay, ``θ ← (1 - γλ)·θ`` before the update.

    Same arguments as :class:`Adam` (``weight_decay`` defaults to 1e-2) and, like
    ``torch.optim.AdamW``, always decoupled: a loaded checkpoint cannot turn that off.
"""
        + _MATH
        + _ARGS
        + """
    Example:
        >>> import torch, adamkit
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = adamkit.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
"""
    )

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
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
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            backend=backend,
            state_bits=state_bits,
            stochastic_rounding=stochastic_rounding,
            nonfinite=nonfinite,
            block_size=block_size,
            block_wise=block_wise,
            quant_map=quant_map,
            min_quant_size=min_quant_size,
            percentile_clipping=percentile_clipping,
            paged=paged,
            paged_dir=paged_dir,
        )

    def _normalize_loaded_group(self, group: dict[str, Any]) -> None:
        group["decoupled_weight_decay"] = True
