"""The machinery shared by Adam, AdamW and Adamax.

It validates arguments and inputs, creates state lazily, buckets the parameters of a
param group by (device, dtype, state dtype, step), computes the step scalars and hands
flat lists to a kernel from the registry. It does no arithmetic on tensors itself.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from copy import deepcopy
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import _memory
from .._scalars import StepScalars, rule_consts
from ..kernels import reference
from ..kernels._checks import is_plain, storage_order
from ..kernels.registry import (
    FUSED_BACKENDS,
    STATE_BITS,
    Kernel,
    KernelUnavailableError,
    check_backend_request,
    is_forced,
    resolve,
)
from ..quant import DEFAULT_BLOCK, QUANT_BITS, QuantFormat, dequantize, quantize
from ..spec import ALGORITHMS, HISTORY, MOMENTS, Algorithm
from ._plan import GroupPlan, TrackedState, _Launch, quant_meta

#: What ``nonfinite=`` accepts; see :class:`AdamFamily`.
NONFINITE_MODES = ("mask", "skip", "propagate", "raise")

#: Group keys that choose an implementation rather than the math. ``load_state_dict``
#: keeps this optimizer's values for them, so a checkpoint written by
#: ``torch.optim.Adam(capturable=True)`` on a GPU still loads and steps here.
IMPLEMENTATION_KEYS = (
    "foreach",
    "fused",
    "capturable",
    "differentiable",
    "backend",
    "state_bits",
    "stochastic_rounding",
    "block_size",
    "block_wise",
    "min_quant_size",
)

#: Per-parameter state entries of quantized state that are not tensors: the format
#: (``quant_dither`` is absent from checkpoints of adamkit 0.1, whose 4-bit codes were
#: nearest codes).
QUANT_META = ("quant_bits", "quant_block", "quant_dither")

#: A parameter's state format: a dtype (dense state) or a :class:`QuantFormat`.
StateFormat = torch.dtype | QuantFormat


def quant_format_of(state: Mapping[str, Any]) -> QuantFormat | None:
    """The format of a parameter's quantized state, or None for dense state."""
    if "quant_bits" not in state:
        return None
    return QuantFormat.from_key(int(state["quant_bits"]), int(state["quant_block"]), int(state.get("quant_dither", 0)))


def state_columns(keys: Iterable[str], fmt: StateFormat) -> list[str]:
    """The state entries holding tensors: ``keys`` themselves for dense state,
    ``<key>_codes`` and ``<key>_absmax`` for each key of quantized state."""
    if isinstance(fmt, QuantFormat):
        return [f"{k}_{part}" for k in keys for part in ("codes", "absmax")]
    return list(keys)


#: State entries besides the moments, and their shapes: percentile clipping's history.
EXTRA_STATE = {"gnorm_vec": (100,)}


def _expected_shape(column: str, p: Tensor, fmt: StateFormat) -> tuple[int, ...]:
    if column in EXTRA_STATE:
        return EXTRA_STATE[column]
    if not isinstance(fmt, QuantFormat):
        return tuple(p.shape)
    n = p.numel()
    return (fmt.code_bytes(n),) if column.endswith("_codes") else (fmt.blocks(n),)


def _step_problem(step: Any, read: bool) -> str | None:
    """What makes a ``step`` entry unfit (None: nothing); its value is read only if ``read``."""
    if isinstance(step, Tensor):
        if step.numel() != 1 or step.is_complex() or step.layout != torch.strided:
            return f"'step' must be one real number, got a {tuple(step.shape)} {step.dtype} tensor"
        if not read:
            return None
        value = float(step)
    elif isinstance(step, (int, float)) and not isinstance(step, bool):
        value = float(step)
    else:
        return f"'step' must be a number or a 1-element tensor, got {type(step).__name__}"
    if not (math.isfinite(value) and value >= 0 and value == math.floor(value)):
        return f"'step' must be finite, whole and >= 0, got {value}"
    return None


def _history_problem(key: str, value: Any, read: bool) -> str | None:
    """What makes a history entry (NAdam's ``mu_product``) unfit, as :func:`_step_problem`."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex() or value.layout != torch.strided:
            return f"{key!r} must be one real number, got a {tuple(value.shape)} {value.dtype} tensor"
        if not read:
            return None
        number = float(value.detach())
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        return f"{key!r} must be a number or a 1-element tensor, got {type(value).__name__}"
    if not math.isfinite(number):
        return f"{key!r} must be finite, got {number}"
    return None


def _in_its_storage(t: Tensor) -> bool:
    """Whether a state tensor's elements lie in its storage (a storage can be resized
    under a tensor); True for what has no host-visible storage to ask (meta, wrappers)."""
    if t.numel() == 0 or t.device.type == "meta":
        return True
    try:
        held = t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return True  # a wrapper subclass: the reference steps it through torch
    extent = t.storage_offset() + 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return extent * t.element_size() <= held


def state_problem(
    p: Tensor,
    state: Mapping[str, Any],
    keys: Iterable[str],
    read_step: bool = True,
    where: str = "",
    history: Iterable[str] = (),
) -> str | None:
    """What makes a parameter's state unfit for a step, or None: a bad ``step``, a bad
    quantized format, entries that are not dense tensors on the parameter's device with
    its shape (its codes' and blocks' counts when quantized), dense moments of more
    than one dtype or of a dtype that cannot hold the parameter's state. Keys the group
    needs and the state lacks are not a problem: they are created (``amsgrad`` switched
    on). ``read_step``: whether ``step`` may be read on the host (not a capturable
    step's device counter). ``where`` is put into the message where it reads well.
    ``history``: the entries besides ``step`` the state must have (NAdam's
    ``mu_product``): missing, they are a problem (no value would be right)."""
    if not state:
        return None
    for key in ("step", *history):
        if key not in state:
            return f"state lacks {key!r} (has {sorted(state)}){where}"
    problem = _step_problem(state["step"], read_step)
    if problem:
        return problem + where
    for key in HISTORY:
        if key in state:
            problem = _history_problem(key, state[key], read_step)
            if problem:
                return problem + where
    try:
        fmt = quant_format_of(state)
    except (KeyError, TypeError, ValueError) as err:
        got = {k: state.get(k) for k in QUANT_META}
        return f"bad quantized-state format {got}: {err}{where}"
    dtypes: dict[str, torch.dtype] = {}
    for key, t in state.items():
        if key == "step" or key in QUANT_META or key in HISTORY:
            continue
        if not isinstance(t, Tensor):
            return f"state {key!r} is a {type(t).__name__}, not a tensor{where}"
        if t.layout != torch.strided or t.is_nested:
            return f"state {key!r} is a {t.layout} tensor; state tensors are dense{where}"
        if t.device != p.device:
            return f"state {key!r} is on {t.device} but the parameter is on {p.device}{where}"
        if tuple(t.shape) != _expected_shape(key, p, fmt or p.dtype):
            return (
                f"state {key!r} has shape {tuple(t.shape)} but the parameter has shape {tuple(p.shape)}{where}; "
                "was the parameter resized?"
            )
        if not _in_its_storage(t):
            return f"state {key!r} has {t.numel()} elements but its storage holds fewer (resized?){where}"
        if key in EXTRA_STATE or fmt is not None:
            kind = torch.float32 if key in EXTRA_STATE or key.endswith("_absmax") else torch.uint8
            if t.dtype != kind:
                return f"state {key!r} is {t.dtype}, expected {kind}{where}"
        elif t.is_complex() != p.is_complex() or not (t.is_floating_point() or t.is_complex()):
            return f"state {key!r} is {t.dtype}, which cannot hold a {p.dtype} parameter's state{where}"
        elif key in keys or key in _MOMENTS:
            dtypes[key] = t.dtype
    if len(set(dtypes.values())) > 1:
        got = {k: str(v) for k, v in dtypes.items()}
        return f"state tensors must share one dtype, got {got}{where}"
    return None


#: Every dense moment any variant keeps: they must share a dtype whatever ``amsgrad`` is
#: now (a kept ``max_exp_avg_sq`` is stepped again when it is switched back on).
_MOMENTS = MOMENTS


@dataclass
class _Work:
    """One group's step, validated: how it will run."""

    index: int
    group: Mapping[str, Any]
    launch: _Launch | None = None  # the cached-plan path, with
    all_grads: list[Tensor | None] | None = None  # the group's grads (None included), if read
    triples: list[tuple[int, Tensor, Tensor]] | None = None  # or the general path

    def grads(self) -> list[tuple[int, Tensor]]:
        """(position in the group, gradient) of every parameter with one (for screening).

        Built only when asked: 20,000 tuples per step would wake the garbage collector.
        """
        if self.triples is not None:
            return [(i, g) for i, _, g in self.triples]
        grads = self.all_grads if self.all_grads is not None else [p.grad for p in self.group["params"]]
        return [(i, g) for i, g in enumerate(grads) if g is not None]


_INTERNAL_DIRS = (os.path.dirname(os.path.dirname(__file__)) + os.sep, os.path.dirname(torch.__file__) + os.sep)


def _user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the caller of ``step()``."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def _scalar_dtype() -> torch.dtype:
    """torch's dtype for ``state["step"]``: float32, or float64 if that is the default."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _as_float(name: str, value: Any, where: str) -> float:
    """A hyperparameter as a Python float (a 1-element tensor is allowed)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(value.shape)}{where}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a 1-element tensor, got {type(value).__name__}{where}")
    return float(value)


