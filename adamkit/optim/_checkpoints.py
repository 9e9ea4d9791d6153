"""Checkpoints: ``state_dict``, ``load_state_dict`` and pickling.

The mixin of :class:`~adamkit.optim._base.AdamFamily` that saves its state as torch does
(plain dicts) and loads a checkpoint of its own or of ``torch.optim``'s Adam, AdamW,
Adamax and NAdam: validated first, in full, then converted to the format this optimizer
gives each parameter.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from copy import deepcopy
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import _paged
from ..kernels._checks import is_plain
from ..quant import QuantFormat, dequantize, quantize
from ..spec import HISTORY, Algorithm
from ._plan import GroupPlan, TrackedState, quant_meta
from ._sharded import first_index, is_sharded, like, local, quant_shape, rows_quantizable, shard_of
from ._state import _MOMENTS, EXTRA_STATE, QUANT_META, _expected_shape, _scalar_dtype, state_columns
from ._validation import _history_problem, _sharding_problem, _step_problem, check_hyperparameters

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
    "quant_map",
    "min_quant_size",
    "paged",
)


class _Checkpoints:
    """:class:`~adamkit.optim._base.AdamFamily`'s checkpoints and pickling.

    Expects of the optimizer: ``spec``, ``_state_keys``, ``_state_format``
    (:mod:`._state`), ``nonfinite_count`` and ``_EXTRA_ATTRIBUTES`` (what pickling keeps
    besides torch's).
    """

    _EXTRA_ATTRIBUTES: ClassVar[dict[str, Any]]
    spec: Algorithm
    param_groups: list[dict[str, Any]]
    state: TrackedState
    _plans: dict[int, GroupPlan]
    _pending_counts: list[tuple[Tensor, Any]]

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
        self._page_all()  # unpickled or copied: a paged copy gets an arena of its own

    def _page_all(self) -> None:
        """Paged groups' moments into their arena (unpickled, copied or loaded state)."""
        for group in self.param_groups:
            if group.get("paged"):
                for p in group["params"]:
                    if self.state.get(p):
                        self._page_state(p, self.state[p], group)

    def state_dict(self) -> dict[str, Any]:
        """torch's ``state_dict``, with plain dicts (loadable with ``weights_only=True``).

        For parameters stepped by a fused CPU kernel the state tensors are views into
        per-group flat buffers; saving writes each buffer once.
        """
        out = super().state_dict()
        out["state"] = {k: dict(v) if isinstance(v, dict) else v for k, v in out["state"].items()}
        return out

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
        for group in groups:  # into the arena before anything changes (a full disk raises here)
            for p in group["params"] if group.get("paged") else ():
                if state.get(p):
                    self._page_state(p, state[p], group)
        self.__setstate__({"state": state, "param_groups": groups})
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _normalize_loaded_group(self, group: dict[str, Any]) -> None:
        """Hook for subclasses to fix up a group read from a checkpoint."""

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
        saved, saved_fmt = _as_layout_of(p, saved, saved_fmt, where)
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
        target = self._state_format(p, group)  # kept as saved (into a paged arena directly) or converted
        kept = saved_fmt == target if saved_fmt is not None else not isinstance(target, QuantFormat)
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
            problem = _sharding_problem(key, value, p, key in EXTRA_STATE, saved_fmt)
            if problem:
                raise ValueError(f"{where}: {problem}")
            if key in EXTRA_STATE or saved_fmt is not None:
                kind = torch.float32 if key in EXTRA_STATE or key.endswith("_absmax") else torch.uint8
                if value.dtype != kind:
                    raise ValueError(f"{where}: state {key!r} is {value.dtype}, expected {kind}")
                if key.endswith("_absmax") and not bool(((local(value) >= 0) & local(value).isfinite()).all()):
                    raise ValueError(f"{where}: state {key!r} holds negative or non-finite block scales")
                out[key] = self._loaded_copy(key, value, p, group, kept)
                continue
            if value.is_complex() != p.is_complex() or not (value.is_floating_point() or value.is_complex()):
                raise ValueError(
                    f"{where}: state {key!r} is {value.dtype}, which cannot hold a {p.dtype} parameter's state"
                )
            dense[key] = self._loaded_copy(key, value, p, group, kept)
        dtypes = {k: str(dense[k].dtype) for k in (*keys, *_MOMENTS) if k in dense}
        if len(set(dtypes.values())) > 1:
            raise ValueError(f"{where}: state tensors must share one dtype, got {dtypes}")
        return self._converted(out, dense, saved_fmt, p, group)

    def _loaded_copy(self, key: str, value: Tensor, p: Tensor, group: Mapping[str, Any], kept: bool) -> Tensor:
        """A checkpoint's state tensor copied to ``p``'s device: a paged group's large
        moments and codes that are ``kept`` (not converted to another format) straight into
        its arena (a checkpoint opened with ``torch.load(mmap=True)`` then never passes
        through ordinary memory)."""
        paged = kept and group.get("paged") and (key in _MOMENTS or key.endswith("_codes")) and not is_sharded(p)
        if paged and value.numel() >= _paged.MIN_PAGED_NUMEL and is_plain(value) and value.is_contiguous():
            arena = self._arena(p, group)
            if arena is not None:
                return arena.adopt(value.detach())
        return value.detach().to(device=p.device, copy=True)

    @staticmethod
    def _saved_format(saved: Mapping[str, Any], where: str) -> QuantFormat | None:
        """The quantized format a checkpoint's parameter state names, checked."""
        if not any(k in saved for k in QUANT_META):
            return None
        try:
            return QuantFormat.from_key(
                int(saved["quant_bits"]), int(saved["quant_block"]), saved.get("quant_dither"), saved.get("quant_map")
            )
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
        # a DTensor parameter's state is converted shard by shard (whole rows: whole blocks)
        sharded, lp, first = is_sharded(p), local(p), first_index(p)
        if saved_fmt is not None:  # decode
            for key in [k for k in _MOMENTS if f"{k}_codes" in out]:
                book = saved_fmt.codebook(key)
                codes, absmax = local(out.pop(f"{key}_codes")), local(out.pop(f"{key}_absmax"))
                flat = dequantize(codes, absmax, saved_fmt, book, lp.numel(), step, first)
                dense[key] = like(p, flat.view(lp.shape)) if sharded else flat.view(p.shape)
        if isinstance(target, QuantFormat):
            out.update(quant_meta(target))
            for key in [k for k in _MOMENTS if k in dense]:
                codes, absmax = quantize(local(dense.pop(key)).real, target, target.codebook(key), step, first)
                if sharded:
                    codes = like(
                        p, codes.view(quant_shape(p, target, "_codes", lp.shape)), quant_shape(p, target, "_codes")
                    )
                    absmax = like(
                        p, absmax.view(quant_shape(p, target, "_absmax", lp.shape)), quant_shape(p, target, "_absmax")
                    )
                out[f"{key}_codes"], out[f"{key}_absmax"] = codes, absmax
        out.update(dense)
        return out


def _as_layout_of(
    p: Tensor, saved: Mapping[str, Any], fmt: QuantFormat | None, where: str
) -> tuple[Mapping[str, Any], QuantFormat | None]:
    """A parameter's saved state with its tensors laid out as ``p``'s state is: for a
    DTensor parameter, plain (whole-tensor) entries cut to this rank's shard — quantized
    ones row by row where their blocks are whole rows, else decoded first; for a plain
    parameter, quantized entries of a sharded run's row shape read flat. Returns the
    state and its (possibly decoded) format."""
    tensors = {k: v for k, v in saved.items() if isinstance(v, Tensor) and k not in ("step", *HISTORY, *EXTRA_STATE)}
    if not is_sharded(p):
        if any(is_sharded(v) for v in tensors.values()):
            raise ValueError(
                f"{where}: the checkpoint holds DTensor state for a parameter that is not a DTensor; gather it first "
                "(torch.distributed.checkpoint.state_dict.get_optimizer_state_dict with full_state_dict=True)"
            )
        if fmt is None:
            return saved, fmt
        out = dict(saved)
        for key, value in tensors.items():  # a sharded run's codes and scales: (*p.shape[:d+1], width)
            want = _expected_shape(key, p, fmt)
            lead = tuple(value.shape[:-1])
            if value.dim() > 1 and value.numel() == want[0] and lead == tuple(p.shape[: len(lead)]):
                out[key] = value.reshape(want)
        return out, fmt
    plain = {k: v for k, v in tensors.items() if not is_sharded(v)}
    if not plain:
        return saved, fmt
    if len(plain) != len(tensors):
        raise ValueError(f"{where}: the checkpoint mixes DTensor and plain state tensors")
    out = dict(saved)
    if fmt is not None and not rows_quantizable(p, fmt.block_size, bool(fmt.dither)):  # decoded, then cut
        step = int(float(saved["step"]))
        n = p.numel()
        for key in [k for k in _MOMENTS if f"{k}_codes" in plain]:
            codes, absmax = plain[f"{key}_codes"].reshape(-1), plain[f"{key}_absmax"].reshape(-1)
            if codes.numel() != fmt.code_bytes(n) or absmax.numel() != fmt.blocks(n):
                raise ValueError(f"{where}: state {key!r} has {codes.numel()} codes and {absmax.numel()} scales for "
                                 f"{n} elements")  # fmt: skip
            out[key] = dequantize(codes, absmax.float(), fmt, fmt.codebook(key), n, step).view(p.shape)
            plain[key] = out[key]
            del out[f"{key}_codes"], out[f"{key}_absmax"], plain[f"{key}_codes"], plain[f"{key}_absmax"]
        for key in QUANT_META:
            out.pop(key, None)
        fmt = None
    for key, value in plain.items():
        want = _expected_shape(key, p, fmt or p.dtype)
        if value.numel() != torch.Size(want).numel():
            raise ValueError(f"{where}: state {key!r} has shape {tuple(value.shape)}, expected {want}")
        out[key] = shard_of(p, value.reshape(want))
    return out, fmt
