"""Optimizer state between torch and MLX: a run started in one continues in the other.

A torch ``state_dict`` (adamkit's, at any state width, or ``torch.optim``'s Adam,
AdamW, Adamax or NAdam) names parameters by their index in the optimizer's groups; MLX's
state is a tree named like the model's parameters. ``names`` joins the two: the MLX path
of the parameter at each torch index (``tree_flatten``'s dotted paths), or, for a
``state_dict`` saved by an optimizer built from ``named_parameters()``, its
``param_names``.

Layouts: torch's convolution weights are ``(out, in, *kernel)``, MLX's ``(out, *kernel,
in)``. A parameter of three or more dimensions is taken for a convolution weight and its
state permuted so; ``layouts={path: permutation}`` says otherwise (the permutation takes
the torch tensor's axes to MLX's, ``None`` for none: a transposed convolution's torch
weight ``(in, out, kh, kw)`` is MLX's ``(out, kh, kw, in)`` under ``(1, 2, 3, 0)``).
Quantized state is blocked in element order, so a permuted parameter's state is decoded,
permuted and encoded again at the same step; everywhere else codes and block scales
cross exactly.

Steps: torch keeps one per parameter, MLX one per optimizer. Parameters whose steps
differ are refused with an error naming them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np
import torch
from mlx.utils import tree_flatten, tree_unflatten

from ..quant import QuantFormat, dequantize, quantize

if TYPE_CHECKING:
    from .optimizers import AdamFamily

#: torch.optim's group entries per algorithm (besides lr, betas, eps, weight_decay).
_TORCH_GROUP = {
    "adam": ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay"),
    "adamax": ("maximize", "foreach", "capturable", "differentiable"),
    "nadam": ("maximize", "foreach", "capturable", "differentiable", "decoupled_weight_decay", "momentum_decay"),
}
_QUANT_META = ("quant_bits", "quant_block", "quant_dither", "quant_map")


def to_mx(t: torch.Tensor) -> mx.array:
    """A CPU copy of a torch tensor as an MLX array (bfloat16 through its bits)."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return mx.array(t.view(torch.int16).numpy()).view(mx.bfloat16)
    if t.dtype == torch.float64:  # mx.array would round it to float32
        return mx.array(t.numpy(), dtype=mx.float64)
    return mx.array(t.numpy())


def to_torch(a: mx.array) -> torch.Tensor:
    """An MLX array as a torch CPU tensor (bfloat16 through its bits)."""
    if a.dtype == mx.bfloat16:
        return torch.from_numpy(np.array(a.view(mx.int16))).view(torch.bfloat16)
    return torch.from_numpy(np.array(a))


def _permutation(path: str, ndim: int, layouts: Mapping[str, Any] | None) -> tuple[int, ...] | None:
    """The axes that take the torch layout of ``path`` to MLX's (None: the same layout)."""
    if layouts is not None and path in layouts:
        perm = layouts[path]
        if perm is not None and sorted(perm) != list(range(ndim)):
            raise ValueError(f"layouts[{path!r}] = {perm!r} is not a permutation of {ndim} axes")
        return None if perm is None or tuple(perm) == tuple(range(ndim)) else tuple(perm)
    return (0, *range(2, ndim), 1) if ndim >= 3 else None


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.argsort(perm))


def _paths(names: Any, state_dict: Mapping[str, Any] | None, count: int) -> list[str]:
    if names is None and state_dict is not None:
        names = [n for g in state_dict["param_groups"] for n in g.get("param_names", [])] or None
    if names is None:
        raise ValueError("names: the MLX path of each torch parameter is needed (the state_dict has no param_names)")
    names = list(names)
    if len(names) != count:
        raise ValueError(f"names has {len(names)} paths, the torch optimizer has {count} parameters")
    return names