def check_hyperparameters(group: Mapping[str, Any], where: str = "", read_device: bool = True) -> None:
    """Raise ValueError/TypeError unless lr, betas, eps and weight_decay are valid.

    Messages follow torch's (``Invalid learning rate: -1.0``) with the group named, in
    torch's order. NaN and infinities are rejected too (torch lets NaN through). Without
    ``read_device`` (a capturable step) a tensor ``lr`` is not read, only its shape
    checked: on a GPU that would wait for it, and fail inside a CUDA graph capture.
    """
    lr_value = group["lr"]
    if read_device or not isinstance(lr_value, Tensor):
        lr = _as_float("lr", lr_value, where)
        if not (0.0 <= lr < math.inf):
            raise ValueError(f"Invalid learning rate: {lr}{where}")
    elif lr_value.numel() != 1:
        raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr_value.shape)}{where}")
    eps = _as_float("eps", group["eps"], where)
    if not (0.0 <= eps < math.inf):
        raise ValueError(f"Invalid epsilon value: {eps}{where}")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}{where}")
    for i, beta in enumerate(betas):
        b = _as_float(f"betas[{i}]", beta, where)
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {b}{where}")
    wd = _as_float("weight_decay", group["weight_decay"], where)
    if not (0.0 <= wd < math.inf):
        raise ValueError(f"Invalid weight_decay value: {wd}{where}")


