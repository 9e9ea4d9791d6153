"""Per-(group, step) scalars of the Adam family, computed once on the host in float64.

Kernels never recompute these: they receive one :class:`StepScalars` per call. This
mirrors AWS NKI's fused Adam kernel, which takes ``step_size``, ``inv_bc2_sqrt`` and
the weight-decay factor as inputs, so that a compiled kernel does not depend on the
learning rate or the step count.

The weight-decay term is carried as two fields rather than one overloaded
``wd_factor`` (which means ``1 - lr*λ`` for AdamW but ``λ`` for Adam's L2 in NKI):
``decay`` multiplies the parameter, ``l2`` is added to the gradient. Exactly one of
them is active, and a kernel can apply both unconditionally.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple


@dataclass(frozen=True)
class StepScalars:
    """Everything a kernel needs for one step of one bucket of tensors.

    Attributes:
        beta1: first-moment decay β1.
        beta2: second-moment decay β2 (Adamax: decay of the infinity norm).
        eps: ε, added to the denominator (Adamax: to ``|g|``).
        step_size: ``lr / (1 - β1^t)``.
        inv_bc2_sqrt: ``1 / sqrt(1 - β2^t)`` (1.0 for Adamax, which has no second
            bias correction).
        decay: multiplier applied to the parameter before the update: ``1 - lr·λ``
            for decoupled weight decay (AdamW), 1.0 otherwise.
        l2: coefficient of the coupled L2 term ``g ← g + λ·θ`` (Adam, Adamax), 0.0
            for decoupled weight decay.
        step: the step count ``t`` these scalars are for; dithered 4-bit state
            (:mod:`adamkit.quant.blockwise`) decodes with ``t - 1`` and encodes with ``t``.
        grad_step: coefficient of ``g / denom`` in the update (NAdam's Nesterov term;
            0.0 for the others).
        first_index: the index, in the dither sequence of dithered 4-bit state, of the
            tensors' first element: 0, or a DTensor shard's first element's global index
            (so that a shard's codes are those of the whole tensor).
    """

    beta1: float
    beta2: float
    eps: float
    step_size: float
    inv_bc2_sqrt: float
    decay: float
    l2: float
    step: float = 0.0
    grad_step: float = 0.0
    first_index: int = 0


def adam_scalars(
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    step: float,
) -> StepScalars:
    """Scalars for Adam/AdamW at step ``t = step`` (t >= 1).

    .. math::
        \\text{step\\_size} = \\frac{\\gamma}{1-\\beta_1^t},\\qquad
        \\text{inv\\_bc2\\_sqrt} = \\frac{1}{\\sqrt{1-\\beta_2^t}}
    """
    return StepScalars(
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        step_size=lr / (1.0 - beta1**step),
        inv_bc2_sqrt=1.0 / math.sqrt(1.0 - beta2**step),
        decay=1.0 - lr * weight_decay if decoupled else 1.0,
        l2=0.0 if decoupled else weight_decay,
        step=step,
    )


def adamax_scalars(
    *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, step: float
) -> StepScalars:
    """Scalars for Adamax at step ``t``: bias correction on the first moment only."""
    return StepScalars(
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        step_size=lr / (1.0 - beta1**step),
        inv_bc2_sqrt=1.0,
        decay=1.0,
        l2=weight_decay,
        step=step,
    )


def device_scalars(
    steps: Any,
    *,
    lr: float | Any,
    beta1: float,
    beta2: float | None,
    weight_decay: float,
    decoupled: bool,
) -> tuple[Any, Any, Any]:
    """:func:`adam_scalars`' (or, with ``beta2=None``, :func:`adamax_scalars`') formulas
    in torch ops on the device, for steps that must not read anything on the host (a
    capturable step, replayed in a CUDA graph): ``(step_size, inv_bc2_sqrt, decay)``,
    float64 tensors like ``steps`` (float64 [n], the step counts t on the device) —
    ``decay`` a float unless a tensor ``lr`` decays the parameters. ``lr`` may be a
    tensor on the device (a scheduler writing it in place)."""
    import torch

    lr64 = lr.to(steps.device, torch.float64) if isinstance(lr, torch.Tensor) else float(lr)
    step_size = lr64 / (1.0 - torch.pow(beta1, steps))
    inv = 1.0 / torch.sqrt(1.0 - torch.pow(beta2, steps)) if beta2 is not None else torch.ones_like(steps)
    decay = 1.0 - lr64 * weight_decay if decoupled else 1.0
    return step_size, inv, decay


class RuleConsts(NamedTuple):
    """The constants of one kernel call, by name, in the math dtype ``work`` (numba
    takes the tuple as it is; the Triton kernels take it as a float64 table indexed by
    :data:`RULE_CONSTS`). torch's ``lerp(m, g, w)`` with ``w = 1 - β1`` is
    ``m + w·(g-m)`` for ``w < 0.5`` and ``g - (g-m)·(1-w)`` otherwise: ``low`` says which
    base, ``c1`` is ``w`` or ``-(1-w)``."""

    low: bool
    b1w: Any  #: 1 - β1
    c1: Any
    b2: Any  #: β2
    b2w: Any  #: 1 - β2
    eps: Any
    decay: Any
    l2: Any
    gsign: Any  #: -1 with ``maximize``, else 1


#: The field names of :class:`RuleConsts`, in their order.
RULE_CONSTS: tuple[str, ...] = RuleConsts._fields


def rule_consts(s: StepScalars, maximize: bool, work: type) -> RuleConsts:
    """A call's :class:`RuleConsts` from its step scalars, each rounded to ``work``
    (numpy's float32 or float64) as the kernels compute in it."""
    w = 1.0 - s.beta1
    return RuleConsts(
        low=w < 0.5,
        b1w=work(w),
        c1=work(w if w < 0.5 else -(1.0 - work(w))),
        b2=work(s.beta2),
        b2w=work(1 - s.beta2),
        eps=work(s.eps),
        decay=work(s.decay),
        l2=work(s.l2),
        gsign=work(-1.0 if maximize else 1.0),
    )