def to_torch_state_dict(
    optimizer: AdamFamily,
    names: Sequence[str],
    parameters: Mapping[str, Any],
    *,
    state_bits: int | None = None,
    layouts: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``optimizer``'s state as a torch ``state_dict`` for the parameters ``names`` (MLX
    paths in the torch optimizer's parameter order; ``parameters`` the MLX model's
    parameter tree), in torch's layouts.

    ``state_bits=None`` keeps each parameter's state as it is (adamkit's torch optimizers
    load any width and convert it to theirs); ``32`` decodes everything to float32, what
    ``torch.optim`` loads. One param group with this optimizer's hyperparameters.
    """
    if state_bits not in (None, 32):
        raise ValueError(f"state_bits must be None (as kept) or 32, got {state_bits!r}")
    flat = dict(tree_flatten(parameters))
    paths = list(names)
    state: dict[int, dict[str, Any]] = {}
    step = int(optimizer.state["step"])
    keys = optimizer.spec.state_keys(optimizer.amsgrad)
    for index, path in enumerate(paths):
        if path not in flat:
            raise ValueError(f"names[{index}] = {path!r} is not a parameter of the MLX model")
        p = flat[path]
        mine = _subtree(optimizer.state, path)
        if not mine:
            continue
        perm = _permutation(path, p.ndim, layouts)
        torch_shape = tuple(p.shape) if perm is None else tuple(p.shape[i] for i in _inverse(perm))
        entry: dict[str, Any] = {"step": torch.tensor(float(step), dtype=torch.float32)}
        fmt = optimizer.state_format(p)
        for key in keys:
            if key == optimizer.spec.amsgrad_key and not any(k.startswith(key) for k in mine):
                entry[key] = torch.zeros(torch_shape)  # amsgrad switched on, no step since: its maximum is 0
                continue
            if isinstance(fmt, QuantFormat):
                codes, absmax = to_torch(mine[f"{key}_codes"]), to_torch(mine[f"{key}_absmax"])
                if perm is None and state_bits is None:
                    entry[f"{key}_codes"], entry[f"{key}_absmax"] = codes, absmax
                    continue
                dense = dequantize(codes, absmax, fmt, fmt.codebook(key), p.size, step).view(tuple(p.shape))
                dense = dense if perm is None else dense.permute(_inverse(perm)).contiguous()
                if state_bits == 32:
                    entry[key] = dense
                else:
                    entry[f"{key}_codes"], entry[f"{key}_absmax"] = quantize(dense, fmt, fmt.codebook(key), step)
            else:
                dense = to_torch(mine[key])
                dense = dense if perm is None else dense.permute(_inverse(perm)).contiguous()
                entry[key] = dense.float() if state_bits == 32 and dense.dtype == torch.bfloat16 else dense
        if isinstance(fmt, QuantFormat) and state_bits is None:
            entry.update(quant_bits=fmt.bits, quant_block=fmt.block_key, quant_dither=int(fmt.dither))
            if fmt.tapered:
                entry["quant_map"] = 1
        for key in optimizer.spec.history:
            entry[key] = to_torch(mine[key]).reshape(())
        if any(tuple(v.shape) != torch_shape for k, v in entry.items() if k in keys):
            raise AssertionError(f"{path}: state converted to the wrong shape")
        state[index] = entry
    return {"state": state, "param_groups": [_torch_group(optimizer, len(paths))]}


def _torch_group(optimizer: AdamFamily, count: int) -> dict[str, Any]:
    lr = optimizer.learning_rate
    group: dict[str, Any] = {
        "lr": float(lr),
        "betas": tuple(float(b) for b in optimizer.betas),
        "eps": float(optimizer.eps),
        "weight_decay": float(optimizer.weight_decay),
    }
    values = {
        "amsgrad": optimizer.amsgrad,
        "maximize": optimizer.maximize,
        "foreach": None,
        "capturable": False,
        "differentiable": False,
        "fused": None,
        "decoupled_weight_decay": optimizer.decoupled_weight_decay,
        "momentum_decay": float(optimizer.momentum_decay),
    }
    group.update({k: values[k] for k in _TORCH_GROUP[optimizer.algorithm]})
    group["params"] = list(range(count))
    return group


def _subtree(state: Any, path: str) -> Any:
    from .optimizers import _find

    return _find(state, path)


def load_torch_state_dict(
    optimizer: AdamFamily,
    state_dict: Mapping[str, Any],
    names: Sequence[str] | None,
    parameters: Mapping[str, Any],
    *,
    layouts: Mapping[str, Any] | None = None,
) -> None:
    """Set ``optimizer``'s state from a torch ``state_dict`` (adamkit's at any width, or
    ``torch.optim``'s), converted to the format this optimizer keeps for each parameter
    of ``parameters`` (the MLX model's tree). ``names``: the MLX path of each torch
    parameter, in order (None: the ``state_dict``'s ``param_names``).

    Everything is checked before anything changes. The hyperparameters stay this
    optimizer's (MLX has one set per optimizer; torch's groups may differ). A parameter
    without torch state gets fresh state at its first step.
    """
    if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("state_dict must be a torch optimizer state_dict (with 'state' and 'param_groups')")
    indices = [i for g in state_dict["param_groups"] for i in g["params"]]
    paths = _paths(names, state_dict, len(indices))
    by_index = dict(zip(indices, paths))
    flat = dict(tree_flatten(parameters))
    saved = state_dict["state"]
    unknown = [i for i in saved if i not in by_index]
    if unknown:
        raise ValueError(f"state_dict has state for parameter indices {unknown} that no param group lists")
    steps = {by_index[i]: float(torch.as_tensor(entry["step"]).reshape(-1)[0]) for i, entry in saved.items()}
    if len(set(steps.values())) > 1:
        ranked = sorted(steps.items(), key=lambda kv: kv[1])
        raise ValueError(
            "MLX keeps one step per optimizer, and these parameters' steps differ: "
            f"{ranked[0][0]!r} at {ranked[0][1]:g}, {ranked[-1][0]!r} at {ranked[-1][1]:g}"
        )
    step = int(next(iter(steps.values()), 0.0))
    if steps and step != next(iter(steps.values())):
        raise ValueError(f"step {next(iter(steps.values()))} is not a whole number")
    per_param: list[tuple[str, dict[str, mx.array]]] = []
    for index, entry in saved.items():
        path = by_index[index]
        if path not in flat:
            raise ValueError(f"parameter {index} is {path!r}, which is not a parameter of the MLX model")
        per_param.append((path, _converted(optimizer, entry, flat[path], path, step, layouts)))
    new_state = {k: v for k, v in optimizer.state.items() if k in ("learning_rate", *_ROOT)}
    new_state.update(
        tree_unflatten([(f"{path}.{key}", value) for path, entry in per_param for key, value in entry.items()])
    )
    new_state["step"] = mx.array(step, mx.uint64)
    # in place: a step compiled with ``inputs=[..., optimizer.state]`` holds this dict
    optimizer.state.clear()
    optimizer.state.update(new_state)
    optimizer._initialized = False  # checked against the parameters at the next step


_ROOT = ("nonfinite_count", "skipped_steps", "quant_format", "one_minus_betas", "eps", "weight_decay", "momentum_decay")


def _converted(
    optimizer: AdamFamily, entry: Mapping[str, Any], p: mx.array, path: str, step: int, layouts: Any
) -> dict[str, mx.array]:
    """One parameter's torch state in the format ``optimizer`` keeps for ``p``."""
    where = f"parameter {path!r}"
    perm = _permutation(path, p.ndim, layouts)
    torch_shape = tuple(p.shape) if perm is None else tuple(p.shape[i] for i in _inverse(perm))
    n = p.size
    saved_fmt = None
    if "quant_bits" in entry:
        try:
            saved_fmt = QuantFormat.from_key(
                int(entry["quant_bits"]),
                int(entry["quant_block"]),
                *(entry.get(k) for k in _QUANT_META[2:]),
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where}: bad quantized-state format: {err}") from None
    target = optimizer.state_format(p)
    out: dict[str, mx.array] = {}
    for key in optimizer.spec.state_keys(optimizer.amsgrad):
        if saved_fmt is not None and f"{key}_codes" in entry:
            codes, absmax = entry[f"{key}_codes"], entry[f"{key}_absmax"]
            if not (isinstance(codes, torch.Tensor) and codes.dtype == torch.uint8):
                raise ValueError(f"{where}: {key}_codes must be a uint8 tensor")
            if codes.numel() != saved_fmt.code_bytes(n) or absmax.numel() != saved_fmt.blocks(n):
                raise ValueError(
                    f"{where}: {key}'s codes/absmax hold {codes.numel()}/{absmax.numel()} entries, a parameter of "
                    f"{n} elements at {saved_fmt.bits} bits needs {saved_fmt.code_bytes(n)}/{saved_fmt.blocks(n)}"
                )
            if not bool(torch.isfinite(absmax).all()) or bool((absmax < 0).any()):
                raise ValueError(f"{where}: {key}_absmax holds negative or non-finite block scales")
            if perm is None and target == saved_fmt:  # the same format and layout: exactly
                out[f"{key}_codes"], out[f"{key}_absmax"] = to_mx(codes.reshape(-1)), to_mx(absmax.reshape(-1).float())
                continue
            dense = dequantize(codes.cpu(), absmax.cpu().float(), saved_fmt, saved_fmt.codebook(key), n, step)
            dense = dense.view(torch_shape)
        elif key in entry:
            dense = entry[key]
            if not isinstance(dense, torch.Tensor) or not dense.is_floating_point():
                raise ValueError(f"{where}: {key} must be a floating-point tensor")
            if tuple(dense.shape) != torch_shape:
                raise ValueError(f"{where}: {key} has shape {tuple(dense.shape)}, expected {torch_shape}")
            dense = dense.detach().cpu()
        elif key == optimizer.spec.amsgrad_key:  # amsgrad switched on: its maximum starts at zero
            dense = torch.zeros(torch_shape)
        else:
            raise ValueError(f"{where}: state entry {key!r} is missing (has {sorted(entry)})")
        dense = dense if perm is None else dense.permute(perm)
        if isinstance(target, QuantFormat):
            codes, absmax = quantize(dense.contiguous(), target, target.codebook(key), step)
            out[f"{key}_codes"], out[f"{key}_absmax"] = to_mx(codes), to_mx(absmax)
        elif target == mx.bfloat16:
            value = dense.float()
            value = value * ~(value.abs() < 2.0**-126)  # stored as the step stores bf16 state
            out[key] = to_mx(value.to(torch.bfloat16).contiguous())
        else:
            out[key] = to_mx(dense.to(torch.float64 if target == mx.float64 else torch.float32).contiguous())
    for key in optimizer.spec.history:
        if key not in entry:  # e.g. an Adam state into NAdam: its momentum history is unknown
            raise ValueError(f"{where}: state entry {key!r} is missing (has {sorted(entry)})")
        value = torch.as_tensor(entry[key])
        if value.numel() != 1 or not bool(torch.isfinite(value).all()):
            raise ValueError(f"{where}: {key} must be one finite number, got {value!r}")
        out[key] = mx.array(float(value), mx.float32)
    return out