class AdamFamily(Optimizer):
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

    def __init__(self, params: Any, defaults: dict[str, Any], *, nonfinite: str = "mask") -> None:
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
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

    def _settle_counts(self, wait: bool) -> None:
        """Add the device-side masked counts the GPU has finished (all, if ``wait``):
        reading one before would make ``step()`` wait for the kernels."""
        pending = getattr(self, "_pending_counts", [])
        while pending and (wait or pending[0][1] is None or pending[0][1].query()):
            count, _ = pending.pop(0)
            masked = int(count)
            if masked:
                self._note_nonfinite(masked, "masked: their parameters and moments were left unchanged")

    def __getstate__(self) -> dict[str, Any]:
        """torch pickles only defaults, state and groups; keep the non-finite policy too.
        The state as plain dicts: its mutation counting is rebuilt on loading."""
        state = super().__getstate__()
        state["state"] = defaultdict(dict, {p: dict(st) for p, st in self.state.items()})
        state.update({k: getattr(self, k) for k in self._EXTRA_ATTRIBUTES})
        state["_nonfinite_count"] = self.nonfinite_count  # with capturable steps' device counts
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "nonfinite_count" in state:  # pickled by adamkit 0.1
            state = dict(state)
            state["_nonfinite_count"] = state.pop("nonfinite_count")
        self._plans = {}  # new state: plans are rebuilt from it on the next step
        self._pending_counts = []
        for key, default in self._EXTRA_ATTRIBUTES.items():
            if not hasattr(self, key):
                setattr(self, key, state.get(key, default))
        super().__setstate__(state)
        if not isinstance(self.state, TrackedState):
            self.state = TrackedState(self.state)

    def state_dict(self) -> dict[str, Any]:
        """torch's ``state_dict``, with plain dicts (loadable with ``weights_only=True``).

        For parameters stepped by a fused CPU kernel the state tensors are views into
        per-group flat buffers; saving writes each buffer once.
        """
        out = super().state_dict()
        out["state"] = {k: dict(v) if isinstance(v, dict) else v for k, v in out["state"].items()}
        return out

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

    def _normalize_loaded_group(self, group: dict[str, Any]) -> None:
        """Hook for subclasses to fix up a group read from a checkpoint."""

    # ------------------------------------------------------------------- validation
    def _check_group(self, group: Mapping[str, Any], index: int, params: Iterable[Tensor]) -> None:
        """Everything about a param group that can be wrong, before anything changes."""
        where = f" (param group {index})"
        check_hyperparameters(group, where)
        self._check_new_group(group, where)
        if group.get("differentiable"):
            self._check_differentiable(group, where)
        if group.get("capturable"):
            self._check_capturable(group, where, params)
        if group.get("foreach") and group.get("fused"):
            raise ValueError(f"`fused` and `foreach` cannot be `True` together{where}")
        check_backend_request(group["backend"], group["fused"])
        if group["state_bits"] not in STATE_BITS:
            raise ValueError(f"state_bits must be one of {STATE_BITS}, got {group['state_bits']!r}{where}")
        block = group.get("block_size")
        if block is not None:
            QuantFormat(group["state_bits"] if group["state_bits"] in QUANT_BITS else 8, block)  # raises if bad
        if not isinstance(group.get("block_wise", True), bool):
            raise TypeError(f"block_wise must be a bool, got {group['block_wise']!r}{where}")
        size = group.get("min_quant_size", 0)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"min_quant_size must be an int >= 0, got {size!r}{where}")
        pc = group.get("percentile_clipping", 100)
        if isinstance(pc, bool) or not isinstance(pc, int) or not 0 <= pc <= 100:
            raise ValueError(f"percentile_clipping must be an int in [0, 100] (100 = off), got {pc!r}{where}")
        for i, p in enumerate(params):
            if isinstance(p, Tensor) and not (p.is_floating_point() or p.is_complex()):
                raise ValueError(
                    f"{type(self).__name__} optimizes floating-point and complex tensors; parameter {i} is "
                    f"{p.dtype}{where}"
                )
        # Meta tensors are placeholders (shapes without values): as torch, checked when they step.
        for device_type in sorted({p.device.type for p in params if isinstance(p, Tensor)} - {"meta"}):
            self._kernel(group, device_type)

    def _check_new_group(self, group: Mapping[str, Any], where: str) -> None:
        """Hook: how the arguments of a group being added combine (torch's checks of
        its class, made at construction before the parameters are read, and by
        ``add_param_group``; not at each step, where a scheduler may change them)."""

    def _check_differentiable(self, group: Mapping[str, Any], where: str) -> None:
        """What ``differentiable=True`` refuses: a step autograd can record is the
        reference rule on 32-bit state (see :meth:`_step_differentiable`); the fused
        kernels, quantized or bf16 state and the host-side extras are not differentiable."""
        name = type(self).__name__
        if group.get("fused"):
            raise RuntimeError(f"`fused` does not support `differentiable`{where}")
        refused = {
            f"backend={group['backend']!r}": group["backend"] in FUSED_BACKENDS,
            f"state_bits={group['state_bits']}": group["state_bits"] != 32,
            "capturable=True": bool(group.get("capturable")),
            "stochastic_rounding=True": bool(group.get("stochastic_rounding")),
            f"percentile_clipping={group.get('percentile_clipping')}": group.get("percentile_clipping", 100) < 100,
        }
        for option, used in refused.items():
            if used:
                raise ValueError(
                    f"{name}: differentiable=True steps the reference rule on 32-bit state, not with {option}{where}"
                )

    def _check_capturable(self, group: Mapping[str, Any], where: str, params: Iterable[Tensor]) -> None:
        """What ``capturable=True`` needs: the Triton kernels, and nothing that reads the
        host during a step."""
        name = type(self).__name__
        if self.spec.device_scalars is None:
            raise NotImplementedError(
                f"{name}: capturable=True is not supported: its step scalars come from per-parameter history kept "
                f"on the host ({sorted(self.spec.history)}){where}"
            )
        if self.nonfinite in ("skip", "raise"):
            raise ValueError(
                f"{name}: capturable=True needs nonfinite='mask' or 'propagate' ('{self.nonfinite}' reads the "
                f"gradients on the host every step){where}"
            )
        reasons = {
            "percentile_clipping": group.get("percentile_clipping", 100) < 100,
            "stochastic_rounding": bool(group.get("stochastic_rounding")),
        }
        for option, used in reasons.items():
            if used:
                raise ValueError(f"{name}: capturable=True does not support {option} (a host-side step){where}")
        for i, beta in enumerate(group["betas"]):
            if isinstance(beta, Tensor) and beta.device.type != "cpu":
                raise ValueError(f"{name}: capturable=True takes betas[{i}] as a float or a CPU tensor{where}")
        for device_type in sorted({p.device.type for p in params if isinstance(p, Tensor)}):
            kernel = self._kernel(group, device_type)
            if not kernel.capturable:
                raise NotImplementedError(
                    f"{name}: capturable=True needs the triton kernels (CUDA tensors with triton installed, or "
                    f"backend='triton' under TRITON_INTERPRET=1: kernels that step with no host read); "
                    f"{device_type!r} tensors get the {kernel.backend} kernels{where}"
                )

    def _kernel(
        self,
        group: Mapping[str, Any],
        device_type: str,
        tensors: tuple[torch.dtype, torch.dtype, bool] | None = None,
        where: str = "",
    ) -> Kernel:
        """The kernel for a group's tensors on ``device_type``.

        ``tensors`` is (param dtype, state dtype, contiguous). A kernel that cannot
        take them gives way to the reference, unless the group demands a fused
        kernel (``fused=True`` or a fused ``backend``): then it is an error.
        """
        bits = group["state_bits"]
        if tensors is not None:  # this parameter's own format (small tensors keep 32-bit state)
            bits = tensors[1].bits if isinstance(tensors[1], QuantFormat) else 16 if bits == 16 else 32
        kernel = resolve(self.algorithm, device_type, bits, group["backend"], group["fused"])
        why = kernel.unsupported(*tensors) if tensors and kernel.unsupported else None
        if why is None:
            return kernel
        if is_forced(group["backend"], group["fused"]):
            raise KernelUnavailableError(f"{why}{where}")
        return resolve(self.algorithm, device_type, bits, "reference")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (as torch), validating it first: a bad group adds nothing."""
        params = param_group.get("params")
        if isinstance(params, Tensor):
            param_group["params"] = [params]
        elif params is not None and not isinstance(params, (set, list)):
            param_group["params"] = list(params)  # a generator must be read only once
        merged = {**self.defaults, **param_group}
        params = merged.get("params") or []
        self._check_group(merged, len(self.param_groups), params if not isinstance(params, set) else [])
        super().add_param_group(param_group)

    def _collect(self, index: int, group: Mapping[str, Any]) -> list[tuple[int, Tensor, Tensor]]:
        """(position, param, grad) of every parameter with a gradient, each checked. A
        parameter listed twice is stepped once (torch warns of it when it is added)."""
        where = f"param group {index}"
        triples = []
        name = type(self).__name__
        forced = is_forced(group["backend"], group["fused"])
        keys = self._state_keys(group)
        seen: set[int] = set()
        for i, p in enumerate(group["params"]):
            g = p.grad
            if g is None or id(p) in seen:
                continue
            seen.add(id(p))
            if g.is_sparse or g.layout != torch.strided:
                raise RuntimeError(f"{name} does not support sparse gradients ({where}, parameter {i})")
            if g.shape != p.shape:
                raise RuntimeError(
                    f"gradient shape {tuple(g.shape)} differs from parameter shape {tuple(p.shape)} "
                    f"({where}, parameter {i})"
                )
            if g.dtype != p.dtype or g.device != p.device:
                raise RuntimeError(
                    f"gradient is {g.dtype} on {g.device} but the parameter is {p.dtype} on {p.device} "
                    f"({where}, parameter {i})"
                )
            state = self.state.get(p, {})
            problem = state_problem(
                p, state, keys, not group.get("capturable"), f" ({where}, parameter {i})", self.spec.history
            )
            if problem:
                raise RuntimeError(problem)
            if forced or group.get("capturable"):
                kernel = self._kernel(
                    group, p.device.type, self._layout(p, g, state, group), f" ({where}, parameter {i})"
                )
                if group.get("capturable") and not kernel.capturable:
                    raise NotImplementedError(
                        f"capturable=True needs the triton kernels; {kernel.backend} would step this tensor "
                        f"({where}, parameter {i})"
                    )
            triples.append((i, p, g))
        return triples

    # ------------------------------------------------------------------------- step
    @torch.compiler.disable  # under torch.compile: a graph break, the step run eagerly (see README)
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step.

        Every group is checked before anything changes; then each group's
        parameters are updated by one kernel call per (dtype, state dtype).

        Args:
            closure: optional callable that re-evaluates the model and returns the
                loss; it runs with gradients enabled.

        Returns:
            The closure's loss, or None.
        """
        self._check_not_captured()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._settle_counts(wait=False)
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if not isinstance(self.state, TrackedState):  # reassigned, e.g. ``opt.state = defaultdict(dict)``
            self.state = TrackedState(self.state)
        work = [self._prepare(i, group) for i, group in enumerate(self.param_groups)]
        on_device = all(group.get("capturable") for group in self.param_groups)
        if found_inf is not None and not on_device and float(found_inf) != 0:  # GradScaler saw inf/NaN: skip
            return loss
        if self.nonfinite in ("skip", "raise") and self._screen(work):
            return loss
        seed = None
        if any(group.get("stochastic_rounding") for group in self.param_groups):
            seed = int(torch.randint(0, 2**32, (), dtype=torch.int64))  # torch.manual_seed reproduces it
        amp = (grad_scale, found_inf if on_device else None)
        masked = [self._run(w, seed if w.group.get("stochastic_rounding") else None, amp) for w in work]
        on_host = sum(m for m in masked if not isinstance(m, Tensor))
        if on_host:
            self._note_nonfinite(on_host, "masked: their parameters and moments were left unchanged")
        for count in (m for m in masked if isinstance(m, Tensor)):
            event = torch.cuda.Event() if count.is_cuda else None
            if event is not None:  # after the count's kernel: on its device's stream, not the current device's
                event.record(torch.cuda.current_stream(count.device))
            self._pending_counts.append((count, event))
        self._settle_counts(wait=False)
        return loss

    def _check_not_captured(self) -> None:
        """torch's check: a step inside a CUDA graph capture needs ``capturable=True`` in
        every group (the host path's step scalars and counts would be frozen into the
        graph: every replay would repeat the captured step's bias corrections)."""
        if not torch.cuda.is_available() or not torch.cuda.is_current_stream_capturing():
            return
        if not all(group.get("capturable") for group in self.param_groups):
            raise RuntimeError(
                f"Attempting CUDA graph capture of step() for an instance of {type(self).__name__} but "
                "param_groups' capturable is False."
            )

    def _prepare(self, index: int, group: Mapping[str, Any]) -> _Work:
        """Validate one group's step (nothing changes) and say how it will run."""
        capturable = bool(group.get("capturable"))
        check_hyperparameters(group, f" (param group {index})", read_device=not capturable)
        plan = None if group.get("differentiable") else self._plan_for(index, group)
        if plan is not None:
            launch, grads, stale = plan.prepare()
            if stale:  # a parameter's dtype, size or layout changed: a plan for them, if one fits
                self._plans.pop(index, None)
                plan = self._plan_for(index, group)
                launch, grads, _ = plan.prepare() if plan is not None else (None, None, False)
            if launch is not None and not (capturable and launch.idx is not None):  # capturable: all or general
                return _Work(index, group, launch=launch, all_grads=grads)
        return _Work(index, group, triples=self._collect(index, group))

    def _run(
        self, work: _Work, sr_seed: int | None, amp: tuple[Tensor | None, Tensor | None] = (None, None)
    ) -> int | Tensor:
        group = work.group
        flags = dict(
            # a group's ``amsgrad`` means nothing to a variant without it (torch ignores it too)
            amsgrad=bool(group.get("amsgrad", False)) and self.spec.amsgrad_key is not None,
            maximize=bool(group["maximize"]),
            mask_nonfinite=self.nonfinite == "mask",
            sr_seed=sr_seed,
        )
        if work.launch is not None and group.get("capturable"):
            del flags["sr_seed"]  # capturable steps reject stochastic rounding
            scalars = partial(self._capturable_scalars, group, maximize=flags["maximize"])  # (steps, dtype, kernel)
            count = self._device_counter(work.launch.plan.device)
            out = work.launch.run_on_device(self.state, scalars, amp=amp, count=count, **flags)
            torch.autograd.graph.increment_version(work.launch.stepped())  # as torch's in-place step does
            return out
        if work.launch is not None:
            grad_scale = amp[0]
            if grad_scale is not None and not all(seg.kernel.amp_scale for seg in work.launch.plan.segments):
                grads = [g for _, g in work.grads()]  # unscaled first, as on the general path
                torch._foreach_div_(grads, grad_scale.to(work.launch.plan.device))
                grad_scale = None
            out = work.launch.run(
                self.state, partial(self._step_scalars, group), self.spec.tensor_scalars, self._advance(group),
                grad_scale=grad_scale, **flags,
            )  # fmt: skip
            # the kernels write through addresses: autograd is told, as torch's in-place step
            # tells it, so a graph that saved a parameter before the step refuses to use it
            torch.autograd.graph.increment_version(work.launch.stepped())
            return out
        if group.get("capturable"):
            return self._step_capturable(group, work.triples, amp, **flags)
        if group.get("differentiable"):
            with torch.enable_grad():  # step() runs without: only this group's step is recorded
                return self._step_differentiable(group, work.triples, grad_scale=amp[0], **flags)
        return self._step_group(group, work.triples, grad_scale=amp[0], **flags)

    def _plan_for(self, index: int, group: Mapping[str, Any]) -> GroupPlan | None:
        """The cached plan of a group whose parameters a table kernel takes, else None."""
        params = group["params"]
        keys = self._state_keys(group)
        capturable = bool(group.get("capturable"))
        signature = (keys, group["backend"], group["fused"], group["state_bits"], _scalar_dtype(), capturable)
        if not isinstance(self.state, TrackedState):  # reassigned, e.g. ``opt.state = defaultdict(dict)``
            self.state = TrackedState(self.state)
        plan = self._plans.get(index)
        if plan is not None and plan.intact(params, self.state, signature):
            return plan
        self._plans.pop(index, None)
        if not params:
            return None
        kernels, state_dtypes = [], []
        if group.get("percentile_clipping", 100) < 100:
            return None  # per-parameter gradient norms: the general path
        device = params[0].device
        if device.type not in ("cpu", "cuda") or len(set(map(id, params))) != len(params):
            return None
        for p in params:
            state = self.state.get(p) or {}
            if p.device != device or p.is_complex() or not is_plain(p):
                return None  # the general path handles (or explains) it
            if state_problem(p, state, keys, read_step=not capturable, history=self.spec.history):
                return None
            layout = self._layout(p, None, state, group)
            try:
                kernel = self._kernel(group, device.type, layout)
            except KernelUnavailableError:
                return None  # the general path raises it, naming the parameter
            if kernel.tables is None or (capturable and not kernel.capturable):
                return None
            kernels.append(kernel)
            state_dtypes.append(layout[1])
        history = {}
        for key, initial in self.spec.history.items():  # one flat tensor each: one dtype (loaded ones may differ)
            kept = {st[key].dtype for st in map(self.state.get, params) if st and isinstance(st.get(key), Tensor)}
            if len(kept) > 1:
                return None
            history[key] = (kept.pop() if kept else _scalar_dtype(), initial)
        plan = GroupPlan(
            params, kernels, self.state, keys, state_dtypes, _scalar_dtype(), signature, capturable, history
        )
        self._plans[index] = plan
        return plan

    def _screen(self, work: list[_Work]) -> bool:
        """For "skip"/"raise": True if this step must be skipped (raise: raises)."""
        pairs = [(w.index, i, g) for w in work for i, g in w.grads()]
        where = [(gi, pi) for gi, pi, _ in pairs]
        grads = [g for _, _, g in pairs]
        bad = reference.nonfinite_indices(grads)
        if not bad:
            return False
        count = sum(int((~torch.isfinite(grads[i])).sum()) for i in bad)
        if self.nonfinite == "raise":
            gi, pi = where[bad[0]]
            raise FloatingPointError(
                f"{type(self).__name__}: {count} non-finite gradient element(s) in {len(bad)} tensor(s), "
                f"the first in param group {gi}, parameter {pi}; nothing was changed"
            )
        self.skipped_steps += 1
        self._note_nonfinite(count, "seen: the whole step was skipped")
        return True

    def _note_nonfinite(self, count: int, what: str, add: bool = True) -> None:
        """Count ``count`` non-finite elements (unless counted elsewhere) and warn once."""
        if add:
            self._nonfinite_count += count
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                f"{type(self).__name__}: {count} non-finite gradient element(s) {what} "
                f"(nonfinite={self.nonfinite!r}). Further occurrences are counted in "
                "`.nonfinite_count` without warning.",
                RuntimeWarning,
                stacklevel=_user_stacklevel(),
            )

    def _state_format(self, p: Tensor, group: Mapping[str, Any]) -> StateFormat:
        """The format of a new parameter's state: quantized for ``state_bits`` 8 or 4 and
        a real floating-point parameter of at least ``min_quant_size`` elements; else the
        dtype of :meth:`_state_dtype`."""
        overrides = self._param_overrides(p)
        if overrides:
            group = {**group, **overrides}
        bits = group["state_bits"]
        if bits in QUANT_BITS and p.is_floating_point() and p.numel() >= group.get("min_quant_size", 4096):
            block = group.get("block_size") or DEFAULT_BLOCK[bits]
            return QuantFormat(bits, block if group.get("block_wise", True) else None)
        return self._state_dtype(p, group)

    def _param_overrides(self, p: Tensor) -> Mapping[str, Any]:
        """Group keys overridden for one parameter's state format (hook: see
        :class:`adamkit.bnb.GlobalOptimManager`)."""
        return {}

    def _state_dtype(self, p: Tensor, group: Mapping[str, Any]) -> torch.dtype:
        """The dtype of a new parameter's state.

        ``state_bits=32``: float32 for bf16/fp16 parameters (torch keeps their dtype;
        fp32 moments cost nothing extra on a memory-bound step and keep small updates
        from vanishing), the parameter's dtype otherwise. ``state_bits=16``: bfloat16
        (fp16 would underflow the second moment) — except for complex parameters,
        whose state keeps their dtype.
        """
        if p.is_complex() or not p.is_floating_point():
            return p.dtype
        if group["state_bits"] == 16:
            return torch.bfloat16
        return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype

    def _layout(
        self, p: Tensor, g: Tensor | None, state: Mapping[str, Any], group: Mapping[str, Any]
    ) -> tuple[torch.dtype, StateFormat, bool]:
        """(param dtype, state format, flat) of one parameter, for kernel choice.

        ``flat``: the kernels may step parameter, gradient and state as flat arrays:
        all contiguous, or, for 32/16-bit state without stochastic rounding, all laid
        out alike in dense memory (``channels_last`` convolution weights, whose
        gradients and ``zeros_like`` state torch lays out so). Quantized state is in the
        elements' logical order, and stochastic rounding draws by it, so those need
        contiguous parameters and gradients. A parameter without state yet gets state
        of :meth:`_state_format`, laid out as the parameter.
        """
        scalars = ("step", *EXTRA_STATE, *HISTORY)
        tensors = [v for k, v in state.items() if k not in scalars and isinstance(v, Tensor)]
        fmt = quant_format_of(state) or (tensors[0].dtype if tensors else self._state_format(p, group))
        if not all(map(is_plain, [p, *tensors] if g is None else [p, g, *tensors])):
            return p.dtype, fmt, False  # a subclass's data_ptr() may not be where its elements are
        if p.is_contiguous() and (g is None or g.is_contiguous()) and all(t.is_contiguous() for t in tensors):
            return p.dtype, fmt, True
        if isinstance(fmt, QuantFormat) or (group.get("stochastic_rounding") and p.dtype == torch.bfloat16):
            return p.dtype, fmt, False
        order = storage_order(p)
        flat = order is not None and all(storage_order(t) == order for t in ([] if g is None else [g]) + tensors)
        return p.dtype, fmt, flat

    def _init_state(self, p: Tensor, group: Mapping[str, Any]) -> dict[str, Any]:
        device = p.device if group.get("capturable") else None  # capturable: as torch, on the device
        state: dict[str, Any] = {"step": torch.zeros((), dtype=_scalar_dtype(), device=device)}
        for key, initial in self.spec.history.items():  # as torch keeps them: beside ``step``
            state[key] = torch.full((), initial, dtype=_scalar_dtype(), device=device)
        self._add_missing_state(p, state, self._state_format(p, group), group)
        return state

    def _add_missing_state(self, p: Tensor, state: dict[str, Any], fmt: StateFormat, group: Mapping[str, Any]) -> None:
        """Zero state for every key the group needs and ``state`` lacks (all of them for a
        new parameter; AMSGrad's maximum when amsgrad is switched on mid-run)."""
        if isinstance(fmt, QuantFormat):
            for key, value in quant_meta(fmt).items():
                state.setdefault(key, value)
            for column in state_columns(self._state_keys(group), fmt):
                if column not in state:
                    dtype = torch.uint8 if column.endswith("_codes") else torch.float32
                    state[column] = torch.zeros(_expected_shape(column, p, fmt), dtype=dtype, device=p.device)
            return
        for key in self._state_keys(group):
            if key not in state:
                state[key] = _memory.zeros_like(p, fmt)

    def _step_group(
        self,
        group: Mapping[str, Any],
        triples: list[tuple[int, Tensor, Tensor]],
        *,
        amsgrad: bool,
        maximize: bool,
        mask_nonfinite: bool,
        sr_seed: int | None,
        grad_scale: Tensor | None = None,
    ) -> int | Tensor:
        """The general path: advance each parameter one step, bucketed by layout and step.

        With an AMP ``grad_scale``, the gradients are divided by it in place (as torch's
        fused kernels leave them): inside the Triton kernels, by ``_foreach_div_`` first
        for the others."""
        if not triples:
            return 0
        keys = self._state_keys(group)
        states = []
        for _, p, _ in triples:
            if not self.state[p]:
                self.state[p] = self._init_state(p, group)
            state = self.state[p]
            existing = quant_format_of(state) or state[keys[0]].dtype
            self._add_missing_state(p, state, existing, group)  # e.g. amsgrad switched on mid-run
            states.append(state)
        steps = [st["step"] for st in states]
        torch._foreach_add_(steps, 1.0)
        step_values = torch.stack([s.to("cpu", torch.float64) for s in steps]).tolist()
        history = self._advanced_history(group, states, step_values)
        if group.get("percentile_clipping", 100) < 100:
            triples = self._clip_percentile(triples, states, step_values, group["percentile_clipping"])
        buckets: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        for i, ((_, p, g), st, t, h) in enumerate(zip(triples, states, step_values, history)):
            buckets[(p.device, self._layout(p, g, st, group), t, h)].append(i)
        masked: int | Tensor = 0
        for (device, layout, t, h), idx in buckets.items():
            fmt = layout[1]
            extra: dict[str, Any] = {"fmt": fmt} if isinstance(fmt, QuantFormat) else {}
            kernel = self._kernel(group, device.type, layout)
            grads = [triples[i][2] for i in idx]
            if grad_scale is not None:
                if kernel.amp_scale:
                    extra["amp"] = (grad_scale.to(device), None)
                else:
                    torch._foreach_div_(grads, grad_scale.to(device))
            masked = masked + kernel.fn(
                [triples[i][1] for i in idx],
                grads,
                {k: [states[i][k] for i in idx] for k in state_columns(keys, fmt)},
                self._step_scalars(group, t, dict(zip(self.spec.history, h))),
                **extra,
                amsgrad=amsgrad,
                maximize=maximize,
                mask_nonfinite=mask_nonfinite,
                sr_seed=sr_seed,
                salts=[triples[i][0] for i in idx],
            )
        return masked

    def _advanced_history(
        self, group: Mapping[str, Any], states: list[dict[str, Any]], steps: list[float]
    ) -> list[tuple[float, ...]]:
        """Each parameter's history (``spec.history``) updated for the step it takes now,
        as values (one tuple per parameter; empty for algorithms without history)."""
        names = tuple(self.spec.history)
        advance = self._advance(group)
        if advance is None:
            return [()] * len(states)
        for st in states:
            for key in names:
                if not isinstance(st[key], Tensor):  # a loaded float, say
                    st[key] = torch.tensor(float(st[key]), dtype=_scalar_dtype(), device=st["step"].device)
        advance(steps, {key: [st[key] for st in states] for key in names})
        values = torch.stack([st[key].to("cpu", torch.float64) for st in states for key in names])
        return [tuple(row) for row in values.view(len(states), len(names)).tolist()]

    def _step_differentiable(
        self,
        group: Mapping[str, Any],
        triples: list[tuple[int, Tensor, Tensor]],
        *,
        amsgrad: bool,
        maximize: bool,
        mask_nonfinite: bool,
        sr_seed: int | None,
        grad_scale: Tensor | None = None,
    ) -> int:
        """``differentiable=True``: each parameter stepped by its algorithm's rule written
        for autograd (:func:`~adamkit.kernels.reference.differentiable_step_`), with
        gradients enabled, so that the new parameters and state carry a graph back to the
        gradients, the previous state and tensor hyperparameters. Never a fused kernel
        nor a cached plan. Returns the count of masked elements."""
        keys = self._state_keys(group)
        steps = [self.state.get(p, {}).get("step") for _, p, _ in triples]
        if any(isinstance(t, Tensor) and t.requires_grad for t in steps):  # checked before anything changes
            raise RuntimeError("`requires_grad` is not supported for `step` in differentiable mode")
        beta1, beta2 = group["betas"]
        hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
        rule = reference.DIFFERENTIABLE_RULES[self.algorithm]
        masked = 0
        for _, p, g in triples:
            if not self.state[p]:
                self.state[p] = self._init_state(p, group)
            state = self.state[p]
            self._add_missing_state(p, state, state[keys[0]].dtype, group)  # e.g. amsgrad switched on
            state["step"] += 1
            history = {k: state[k] for k in self.spec.history}  # the rule advances them, recorded by autograd
            masked += reference.differentiable_step_(
                rule,
                p,
                g if grad_scale is None else g / grad_scale.to(g.device),
                [state[k] for k in keys],
                float(state["step"]),
                {**hyper, **history, **{k: group[k] for k in self.spec.hyper}},
                amsgrad=amsgrad,
                maximize=maximize,
                decoupled=bool(group.get("decoupled_weight_decay", False)),
                mask_nonfinite=mask_nonfinite,
            )
        return masked

    def _capturable_scalars(
        self, group: Mapping[str, Any], steps: Tensor, param_dtype: torch.dtype, kernel: Kernel, *, maximize: bool
    ) -> Any:
        """A capturable step's scalars for tensors at step counts ``steps`` (float64 [n],
        on the device), computed there (the algorithm's ``device_scalars``) and laid out
        for ``kernel`` by its ``device_tables``; the decay is computed on the device from a
        tensor ``lr``."""
        lr = group["lr"]
        hyper = self.spec.hyperparameters({**group, "lr": 0.0} if isinstance(lr, Tensor) else group)
        step_size, inv, decay, l2 = self.spec.device_scalars(hyper, lr, steps)
        work = np.float64 if param_dtype in (torch.float64, torch.complex128) else np.float32
        fixed = float(decay) if not isinstance(decay, Tensor) else 1.0
        s = StepScalars(hyper["beta1"], hyper["beta2"], hyper["eps"], 0.0, 1.0, fixed, l2)
        consts = rule_consts(s, maximize, work)
        return kernel.device_tables(steps, step_size, inv, consts, decay if isinstance(decay, Tensor) else None)

    def _device_counter(self, device: torch.device) -> Tensor:
        """The device-side count of masked elements of capturable steps on ``device``."""
        counters = self.__dict__.setdefault("_device_counts", {})
        if device not in counters:
            counters[device] = torch.zeros(1, dtype=torch.int32, device=device)
        return counters[device]

    def _step_capturable(
        self,
        group: Mapping[str, Any],
        triples: list[tuple[int, Tensor, Tensor]],
        amp: tuple[Tensor | None, Tensor | None],
        *,
        amsgrad: bool,
        maximize: bool,
        mask_nonfinite: bool,
        sr_seed: int | None,
    ) -> int:
        """A step that reads nothing on the host, so that it can run inside a CUDA graph:
        ``step`` counters on the device, advanced there (by ``1 - found_inf`` under
        GradScaler), the step scalars computed there from them and ``lr`` (a float, or a
        tensor on the device), the Triton kernels' tables found on the device (made by
        a warm-up step), masked elements counted on the device."""
        if not triples:
            return 0
        keys = self._state_keys(group)
        layouts = [self._layout(p, g, self.state.get(p, {}), group) for _, p, g in triples]  # checked: _collect
        for _, p, _ in triples:
            if not self.state[p]:
                self.state[p] = self._init_state(p, group)
            state = self.state[p]
            self._add_missing_state(p, state, quant_format_of(state) or state[keys[0]].dtype, group)
            if state["step"].device != p.device:  # e.g. loaded from a checkpoint
                state["step"] = state["step"].to(p.device)
        steps = [self.state[p]["step"] for _, p, _ in triples]
        torch._foreach_add_(steps, 1.0)
        buckets: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        for i, ((_, p, _), layout) in enumerate(zip(triples, layouts)):
            buckets[(p.device, layout)].append(i)
        grad_scale, found_inf = amp
        for (device, layout), idx in buckets.items():
            fmt = layout[1]
            t = torch.stack([steps[i] for i in idx]).to(torch.float64)
            kernel = self._kernel(group, device.type, layout)
            kernel.fn(
                [triples[i][1] for i in idx],
                [triples[i][2] for i in idx],
                {k: [self.state[triples[i][1]][k] for i in idx] for k in state_columns(keys, fmt)},
                self._capturable_scalars(group, t, layout[0], kernel, maximize=maximize),
                **({"fmt": fmt} if isinstance(fmt, QuantFormat) else {}),
                amsgrad=amsgrad,
                maximize=maximize,
                mask_nonfinite=mask_nonfinite,
                sr_seed=None,
                salts=[triples[i][0] for i in idx],
                amp=(grad_scale, found_inf) if grad_scale is not None or found_inf is not None else None,
                count=self._device_counter(device),
            )
        if found_inf is not None:  # a skipped step does not count
            torch._foreach_sub_(steps, [found_inf.to(steps[0].device, steps[0].dtype)] * len(steps))
        return 0

    @staticmethod
    def _clip_percentile(
        triples: list[tuple[int, Tensor, Tensor]], states: list[dict[str, Any]], steps: list[float], percentile: int
    ) -> list[tuple[int, Tensor, Tensor]]:
        """bitsandbytes' percentile clipping, per parameter: record the squared L2 norm of
        the gradient at ``step % 100`` of a 100-entry history (``state["gnorm_vec"]``; the
        first step fills every entry), and scale the gradient down to the norm at the
        ``percentile``-th place of the sorted history when it exceeds it. The gradient
        itself is not modified (the kernel gets a scaled copy). A non-finite norm is
        neither recorded nor used: the non-finite policy deals with that gradient."""
        norms = torch._foreach_norm([g for _, _, g in triples])
        out = []
        for (i, p, g), st, t, norm in zip(triples, states, steps, norms):
            sq = float(norm) ** 2
            vec = st.get("gnorm_vec")
            if vec is None:
                vec = st["gnorm_vec"] = torch.zeros(100, dtype=torch.float32)
            if not math.isfinite(sq):
                out.append((i, p, g))
                continue
            if int(t) == 1:
                vec.fill_(sq)
            else:
                vec[int(t) % 100] = sq
            current = math.sqrt(float(vec[int(t) % 100]))
            clip = math.sqrt(float(vec.sort().values[min(percentile, 99)]))
            out.append((i, p, g * (clip / current) if current > clip else g))
        return out

    # ------------------------------------------------------------------ checkpoints
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a checkpoint of this optimizer or of ``torch.optim.Adam/AdamW/Adamax``.

        Everything is validated first — group count, parameters per group, state
        keys, shapes and dtypes, hyperparameters — and any mismatch raises
        ValueError naming the group and parameter, leaving the optimizer as it was.

        Unlike torch, state tensors are moved to the parameter's device but keep
        their dtype (fp32 moments of a bf16 parameter stay fp32), and they are
        copied, so the loaded optimizer never shares storage with ``state_dict``.
        Group keys that choose an implementation (:data:`IMPLEMENTATION_KEYS`) keep
        this optimizer's values; the math (lr, betas, eps, weight decay, amsgrad,
        maximize) and any other keys (e.g. a scheduler's ``initial_lr``) come from
        the checkpoint.
        """
        state_dict = dict(state_dict) if isinstance(state_dict, Mapping) else state_dict
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups, state = self._validated(state_dict)
        self.__setstate__({"state": state, "param_groups": groups})
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _validated(self, state_dict: Any) -> tuple[list[dict[str, Any]], defaultdict[Tensor, dict]]:
        if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError("a state_dict must be a mapping with 'state' and 'param_groups'")
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if not isinstance(saved_state, Mapping):
            raise ValueError(f"a state_dict's 'state' must be a mapping, got {type(saved_state).__name__}")
        if not isinstance(saved_groups, (list, tuple)) or not all(
            isinstance(g, Mapping) and isinstance(g.get("params"), (list, tuple)) for g in saved_groups
        ):
            raise ValueError("a state_dict's 'param_groups' must be a list of mappings, each with a 'params' list")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(saved_groups)} parameter groups, "
                f"this optimizer has {len(self.param_groups)}"
            )
        id_map: dict[Any, tuple[int, int, Tensor]] = {}
        groups = []
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"param group {gi}: loaded state dict has {len(saved['params'])} parameters, "
                    f"this optimizer's group has {len(group['params'])}"
                )
            id_map.update({sid: (gi, pi, p) for pi, (sid, p) in enumerate(zip(saved["params"], group["params"]))})
            new = {k: deepcopy(v) for k, v in saved.items() if k != "params"}
            new.update({k: group[k] for k in IMPLEMENTATION_KEYS if k in group})
            for k, v in group.items():
                new.setdefault(k, v)
            new["params"] = group["params"]
            self._normalize_loaded_group(new)
            check_hyperparameters(new, f" (param group {gi} of the loaded state dict)")
            groups.append(new)
        state: defaultdict[Tensor, dict[str, Any]] = defaultdict(dict)
        for sid, saved in saved_state.items():
            if sid not in id_map:
                raise ValueError(f"loaded state dict has state for parameter id {sid!r}, which no group lists")
            gi, pi, p = id_map[sid]
            loaded = self._loaded_param_state(saved, p, groups[gi], f"param group {gi}, parameter {pi}")
            if loaded:
                state[p] = loaded
        return groups, state

    def _loaded_param_state(self, saved: Any, p: Tensor, group: Mapping[str, Any], where: str) -> dict[str, Any]:
        """One parameter's state from a checkpoint, checked and moved to its device."""
        if not isinstance(saved, Mapping):
            raise ValueError(f"{where}: state must be a dict, got {type(saved).__name__}")
        if not saved:
            return {}
        keys = self._state_keys(group)
        saved_fmt = self._saved_format(saved, where)
        # AMSGrad's maximum may be missing (amsgrad switched on since the parameter was last
        # stepped): the next step creates it, as it does without a checkpoint
        columns = state_columns([k for k in keys if k != "max_exp_avg_sq"], saved_fmt or p.dtype)
        needed = ["step", *self.spec.history, *columns]
        missing = [k for k in needed if k not in saved]
        if missing:
            raise ValueError(
                f"{where}: state lacks {missing} (has {sorted(saved)}); "
                f"{type(self).__name__} with these settings needs {needed}"
            )
        problem = _step_problem(saved["step"], read=True)
        for key in self.spec.history:
            problem = problem or _history_problem(key, saved[key], read=True)
        if problem:
            raise ValueError(f"{where}: {problem}")
        out: dict[str, Any] = {"step": torch.tensor(float(saved["step"]), dtype=_scalar_dtype())}
        for key in self.spec.history:
            # kept on the CPU in the checkpoint's dtype, as ``step`` (torch casts it to a
            # floating parameter's dtype: a bf16 ``mu_product``), so a run continues bit for bit
            value = saved[key]
            if isinstance(value, Tensor):
                out[key] = value.detach().reshape(()).to("cpu", copy=True)
            else:
                out[key] = torch.tensor(float(value), dtype=_scalar_dtype())
        dense: dict[str, Tensor] = {}
        for key, value in saved.items():
            if key == "step" or key in QUANT_META or key in HISTORY:
                continue
            if not isinstance(value, Tensor):
                raise ValueError(f"{where}: state {key!r} must be a tensor, got {type(value).__name__}")
            if value.layout != torch.strided or value.is_nested:
                raise ValueError(f"{where}: state {key!r} is a {value.layout} tensor; state tensors are dense")
            want = _expected_shape(key, p, saved_fmt or p.dtype)
            if tuple(value.shape) != want:
                raise ValueError(f"{where}: state {key!r} has shape {tuple(value.shape)}, expected {want}")
            if key in EXTRA_STATE or saved_fmt is not None:
                kind = torch.float32 if key in EXTRA_STATE or key.endswith("_absmax") else torch.uint8
                if value.dtype != kind:
                    raise ValueError(f"{where}: state {key!r} is {value.dtype}, expected {kind}")
                if key.endswith("_absmax") and not bool(((value >= 0) & value.isfinite()).all()):
                    raise ValueError(f"{where}: state {key!r} holds negative or non-finite block scales")
                out[key] = value.detach().to(device=p.device, copy=True)
                continue
            if value.is_complex() != p.is_complex() or not (value.is_floating_point() or value.is_complex()):
                raise ValueError(
                    f"{where}: state {key!r} is {value.dtype}, which cannot hold a {p.dtype} parameter's state"
                )
            dense[key] = value.detach().to(device=p.device, copy=True)
        dtypes = {k: str(dense[k].dtype) for k in (*keys, *_MOMENTS) if k in dense}
        if len(set(dtypes.values())) > 1:
            raise ValueError(f"{where}: state tensors must share one dtype, got {dtypes}")
        return self._converted(out, dense, saved_fmt, p, group)

    @staticmethod
    def _saved_format(saved: Mapping[str, Any], where: str) -> QuantFormat | None:
        """The quantized format a checkpoint's parameter state names, checked."""
        if not any(k in saved for k in QUANT_META):
            return None
        try:
            return QuantFormat.from_key(int(saved["quant_bits"]), int(saved["quant_block"]), saved.get("quant_dither"))
        except (KeyError, TypeError, ValueError) as err:
            got = {k: saved.get(k) for k in QUANT_META}
            raise ValueError(f"{where}: bad quantized-state format {got}: {err}") from None

    def _converted(
        self,
        out: dict[str, Any],
        dense: dict[str, Tensor],
        saved_fmt: QuantFormat | None,
        p: Tensor,
        group: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Loaded state in the format this optimizer gives ``p``: quantized state of the
        same format is kept code for code; otherwise it is decoded (to float32) and, for a
        quantized target, encoded again. Dense state for a dense target keeps its dtype."""
        target = self._state_format(p, group)
        step = int(out["step"])  # dithered codes were written at it
        if saved_fmt is not None and saved_fmt == target:
            out.update(quant_meta(target))
            return out
        if saved_fmt is not None:  # decode
            n = p.numel()
            for key in [k for k in _MOMENTS if f"{k}_codes" in out]:
                book = saved_fmt.codebook(key)
                flat = dequantize(out.pop(f"{key}_codes"), out.pop(f"{key}_absmax"), saved_fmt, book, n, step)
                dense[key] = flat.view(p.shape)
        if isinstance(target, QuantFormat):
            out.update(quant_meta(target))
            for key in [k for k in _MOMENTS if k in dense]:
                codes, absmax = quantize(dense.pop(key).real, target, target.codebook(key), step)
                out[f"{key}_codes"], out[f"{key}_absmax"] = codes, absmax
        out.update(dense)
        return out
