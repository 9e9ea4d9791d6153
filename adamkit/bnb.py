"""bitsandbytes-compatible names: switch by changing an import.

``from bitsandbytes.optim import AdamW8bit`` becomes ``from adamkit import AdamW8bit``;
``bnb.optim.Adam(..., optim_bits=8)`` becomes ``adamkit.bnb.Adam(..., optim_bits=8)``.
The classes take bitsandbytes 0.49's signatures and argument names and are thin
subclasses of :class:`adamkit.Adam` / :class:`adamkit.AdamW`:

==================  =====================================================
bitsandbytes        adamkit
==================  =====================================================
``optim_bits``      ``state_bits`` (32 or 8; adamkit also takes 16 and 4)
``min_8bit_size``   ``min_quant_size``
``block_wise``      ``block_wise`` (False: one absmax per tensor)
``percentile_clipping``  the same (100 = off)
``args``            an object whose attributes of these names override them
``is_paged``        ``paged`` (moments of CPU parameters in a memory-mapped file,
                    of CUDA ones in managed memory; adamkit also takes ``paged_dir``)
==================  =====================================================

Semantics are torch's, not bitsandbytes': ``Adam`` couples L2 weight decay into the
gradient as ``torch.optim.Adam`` does (bitsandbytes' 8-bit Adam kernels decay the
parameter, as AdamW), and AMSGrad is supported (bitsandbytes accepts the flag and
ignores it). State and checkpoints are adamkit's (see :mod:`adamkit.quant`).

:class:`GlobalOptimManager` keeps bitsandbytes' per-parameter overrides, for the
state format: ``optim_bits``, ``min_8bit_size``, ``block_wise`` (e.g. keep an
embedding in 32-bit). They apply when a parameter's state is created (its first step),
as in bitsandbytes. Other keys are rejected with a pointer to param groups, which do the
same natively: ``{"params": emb.parameters(), "state_bits": 32}``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from .optim import Adam as _Adam
from .optim import AdamW as _AdamW

#: bitsandbytes override keys -> adamkit group keys (those that choose the state format).
OVERRIDE_KEYS = {"optim_bits": "state_bits", "min_8bit_size": "min_quant_size", "block_wise": "block_wise"}


class GlobalOptimManager:
    """bitsandbytes' registry of per-parameter optimizer overrides (a singleton).

    Example:
        >>> import torch, adamkit
        >>> model = torch.nn.Sequential(torch.nn.Embedding(100, 64), torch.nn.Linear(64, 64))
        >>> mng = adamkit.GlobalOptimManager.get_instance()
        >>> mng.register_parameters(model.parameters())
        >>> opt = adamkit.Adam8bit(model.parameters())
        >>> mng.override_config(model[0].weight, "optim_bits", 32)  # embedding: 32-bit state
    """

    _instance: GlobalOptimManager | None = None

    def __init__(self) -> None:
        raise RuntimeError("Call GlobalOptimManager.get_instance() instead")

    def initialize(self) -> None:
        """Forget every registration and override."""
        self.pid2config: dict[int, dict[str, Any]] = {}
        self.index2config: dict[tuple[int, int], dict[str, Any]] = {}
        self.module_weight_config_triple: list[tuple[torch.nn.Module, str, dict[str, Any]]] = []
        self.uses_config_override = False
        #: counts changes to the overrides: the optimizers' cached plans, which create
        #: state in the formats the overrides decide, are rebuilt when it moves
        self.version = getattr(self, "version", 0) + 1

    @classmethod
    def get_instance(cls) -> GlobalOptimManager:
        if cls._instance is None:
            cls._instance = cls.__new__(cls)
            cls._instance.initialize()
        return cls._instance

    def register_parameters(self, params: Iterable[Any]) -> None:
        """Remember parameters' positions (group, index), so overrides given for them
        also find them by position (bitsandbytes registers before ``model.cuda()``)."""
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for gi, group in enumerate(groups):
            for pi, p in enumerate(group["params"]):
                self.index2config[(gi, pi)] = self.pid2config.setdefault(id(p), {})

    def override_config(
        self,
        parameters: Tensor | Iterable[Tensor],
        key: str | None = None,
        value: Any = None,
        key_value_dict: Mapping[str, Any] | None = None,
    ) -> None:
        """Override ``key = value`` (or every item of ``key_value_dict``) for parameters."""
        if key is not None and key_value_dict is not None:
            raise ValueError("give either key and value or key_value_dict, not both")
        config = dict(key_value_dict or {}) if key is None else {key: value}
        unknown = sorted(set(config) - set(OVERRIDE_KEYS))
        if unknown:
            raise ValueError(
                f"adamkit overrides {sorted(OVERRIDE_KEYS)} per parameter, not {unknown}; "
                "put such parameters in their own param group instead"
            )
        self.uses_config_override = True
        self.version += 1
        for p in [parameters] if isinstance(parameters, Tensor) else parameters:
            self.pid2config.setdefault(id(p), {}).update(config)

    def register_module_override(self, module: torch.nn.Module, param_name: str, config: Mapping[str, Any]) -> None:
        """Override ``config`` for ``getattr(module, param_name)``, found when stepping."""
        unknown = sorted(set(config) - set(OVERRIDE_KEYS))
        if unknown:
            raise ValueError(f"adamkit overrides {sorted(OVERRIDE_KEYS)} per parameter, not {unknown}")
        self.module_weight_config_triple.append((module, param_name, dict(config)))
        self.version += 1

    def config_for(self, p: Tensor, position: tuple[int, int] | None) -> dict[str, Any]:
        """The adamkit group keys overridden for ``p`` (at (group, index) ``position``)."""
        config: dict[str, Any] = {}
        for module, name, extra in self.module_weight_config_triple:
            if getattr(module, name, None) is p:
                config.update(extra)
        if position is not None:
            config.update(self.index2config.get(position, {}))
        config.update(self.pid2config.get(id(p), {}))
        return {OVERRIDE_KEYS[k]: v for k, v in config.items()}


def _bnb_options(
    optim_bits: int, args: Any, min_8bit_size: int, percentile_clipping: int, block_wise: bool, is_paged: bool
) -> dict[str, Any]:
    if args is not None:  # bitsandbytes' ``args`` object: its attributes win
        optim_bits = getattr(args, "optim_bits", optim_bits)
        min_8bit_size = getattr(args, "min_8bit_size", min_8bit_size)
        percentile_clipping = getattr(args, "percentile_clipping", percentile_clipping)
        block_wise = getattr(args, "block_wise", block_wise)
        is_paged = getattr(args, "is_paged", is_paged)
    return dict(
        state_bits=optim_bits,
        min_quant_size=min_8bit_size,
        percentile_clipping=percentile_clipping,
        block_wise=block_wise,
        paged=bool(is_paged),
    )


def managed_overrides(opt: Any, p: Tensor) -> dict[str, Any]:
    """The :class:`GlobalOptimManager` overrides of ``p``'s state format in optimizer
    ``opt``: by module and name, or by the parameter itself, in every adamkit optimizer;
    by position (group, index) of a registered parameter too in bitsandbytes' names (as
    there: a position means nothing to another optimizer). Positions and modules survive
    FSDP2's ``fully_shard`` replacing the parameters."""
    mng = GlobalOptimManager.get_instance()
    if not (mng.uses_config_override or mng.module_weight_config_triple):
        return {}
    device_params = opt.__dict__.get("_offloaded")  # CPUOffload's host optimizer: id(host copy) -> parameter
    if device_params is not None and id(p) in device_params:
        return mng.config_for(device_params[id(p)], None)  # by the device parameter or its module
    if not getattr(opt, "_bnb_positions", False):
        return mng.config_for(p, None)
    groups = opt.param_groups
    shape = tuple(len(g["params"]) for g in groups)
    cached = opt.__dict__.get("_positions")
    if cached is None or cached[0] != shape:  # positions by id, rebuilt when groups change
        cached = (shape, {id(q): (gi, pi) for gi, g in enumerate(groups) for pi, q in enumerate(g["params"])})
        opt.__dict__["_positions"] = cached
    position = cached[1].get(id(p))
    return {} if position is None else mng.config_for(p, position)


