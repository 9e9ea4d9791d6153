"""The machinery shared by Adam, AdamW, Adamax and NAdam.

It validates arguments and inputs, creates state lazily, buckets the parameters of a
param group by (device, dtype, state dtype, step), computes the step scalars and hands
flat lists to a kernel from the registry. It does no arithmetic on tensors itself.

:class:`AdamFamily` is composed of a mixin per role: :mod:`._validation` (arguments,
param groups, parameters' state and gradients; the choice of kernel), :mod:`._state`
(state formats and lazy state), :mod:`._checkpoints` (``state_dict``,
``load_state_dict``, pickling) and :mod:`._stepping` (``step()``, plans and buckets,
the non-finite policy). Here: the constructor, the non-finite count and what the
algorithm (:mod:`adamkit.spec`) decides.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, ClassVar

from torch import Tensor
from torch.optim import Optimizer

from .._scalars import StepScalars
from ..spec import ALGORITHMS, Algorithm
from ._checkpoints import _Checkpoints
from ._plan import GroupPlan, TrackedState
from ._state import _State
from ._stepping import _Stepping
from ._validation import _Validation, check_hyperparameters

#: What ``nonfinite=`` accepts; see :class:`AdamFamily`.
NONFINITE_MODES = ("mask", "skip", "propagate", "raise")


class AdamFamily(_Stepping, _Checkpoints, _Validation, _State, Optimizer):
    """Base class of :class:`~adamkit.Adam`, :class:`~adamkit.AdamW`, :class:`~adamkit.Adamax`.

    Subclasses name their algorithm (:data:`adamkit.spec.ALGORITHMS`: its state keys,
    history and step scalars) and their arguments; everything else — validation, lazy
    state, bucketing, the non-finite policy, checkpoints — lives here.

    Attributes:
        nonfinite: the non-finite gradient policy (``"mask"``, ``"skip"``,
            ``"propagate"`` or ``"raise"``).
        nonfinite_count: gradient elements found NaN/±inf so far (masked under
            ``"mask"``; seen in skipped steps under ``"skip"``). Not counted under
            ``"propagate"``. The CUDA kernels count on the device; their counts are
            added once the GPU is done with them (reading this waits for it).
        skipped_steps: steps skipped as a whole under ``"skip"``.
    """

    algorithm: ClassVar[str]

    @property
    def spec(self) -> Algorithm:
        """This optimizer's algorithm (:mod:`adamkit.spec`)."""
        return ALGORITHMS[self.algorithm]

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """torch.amp.GradScaler hands over ``grad_scale`` and ``found_inf`` instead of
        unscaling the gradients and checking them itself (see :meth:`step`); not to a
        differentiable optimizer, which, as torch's, leaves that to the scaler."""
        return not self.defaults.get("differentiable", False)

    def __init__(
        self, params: Any, defaults: dict[str, Any], *, nonfinite: str = "mask", paged_dir: Any = None
    ) -> None:
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
        if paged_dir is not None and not os.path.isdir(paged_dir):
            raise ValueError(f"paged_dir {paged_dir!r} is not a directory")
        self.paged_dir = None if paged_dir is None else os.fspath(paged_dir)
        check_hyperparameters(defaults)  # before the parameters are read, as torch
        self._check_new_group(defaults, "")
        self.nonfinite = nonfinite
        self._nonfinite_count = 0
        self._pending_counts: list[tuple[Tensor, Any]] = []
        self.skipped_steps = 0
        self._warned_nonfinite = False
        self._plans: dict[int, GroupPlan] = {}
        super().__init__(params, defaults)
        self.state: TrackedState = TrackedState(self.state)

    #: Kept by pickling and ``copy.deepcopy`` besides torch's defaults, state and
    #: groups; the count under its private name (``nonfinite_count`` is a property),
    #: so that a copy has the public attributes of the original, no more.
    _EXTRA_ATTRIBUTES: ClassVar[dict[str, Any]] = {
        "nonfinite": "mask",
        "_nonfinite_count": 0,
        "skipped_steps": 0,
        "_warned_nonfinite": False,
        "paged_dir": None,
    }

    @property
    def nonfinite_count(self) -> int:
        self._settle_counts(wait=True)
        on_device = sum(int(c) for c in self.__dict__.get("_device_counts", {}).values())  # capturable steps
        if on_device and not self._warned_nonfinite:
            self._note_nonfinite(on_device, "masked in capturable steps: parameters and moments left unchanged", False)
        return self._nonfinite_count + on_device

    @nonfinite_count.setter
    def nonfinite_count(self, value: int) -> None:
        self._pending_counts = []
        for counter in self.__dict__.get("_device_counts", {}).values():
            counter.zero_()
        self._nonfinite_count = int(value)

    # ----------------------------------------------------------------- subclass API
    def _state_keys(self, group: Mapping[str, Any]) -> tuple[str, ...]:
        """Names of the per-parameter state tensors (besides ``step`` and the history)."""
        return self.spec.state_keys(bool(group.get("amsgrad", False)))

    def _step_scalars(
        self, group: Mapping[str, Any], step: float, history: Mapping[str, float] | None = None
    ) -> StepScalars:
        """Host-side float64 scalars for ``group`` at step ``step`` (``history``: the
        parameter's history values after this step's update, e.g. NAdam's ``mu_product``)."""
        return self.spec.scalars(self.spec.hyperparameters(group), step, history or {})

    def _advance(self, group: Mapping[str, Any]) -> Callable[[Any, Any], None] | None:
        """``(steps, history) -> None``: the algorithm's per-step history update with this
        group's hyperparameters, or None if it keeps no history."""
        if self.spec.advance is None:
            return None
        return partial(self.spec.advance, self.spec.hyperparameters(group))
