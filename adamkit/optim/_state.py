"""Per-parameter state: its formats, and its creation.

A parameter's state is ``step`` (and the algorithm's history, e.g. NAdam's
``mu_product``) beside its moments: dense tensors of one dtype, or the codes and block
scales of a :class:`QuantFormat` (8/4-bit state). This module names those entries
(:func:`state_columns`, :func:`quant_format_of`, their shapes) and holds the mixin of
:class:`~adamkit.optim._base.AdamFamily` that chooses a new parameter's format and
layout and creates its state lazily, at its first step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from .. import _managed, _memory, _paged
from ..kernels._checks import is_plain, storage_order
from ..quant import DEFAULT_BLOCK, QUANT_BITS, QuantFormat
from ..spec import HISTORY, MOMENTS, Algorithm
from ._plan import TrackedState, quant_meta
from ._sharded import is_sharded, like, local, quant_shape, rows_quantizable

#: Per-parameter state entries of quantized state that are not tensors: the format
#: (``quant_dither`` is absent from checkpoints of adamkit 0.1, whose 4-bit codes were
#: nearest codes; ``quant_map`` is there only for the tapered maps, 1).
QUANT_META = ("quant_bits", "quant_block", "quant_dither", "quant_map")

#: A parameter's state format: a dtype (dense state) or a :class:`QuantFormat`.
StateFormat = torch.dtype | QuantFormat


def quant_format_of(state: Mapping[str, Any]) -> QuantFormat | None:
    """The format of a parameter's quantized state, or None for dense state."""
    if "quant_bits" not in state:
        return None
    return QuantFormat.from_key(
        int(state["quant_bits"]), int(state["quant_block"]), state.get("quant_dither"), state.get("quant_map")
    )


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
    if is_sharded(p):  # blocked in global rows (see ._sharded)
        return quant_shape(p, fmt, column)
    n = p.numel()
    return (fmt.code_bytes(n),) if column.endswith("_codes") else (fmt.blocks(n),)


#: Every dense moment any variant keeps: they must share a dtype whatever ``amsgrad`` is
#: now (a kept ``max_exp_avg_sq`` is stepped again when it is switched back on).
_MOMENTS = MOMENTS