def keep_embeddings_32bit(model: torch.nn.Module) -> int:
    """Give every ``nn.Embedding`` weight of ``model`` 32-bit state in any adamkit
    optimizer with ``state_bits`` 8 or 4 (what Hugging Face's Trainer does for
    bitsandbytes' 8-bit classes: embeddings are sensitive to quantized state). Call it
    before the optimizer's first step; returns how many embeddings were registered.

    Example:
        >>> import torch, adamkit
        >>> model = torch.nn.Sequential(torch.nn.Embedding(1000, 64), torch.nn.Linear(64, 64))
        >>> adamkit.keep_embeddings_32bit(model)
        1
    """
    mng = GlobalOptimManager.get_instance()
    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    for module in embeddings:
        if not any(m is module and name == "weight" for m, name, _ in mng.module_weight_config_triple):
            mng.register_module_override(module, "weight", {"optim_bits": 32})
    return len(embeddings)


def _make(name: str, base: type, default_wd: float, bits: int | None, paged: bool) -> type:
    fixed = "" if bits is None else f" Always {bits}-bit state (``optim_bits`` is ignored, as in bitsandbytes)."
    paged_note = (
        " Paged state: moments of CPU parameters in a memory-mapped file (``paged_dir``), of CUDA ones in CUDA "
        "managed memory."
        if paged
        else ""
    )

    def __init__(
        self: Any,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = default_wd,
        amsgrad: bool = False,
        optim_bits: int = 32,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        is_paged: bool = False,
        paged_dir: str | None = None,
    ) -> None:
        wanted = optim_bits if bits is None else bits
        options = _bnb_options(wanted, args, min_8bit_size, percentile_clipping, block_wise, is_paged or paged)
        if bits is not None:
            options["state_bits"] = bits
        base.__init__(self, params, lr, betas, eps, weight_decay, amsgrad, paged_dir=paged_dir, **options)

    doc = (
        f"bitsandbytes' ``{name}`` on :class:`adamkit.{base.__name__}` (torch's semantics).{fixed}{paged_note}\n\n"
        "    Arguments as bitsandbytes 0.49; see :mod:`adamkit.bnb` for how they map.\n"
    )
    attributes = {"__init__": __init__, "__doc__": doc, "__module__": __name__, "_bnb_positions": True}
    return type(name, (base,), attributes)


