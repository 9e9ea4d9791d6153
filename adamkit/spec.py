"""Each algorithm of the family, described once, for every backend.

An :class:`Algorithm` says what a variant keeps and what its kernels are fed:

* ``keys``: its state tensors, in the order the kernels take them (torch's names, so
  ``torch.optim`` checkpoints load both ways), and ``amsgrad_key``, the one AMSGrad adds;
* ``books``: the role of each key's codebook at 8 and 4 bits (``"signed"`` for the first
  moment, ``"unsigned"`` for the second moment and its maximum, ``"norm"`` for Adamax's
  infinity norm; :mod:`adamkit.quant.codebooks` maps roles to codebooks);
* ``history``: per-parameter scalars besides ``step`` that carry over from step to step
  (NAdam's ``mu_product``), with their initial values; ``advance`` updates them each
  step, in the dtype of ``step`` and with torch's rounding;
* ``scalars``: the named per-step scalars (:class:`~adamkit._scalars.StepScalars`) of one
  parameter at step ``t`` given its history, in float64 on the host;
* ``tensor_scalars``: the :class:`~adamkit._scalars.StepScalars` fields that differ
  between tensors of one call (their steps, or their history, may differ), which the
  kernels read per tensor; the others are the call's constants
  (:func:`~adamkit._scalars.rule_consts`);
* ``hyper``: the group entries the scalars read besides lr, betas, eps and weight decay.

The optimizers, the reference, the kernels, checkpoints and tests read this table;
nobody re-spells a key list or a formula. The update rule itself is written once per
backend (:mod:`adamkit.kernels.reference` is its specification).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._scalars import StepScalars, adam_scalars, adamax_scalars, device_scalars

#: ``(hyperparameters, step t, history values) -> StepScalars``
ScalarsFn = Callable[[Mapping[str, Any], float, Mapping[str, float]], StepScalars]
#: ``(hyperparameters, steps t of the tensors, their history tensors) -> None``: each
#: history tensor (one per parameter, or one flat tensor with an element per parameter)
#: updated in place for the step just taken
AdvanceFn = Callable[[Mapping[str, Any], Sequence[float], Mapping[str, Any]], None]
DeviceFn = Callable[[Mapping[str, Any], Any, Any], tuple[Any, Any, Any, float]]


@dataclass(frozen=True)
class Algorithm:
    """One variant of the family: see the module docstring."""

    name: str
    keys: tuple[str, ...]
    books: Mapping[str, str]
    scalars: ScalarsFn
    amsgrad_key: str | None = None
    history: Mapping[str, float] = field(default_factory=dict)
    advance: AdvanceFn | None = None
    tensor_scalars: tuple[str, ...] = ("step_size", "inv_bc2_sqrt")
    hyper: tuple[str, ...] = ()
    #: ``(hyperparameters, lr, steps) -> (step_size, inv_bc2_sqrt, decay, l2)``: the
    #: scalars computed on the device from device step counters (float64 [n]) and an
    #: ``lr`` that may be a device tensor, for a capturable step; None: not capturable
    device_scalars: DeviceFn | None = None

    def state_keys(self, amsgrad: bool = False) -> tuple[str, ...]:
        """The state tensors (besides ``step`` and the history) a group keeps."""
        return self.keys + ((self.amsgrad_key,) if amsgrad and self.amsgrad_key else ())

    def hyperparameters(self, group: Mapping[str, Any]) -> dict[str, Any]:
        """The group's hyperparameters as the scalars read them (floats; tensors read)."""
        beta1, beta2 = group["betas"]
        out: dict[str, Any] = {
            "lr": _number(group["lr"]),
            "beta1": _number(beta1),
            "beta2": _number(beta2),
            "eps": _number(group["eps"]),
            "weight_decay": _number(group["weight_decay"]),
            "decoupled": bool(group.get("decoupled_weight_decay", False)),
        }
        out.update({k: _number(group[k]) for k in self.hyper})
        return out


def _number(value: Any) -> float:
    """A hyperparameter's value (a tensor's read without its autograd graph)."""
    return float(value.detach()) if hasattr(value, "detach") else float(value)


def _adam(h: Mapping[str, Any], t: float, history: Mapping[str, float]) -> StepScalars:
    keys = ("lr", "beta1", "beta2", "eps", "weight_decay", "decoupled")
    return adam_scalars(**{k: h[k] for k in keys}, step=t)


def _adamax(h: Mapping[str, Any], t: float, history: Mapping[str, float]) -> StepScalars:
    return adamax_scalars(**{k: h[k] for k in ("lr", "beta1", "beta2", "eps", "weight_decay")}, step=t)


