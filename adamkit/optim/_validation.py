"""Validation: what makes hyperparameters, a param group, a parameter's state or a
gradient unfit, found before anything changes.

Module-level checks of values (:func:`check_hyperparameters`, :func:`state_problem`,
shared with checkpoint loading and the stepping code) and the mixin of
:class:`~adamkit.optim._base.AdamFamily` that checks param groups when they are added
and each group's parameters and gradients before a step, and chooses their kernels.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import _managed
from ..kernels.registry import (
    FUSED_BACKENDS,
    STATE_BITS,
    Kernel,
    KernelUnavailableError,
    check_backend_request,
    is_forced,
    resolve,
)
from ..quant import QUANT_BITS, QuantFormat
from ..spec import HISTORY, Algorithm
from ._plan import TrackedState
from ._sharded import is_sharded, local, quant_shape, rows_quantizable
from ._state import _MOMENTS, EXTRA_STATE, QUANT_META, _expected_shape, quant_format_of

#: ``quant_map``'s values: bitsandbytes' dynamic maps (the default) or the tapered maps
#: (8-bit state; 4-bit state keeps its maps whatever it says).
QUANT_MAPS = ("dynamic", "tapered")


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


def _sharding_problem(key: str, t: Tensor, p: Tensor, replicated: bool, fmt: QuantFormat | None = None) -> str | None:
    """What makes a state tensor's sharding unfit for its parameter's: a DTensor
    parameter's state is DTensors on its mesh and placements, whose local tensors have
    the local parameter's shape (quantized ``fmt``: its rows' codes and scales;
    ``replicated``: a plain host-side tensor, as percentile clipping's history); a plain
    parameter's state is plain."""
    if replicated or not is_sharded(p):
        return f"state {key!r} is a DTensor but the parameter is not" if is_sharded(t) else None
    if not is_sharded(t):
        return f"state {key!r} is a {type(t).__name__}, not a DTensor as its parameter"
    if t.device_mesh != p.device_mesh or tuple(t.placements) != tuple(p.placements):
        return (
            f"state {key!r} is sharded as {tuple(t.placements)} on {t.device_mesh}, its parameter as "
            f"{tuple(p.placements)} on {p.device_mesh}"
        )
    lt, lp = local(t), local(p)
    if fmt is not None:  # the kernels step the local codes and scales flat, block by block
        if not rows_quantizable(p, fmt.block_size, bool(fmt.dither)):
            return f"state {key!r} is quantized in blocks of {fmt.block_size}, which this parameter's shards cut"
        if not lt.is_contiguous():
            return f"state {key!r}'s local tensor is not contiguous"
    want = tuple(lp.shape) if fmt is None else quant_shape(p, fmt, key, lp.shape)
    if tuple(lt.shape) != want:
        return f"state {key!r} holds a local {tuple(lt.shape)} shard for a local {tuple(lp.shape)} parameter"
    return None


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
        problem = _sharding_problem(key, t, p, key in EXTRA_STATE, fmt)
        if problem:
            return problem + where
        if not _in_its_storage(local(t)):
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
    quant_map = group.get("quant_map", "dynamic")
    if not isinstance(quant_map, str) or quant_map not in QUANT_MAPS:  # new state's format reads it
        raise ValueError(f"quant_map must be one of {QUANT_MAPS}, got {quant_map!r}{where}")


class _Validation:
    """:class:`~adamkit.optim._base.AdamFamily`'s checks of param groups, parameters and
    gradients, and its choice of kernel.

    Expects of the optimizer: ``spec``, ``_state_keys`` and ``_layout`` (:mod:`._state`).
    """

    algorithm: ClassVar[str]
    spec: Algorithm
    defaults: dict[str, Any]
    param_groups: list[dict[str, Any]]
    state: TrackedState
    nonfinite: str

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
        if not isinstance(group.get("paged", False), bool):
            raise TypeError(f"paged must be a bool, got {group['paged']!r}{where}")
        if group.get("paged"):
            devices = {local(p).device.type for p in params if isinstance(p, Tensor)} - {"meta"}
            if devices - {"cpu", "cuda"}:
                raise ValueError(
                    f"paged state lives in memory-mapped files (CPU) or CUDA managed memory; "
                    f"{sorted(devices - {'cpu', 'cuda'})} parameters cannot page{where}: use paged=False"
                )
            for index in sorted({local(p).device.index or 0 for p in params if local(p).device.type == "cuda"}):
                _managed.check_device(index)  # RuntimeError, saying what is missing, before anything changes
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
        return resolve(self.algorithm, device_type, bits, "auto", fused=False)  # the reference

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
            if is_sharded(g) != is_sharded(p):
                raise RuntimeError(
                    f"gradient is a {type(g).__name__} but the parameter is a {type(p).__name__} "
                    f"({where}, parameter {i})"
                )
            if is_sharded(p) and (g.device_mesh != p.device_mesh or tuple(g.placements) != tuple(p.placements)):
                g = g.redistribute(p.device_mesh, p.placements)  # stepped shard by shard, as the parameter
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
                layout = self._layout(p, g, state, group)
                kernel = self._kernel(group, p.device.type, layout, f" ({where}, parameter {i})")
                if group.get("capturable") and is_sharded(p) and isinstance(layout[1], QuantFormat):
                    raise NotImplementedError(
                        f"capturable=True steps a DTensor parameter's state at 32 or 16 bits, not quantized "
                        f"({where}, parameter {i})"
                    )
                if group.get("capturable") and not kernel.capturable:
                    raise NotImplementedError(
                        f"capturable=True needs the triton kernels; {kernel.backend} would step this tensor "
                        f"({where}, parameter {i})"
                    )
            triples.append((i, p, g))
        return triples