Adam = _make("Adam", _Adam, 0.0, None, False)
Adam8bit = _make("Adam8bit", _Adam, 0.0, 8, False)
Adam32bit = _make("Adam32bit", _Adam, 0.0, 32, False)
PagedAdam = _make("PagedAdam", _Adam, 0.0, None, True)
PagedAdam8bit = _make("PagedAdam8bit", _Adam, 0.0, 8, True)
PagedAdam32bit = _make("PagedAdam32bit", _Adam, 0.0, 32, True)
AdamW = _make("AdamW", _AdamW, 1e-2, None, False)
AdamW8bit = _make("AdamW8bit", _AdamW, 1e-2, 8, False)
AdamW32bit = _make("AdamW32bit", _AdamW, 1e-2, 32, False)
PagedAdamW = _make("PagedAdamW", _AdamW, 1e-2, None, True)
PagedAdamW8bit = _make("PagedAdamW8bit", _AdamW, 1e-2, 8, True)
PagedAdamW32bit = _make("PagedAdamW32bit", _AdamW, 1e-2, 32, True)

__all__ = [
    "Adam",
    "Adam8bit",
    "Adam32bit",
    "AdamW",
    "AdamW8bit",
    "AdamW32bit",
    "GlobalOptimManager",
    "PagedAdam",
    "PagedAdam8bit",
    "PagedAdam32bit",
    "PagedAdamW",
    "PagedAdamW8bit",
    "PagedAdamW32bit",
    "keep_embeddings_32bit",
]