def _scalar_dtype() -> torch.dtype:
    """torch's dtype for ``state["step"]``: float32, or float64 if that is the default."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class _State:
    """:class:`~adamkit.optim._base.AdamFamily`'s state formats and lazy state creation.

    Expects of the optimizer: ``spec`` and ``_state_keys`` (the algorithm's state keys
    for a group), and ``state``.
    """

    spec: Algorithm
    state: TrackedState

    def _state_format(self, p: Tensor, group: Mapping[str, Any]) -> StateFormat:
        """The format of a new parameter's state: quantized for ``state_bits`` 8 or 4 and
        a real floating-point parameter of at least ``min_quant_size`` elements (a DTensor
        parameter's global size, and rows of whole blocks: :mod:`._sharded`); else the
        dtype of :meth:`_state_dtype`."""
        overrides = self._param_overrides(p)
        if overrides:
            group = {**group, **overrides}
        bits = group["state_bits"]
        if bits in QUANT_BITS and p.is_floating_point() and p.numel() >= group.get("min_quant_size", 4096):
            block = group.get("block_size") or DEFAULT_BLOCK[bits]
            tapered = bits == 8 and group.get("quant_map", "dynamic") == "tapered"
            fmt = QuantFormat(bits, block if group.get("block_wise", True) else None, tapered=tapered)
            if not is_sharded(p) or rows_quantizable(p, fmt.block_size, bool(fmt.dither)):
                return fmt
        return self._state_dtype(p, group)

    def _param_overrides(self, p: Tensor) -> Mapping[str, Any]:
        """Group keys overridden for one parameter's state format: those of
        :class:`adamkit.bnb.GlobalOptimManager`."""
        from ..bnb import managed_overrides  # the manager lives with bitsandbytes' names

        return managed_overrides(self, p)

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
        tensors = [local(v) for k, v in state.items() if k not in scalars and isinstance(v, Tensor)]
        fmt = quant_format_of(state) or (tensors[0].dtype if tensors else self._state_format(p, group))
        if is_sharded(p):  # stepped through the local tensors
            p, g = local(p), None if g is None else local(g)
        if not all(map(is_plain, [p, *tensors] if g is None else [p, g, *tensors])):
            return p.dtype, fmt, False  # a subclass's data_ptr() may not be where its elements are
        if p.is_contiguous() and (g is None or g.is_contiguous()) and all(t.is_contiguous() for t in tensors):
            return p.dtype, fmt, True
        if isinstance(fmt, QuantFormat) or (group.get("stochastic_rounding") and p.dtype == torch.bfloat16):
            return p.dtype, fmt, False
        order = storage_order(p)
        flat = order is not None and all(storage_order(t) == order for t in ([] if g is None else [g]) + tensors)
        return p.dtype, fmt, flat

    # ------------------------------------------------------------------- paged state
    def _arena(self, p: Tensor, group: Mapping[str, Any]) -> Any:
        """The arena of a paged group's state (created at its first use): a memory-mapped
        file's (:class:`adamkit._paged.Arena`) for CPU parameters, CUDA managed memory's
        (:class:`adamkit._managed.ManagedArena`) for CUDA ones; None if not paged. Other
        devices cannot page: refused when the group is added (``_check_group``)."""
        if not group.get("paged"):
            return None
        device = local(p).device.type
        if device == "cuda":
            managed = self.__dict__.get("_managed_arena")
            if managed is None:
                managed = self._managed_arena = _managed.ManagedArena()
            return _OnDevice(managed, local(p).device)
        if device != "cpu":
            return None
        arena = self.__dict__.get("_paged_arena")
        if arena is None:
            arena = self._paged_arena = _paged.Arena(getattr(self, "paged_dir", None))
        return arena

    def _paged_zeros(self, arena: _paged.Arena | None, p: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """Zero state of ``shape`` for ``p``: in ``arena`` if there is one and it is large
        enough (laid out as ``p`` where it has ``p``'s shape), else ordinary memory."""
        numel = math.prod(shape)
        if arena is None or numel < _paged.MIN_PAGED_NUMEL:
            if tuple(shape) == tuple(p.shape):
                return _memory.zeros_like(p, dtype)
            return torch.zeros(shape, dtype=dtype, device=p.device)
        flat = arena.zeros(numel, dtype)
        if tuple(shape) == tuple(p.shape) and not p.is_contiguous() and storage_order(p) is not None:
            return flat.as_strided(p.shape, p.stride())  # dense in p's order, as zeros_like
        return flat.view(shape)

    def _page_state(self, p: Tensor, state: dict[str, Any], group: Mapping[str, Any]) -> None:
        """Move a parameter's moments (dense moments, codes) of a paged group into its
        arena (loaded or unpickled state; copies, same values)."""
        arena = self._arena(p, group)
        if arena is None or is_sharded(p):
            return
        paged = _managed.is_managed if p.device.type == "cuda" else _paged.is_paged
        for key, value in list(state.items()):
            moment = key in _MOMENTS or key.endswith("_codes")
            if moment and isinstance(value, Tensor) and is_plain(value) and value.device == p.device:
                if value.numel() >= _paged.MIN_PAGED_NUMEL and not paged(value):
                    state[key] = arena.adopt(value)

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
        arena = self._arena(p, group)
        if isinstance(fmt, QuantFormat):
            for key, value in quant_meta(fmt).items():
                state.setdefault(key, value)
            for column in state_columns(self._state_keys(group), fmt):
                if column not in state:
                    dtype = torch.uint8 if column.endswith("_codes") else torch.float32
                    paging = arena if column.endswith("_codes") else None  # block scales: ordinary memory
                    if is_sharded(p):  # the local rows' codes and scales, global rows around them
                        lp = local(p)
                        zeros = self._paged_zeros(paging, lp, quant_shape(p, fmt, column, lp.shape), dtype)
                        state[column] = like(p, zeros, _expected_shape(column, p, fmt))
                    else:
                        state[column] = self._paged_zeros(paging, p, _expected_shape(column, p, fmt), dtype)
            return
        for key in self._state_keys(group):
            if key not in state:
                lp = local(p)
                zeros = self._paged_zeros(arena, lp, tuple(lp.shape), fmt)
                state[key] = like(p, zeros) if is_sharded(p) else zeros


class _OnDevice:
    """A managed arena seen as one device's: ``zeros(numel, dtype)`` as the CPU arena's."""

    def __init__(self, arena: _managed.ManagedArena, device: torch.device) -> None:
        self.arena, self.device = arena, device

    def zeros(self, numel: int, dtype: torch.dtype) -> Tensor:
        return self.arena.zeros(numel, dtype, self.device)

    def adopt(self, t: Tensor) -> Tensor:
        out = self.arena.zeros(t.numel(), t.dtype, self.device).view(t.shape)
        out.copy_(t)
        return out