def _adam_device(h: Mapping[str, Any], lr: Any, steps: Any) -> tuple[Any, Any, Any, float]:
    wd, decoupled = h["weight_decay"], h["decoupled"]
    out = device_scalars(steps, lr=lr, beta1=h["beta1"], beta2=h["beta2"], weight_decay=wd, decoupled=decoupled)
    return (*out, 0.0 if decoupled else wd)


def _adamax_device(h: Mapping[str, Any], lr: Any, steps: Any) -> tuple[Any, Any, Any, float]:
    wd = h["weight_decay"]
    return (*device_scalars(steps, lr=lr, beta1=h["beta1"], beta2=None, weight_decay=wd, decoupled=False), wd)


def nadam_mu(h: Mapping[str, Any], t: float) -> float:
    """NAdam's momentum coefficient at step ``t``: ``β1·(1 - ½·0.96^(t·ψ))``, ψ the
    momentum decay (torch.optim.NAdam's formula)."""
    return h["beta1"] * (1.0 - 0.5 * (0.96 ** (t * h["momentum_decay"])))


def _nadam(h: Mapping[str, Any], t: float, history: Mapping[str, float]) -> StepScalars:
    """NAdam at step ``t``, ``mu_product`` already multiplied by this step's μ: the
    gradient's coefficient ``γ(1-μ_t)/(1-Πμ)`` and the momentum's
    ``γμ_{t+1}/(1-Πμ·μ_{t+1})``, as torch computes them."""
    mu, mu_next = nadam_mu(h, t), nadam_mu(h, t + 1.0)
    product = history["mu_product"]
    lr = h["lr"]
    return StepScalars(
        beta1=h["beta1"],
        beta2=h["beta2"],
        eps=h["eps"],
        step_size=lr * mu_next / (1.0 - product * mu_next),
        inv_bc2_sqrt=1.0 / math.sqrt(1.0 - h["beta2"] ** t),
        decay=1.0 - lr * h["weight_decay"] if h["decoupled"] else 1.0,
        l2=0.0 if h["decoupled"] else h["weight_decay"],
        step=t,
        grad_step=lr * (1.0 - mu) / (1.0 - product),
    )


def _nadam_advance(h: Mapping[str, Any], steps: Sequence[float], history: Mapping[str, Any]) -> None:
    """``mu_product *= μ_t``, in the product's dtype (torch's ``mul_`` by a float: the
    float rounded to that dtype first)."""
    import torch

    products = history["mu_product"]
    if isinstance(products, torch.Tensor):  # one flat tensor, an element per parameter
        mus = torch.tensor([nadam_mu(h, t) for t in steps], dtype=torch.float64)
        products.mul_(mus.to(products.dtype))
    else:
        torch._foreach_mul_(list(products), [nadam_mu(h, t) for t in steps])


ADAM = Algorithm(
    "adam",
    keys=("exp_avg", "exp_avg_sq"),
    amsgrad_key="max_exp_avg_sq",
    books={"exp_avg": "signed", "exp_avg_sq": "unsigned", "max_exp_avg_sq": "unsigned"},
    scalars=_adam,
    device_scalars=_adam_device,
)
ADAMAX = Algorithm(
    "adamax",
    keys=("exp_avg", "exp_inf"),
    books={"exp_avg": "signed", "exp_inf": "norm"},
    scalars=_adamax,
    device_scalars=_adamax_device,
)
NADAM = Algorithm(
    "nadam",
    keys=("exp_avg", "exp_avg_sq"),
    books={"exp_avg": "signed", "exp_avg_sq": "unsigned"},
    scalars=_nadam,
    history={"mu_product": 1.0},
    advance=_nadam_advance,
    tensor_scalars=("step_size", "inv_bc2_sqrt", "grad_step"),
    hyper=("momentum_decay",),
)

#: Every algorithm, by name (the registry's and ``AdamFamily.algorithm``'s names).
ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (ADAM, ADAMAX, NADAM)}

#: The codebook role of every state key any algorithm keeps.
BOOK_ROLES: dict[str, str] = {k: role for a in ALGORITHMS.values() for k, role in a.books.items()}

#: Every dense moment any algorithm keeps (they share a dtype).
MOMENTS: tuple[str, ...] = tuple(BOOK_ROLES)

#: Every per-parameter history scalar any algorithm keeps.
HISTORY: tuple[str, ...] = tuple(dict.fromkeys(k for a in ALGORITHMS.values() for k in a.history))
