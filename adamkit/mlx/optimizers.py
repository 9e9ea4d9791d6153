"""``adamkit.mlx.Adam``, ``AdamW``, ``Adamax`` and ``NAdam``: torch.optim's semantics as
``mlx.optimizers.Optimizer`` subclasses.

MLX's conventions hold: ``learning_rate`` is a float or a schedule (a callable of the
step), ``update(model, grads)`` / ``apply_gradients``, lazy state in ``optimizer.state``
(a tree beside the parameters' with a single ``step``), saved with
``tree_flatten`` + ``mx.save_safetensors``. The math is torch's: bias correction,
``amsgrad``, ``maximize``, coupled L2 (Adam) or decoupled decay (AdamW), Adamax and NAdam
as torch defines them, with torch's defaults and state names (``exp_avg``,
``exp_avg_sq``, ``max_exp_avg_sq``, ``exp_inf``, ``mu_product``: :mod:`adamkit.spec`).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any, ClassVar

import mlx.core as mx
from mlx.optimizers import Optimizer
from mlx.utils import tree_flatten, tree_map

from ..quant import DEFAULT_BLOCK, QUANT_BITS, QuantFormat
from ..spec import ALGORITHMS, Algorithm
from . import _native
from ._rules import HUGE, compiled, finite_, step_consts

#: What ``nonfinite=`` accepts (as the torch side).
NONFINITE_MODES = ("mask", "skip", "propagate", "raise")
#: ``state_bits`` the MLX optimizers keep.
STATE_BITS = (32, 16, 8, 4)
#: The optimizer-wide entries of ``optimizer.state`` besides MLX's ``step`` and
#: ``learning_rate``.
COUNTERS = ("nonfinite_count", "skipped_steps")

StateFormat = QuantFormat | mx.Dtype


class AdamFamily(Optimizer):
    """The machinery of :class:`Adam`, :class:`AdamW`, :class:`Adamax` and :class:`NAdam`:
    arguments, lazy state, its checks, the per-step constants and the non-finite policy.
    Subclasses name their algorithm and their arguments.

    Attributes:
        nonfinite_count: gradient elements masked under ``"mask"`` or seen in skipped
            steps under ``"skip"`` (kept in ``state["nonfinite_count"]``).
        skipped_steps: steps skipped as a whole under ``"skip"``.
    """

    algorithm: ClassVar[str]

    def __init__(
        self,
        learning_rate: float | Callable[[mx.array], mx.array],
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        *,
        lr: float | None = None,
        amsgrad: bool = False,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
        momentum_decay: float = 0.0,
        state_bits: int = 32,
        block_size: int | None = None,
        min_quant_size: int = 4096,
        nonfinite: str = "mask",
        quant_map: str = "dynamic",
    ) -> None:
        super().__init__()
        if lr is not None:  # torch's name, for ported code
            learning_rate = lr
        self.betas = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.momentum_decay = momentum_decay
        self.amsgrad = bool(amsgrad)
        self.maximize = bool(maximize)
        self.decoupled_weight_decay = bool(decoupled_weight_decay)
        if state_bits not in STATE_BITS:
            raise ValueError(f"state_bits must be one of {STATE_BITS}, got {state_bits!r}")
        self.state_bits = state_bits
        if quant_map not in ("dynamic", "tapered"):
            raise ValueError(f"quant_map must be one of ('dynamic', 'tapered'), got {quant_map!r}")
        self.quant_format = (
            QuantFormat(
                state_bits, block_size or DEFAULT_BLOCK[state_bits], tapered=state_bits == 8 and quant_map == "tapered"
            )
            if state_bits in QUANT_BITS
            else None
        )
        if isinstance(min_quant_size, bool) or not isinstance(min_quant_size, int) or min_quant_size < 0:
            raise ValueError(f"min_quant_size must be an int >= 0, got {min_quant_size!r}")
        self.min_quant_size = min_quant_size
        self.nonfinite = nonfinite
        if not callable(learning_rate):
            learning_rate = _checked("learning rate", learning_rate)
        self._maybe_schedule("learning_rate", learning_rate)
        self._add_counters(self._state)

    # ------------------------------------------------------------------ arguments
    @property
    def spec(self) -> Algorithm:
        """This optimizer's algorithm (:mod:`adamkit.spec`)."""
        return ALGORITHMS[self.algorithm]

    # The hyperparameters live in ``state`` as arrays, as MLX keeps ``learning_rate``: a
    # compiled step reads them as inputs, so a change reaches it without tracing again,
    # and checkpoints keep them. safetensors has no float64, so the betas are stored as
    # float32 complements ``1 - β`` (0.001 is exact to float32 rounding; 0.999 would not
    # be: its bias correction would be off by 1e-5). Checked when set; read back from the
    # values set (or from a loaded state).
    @property
    def betas(self) -> tuple[float, float]:
        return self._hyper("betas", lambda a: tuple(1.0 - float(x) for x in a.tolist()))

    @betas.setter
    def betas(self, value: Any) -> None:
        value = tuple(value)
        if len(value) != 2:
            raise ValueError(f"betas must be a pair, got {value!r}")
        pair = tuple(_checked(f"beta parameter at index {i}", b, below=1.0) for i, b in enumerate(value))
        self._set_hyper("betas", pair, mx.array([1.0 - b for b in pair], mx.float32))

    eps = property(lambda self: self._hyper("eps"), lambda self, v: self._set_number("eps", "epsilon value", v))
    weight_decay = property(
        lambda self: self._hyper("weight_decay"),
        lambda self, v: self._set_number("weight_decay", "weight_decay value", v),
    )
    momentum_decay = property(
        lambda self: self._hyper("momentum_decay"),
        lambda self, v: self._set_number("momentum_decay", "momentum_decay value", v),
    )

    #: The state entry of each hyperparameter.
    _HYPER_KEYS = {
        "betas": "one_minus_betas",
        "eps": "eps",
        "weight_decay": "weight_decay",
        "momentum_decay": "momentum_decay",
    }

    def _hyper(self, name: str, read: Callable[[mx.array], Any] = float) -> Any:
        value, stored = self._values[name]
        current = self.state.get(self._HYPER_KEYS[name], stored)
        return value if current is stored else read(current)

    def _set_number(self, name: str, label: str, value: Any) -> None:
        number = _checked(label, value)
        self._set_hyper(name, number, mx.array(number, mx.float32))

    def _set_hyper(self, name: str, value: Any, stored: mx.array) -> None:
        if not hasattr(self, "_values"):
            self._values: dict[str, tuple[Any, mx.array]] = {}
        self._values[name] = (value, stored)  # the value as set, and what a loaded state lacking it gets
        self.state[self._HYPER_KEYS[name]] = stored

    def _hyper_vector(self) -> mx.array:
        """float32 [1 - β1, 1 - β2, ε, λ, ψ] from the state (arrays: inputs of a compiled step)."""
        s = self.state
        parts = [s["one_minus_betas"]] + [s[k].reshape(1) for k in ("eps", "weight_decay", "momentum_decay")]
        return mx.concatenate(parts)

    def _check_hyper_state(self, state: dict) -> None:
        """A loaded state's hyperparameters: float32 of the right shapes and, where they
        can be read (not inside ``mx.compile``), valid values."""
        for name, key in self._HYPER_KEYS.items():
            value = state.get(key)
            shape = (2,) if name == "betas" else ()
            if value is None:
                state[key] = self._values[name][1]
                continue
            if not isinstance(value, mx.array) or tuple(value.shape) != shape or value.dtype != mx.float32:
                raise ValueError(f"the state's {key} must be a float32 array of shape {shape}, got {value!r}")
            try:
                values = value.reshape(-1).tolist()
            except (RuntimeError, ValueError):  # a placeholder inside mx.compile
                continue
            for i, v in enumerate(values):
                if name == "betas":
                    _checked(f"beta parameter at index {i}", 1.0 - v, below=1.0)
                else:
                    _checked(f"{name} value", v)

    @property
    def nonfinite(self) -> str:
        return self._nonfinite

    @nonfinite.setter
    def nonfinite(self, value: str) -> None:
        if value not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {value!r}")
        self._nonfinite = value

    @staticmethod
    def _add_counters(state: dict) -> None:
        for key in COUNTERS:
            if key not in state:
                state[key] = mx.array(0, mx.uint64)

    @property
    def nonfinite_count(self) -> int:
        return int(self.state["nonfinite_count"])

    @property
    def skipped_steps(self) -> int:
        return int(self.state["skipped_steps"])

    # ---------------------------------------------------------------------- state
    def state_format(self, parameter: mx.array) -> StateFormat:
        """The format of a parameter's state: quantized for ``state_bits`` 8 or 4 and at
        least ``min_quant_size`` elements, else bfloat16 (``state_bits=16``), or float32
        (float64 for float64 parameters)."""
        _check_parameter(parameter)
        if self.quant_format is not None and parameter.size >= self.min_quant_size:
            return self.quant_format
        if self.state_bits == 16:
            return mx.bfloat16
        return mx.float64 if parameter.dtype == mx.float64 else mx.float32

    def expected_state(self, parameter: mx.array) -> dict[str, tuple[tuple[int, ...], mx.Dtype]]:
        """Each state entry of ``parameter`` (in order): its shape and dtype."""
        fmt = self.state_format(parameter)
        keys = self.spec.state_keys(self.amsgrad)
        out: dict[str, tuple[tuple[int, ...], mx.Dtype]] = {}
        if isinstance(fmt, QuantFormat):
            n = parameter.size
            for k in keys:
                out[f"{k}_codes"] = ((fmt.code_bytes(n),), mx.uint8)
                out[f"{k}_absmax"] = ((fmt.blocks(n),), mx.float32)
        else:
            out.update({k: (tuple(parameter.shape), fmt) for k in keys})
        out.update({k: ((), mx.float32) for k in self.spec.history})
        return out

    def init_single(self, parameter: mx.array, state: dict) -> None:
        """Zero state (history at its initial values) for a new parameter."""
        for key, (shape, dtype) in self.expected_state(parameter).items():
            initial = self.spec.history.get(key, 0.0)
            state[key] = mx.full(shape, initial, dtype) if initial else mx.zeros(shape, dtype)

    def init(self, parameters: dict) -> None:
        """MLX's lazy initialization, then every existing state checked against its
        parameter (a loaded ``optimizer.state`` included): ValueError names the parameter.
        AMSGrad's maximum is added where ``amsgrad`` was switched on."""
        self._check_format_record(self._state)
        self._check_hyper_state(self._state)
        scales = []
        existing = []
        for path, p in tree_flatten(parameters):  # everything checked before anything changes
            state = _find(self._state, path)
            if state is None or state == {}:
                continue
            self._check_state(path, p, state)
            existing.append((path, p, state))
            scales += [(path, k, v) for k, v in state.items() if k.endswith("_absmax")]
        _check_scales(scales)
        super().init(parameters)  # state for the parameters that have none
        for path, p, state in existing:
            self._check_state(path, p, state, add_missing=True)
        self._add_counters(self._state)
        if self.quant_format is not None:
            self._state["quant_format"] = _format_record(self.quant_format)

    def _check_format_record(self, state: Mapping[str, Any]) -> None:
        record = state.get("quant_format")
        if record is None:
            return
        if not isinstance(record, mx.array) or record.shape != (3,):
            raise ValueError(f"the state's quant_format must be an array of 3 (bits, block, codes), got {record!r}")
        try:
            saved = tuple(int(x) for x in record.tolist())
        except (RuntimeError, ValueError):  # a placeholder inside mx.compile: checked when concrete
            return
        mine = tuple(int(x) for x in _format_record(self.quant_format).tolist()) if self.quant_format else None
        if saved != mine:
            raise ValueError(
                f"the state holds quantized state of format (bits, block, codes) {saved}, this optimizer keeps "
                f"{mine or f'{self.state_bits}-bit state'}: build the optimizer with that state_bits, block_size and "
                "quant_map, "
                "or convert the state (adamkit.mlx.to_torch_state_dict / load_torch_state_dict)"
            )

    def _check_state(self, path: str, parameter: mx.array, state: Any, add_missing: bool = False) -> None:
        if not isinstance(state, dict):
            raise ValueError(f"parameter {path!r}: its state must be a dict, got {type(state).__name__}")
        expected = self.expected_state(parameter)
        amsgrad_key = self.spec.amsgrad_key
        for key, (shape, dtype) in expected.items():
            value = state.get(key)
            if value is None and amsgrad_key and key.startswith(amsgrad_key) and state:
                if add_missing:  # amsgrad switched on: its maximum starts at zero
                    state[key] = mx.zeros(shape, dtype)
                continue
            if not isinstance(value, mx.array):
                raise ValueError(f"parameter {path!r}: state entry {key!r} is missing (has {sorted(state)})")
            if tuple(value.shape) != shape or value.dtype != dtype:
                raise ValueError(
                    f"parameter {path!r}: state entry {key!r} is {value.dtype} {tuple(value.shape)}, expected "
                    f"{dtype} {shape} (state_bits={self.state_bits}, parameter {parameter.dtype} "
                    f"{tuple(parameter.shape)})"
                )

    # ----------------------------------------------------------------------- step
    def apply_gradients(self, gradients: dict, parameters: dict) -> dict:
        """One step: ``parameters`` updated from ``gradients`` (MLX's contract). Checks
        everything first; nothing changes if a check fails."""
        tree_map(_check_pair, gradients, parameters)
        if self._initialized:
            for path, g in tree_flatten(gradients):
                state = _find(self._state, path)
                if state is None or state == {}:  # a parameter new to this optimizer: init adds it
                    self._initialized = False
                    break
                self._check_state(path, g, state)
        flat = tree_flatten(gradients)
        seen = None  # NaN/±inf gradient elements ("skip", "raise")
        if self.nonfinite in ("skip", "raise"):
            seen = sum((mx.sum(~finite_(g)).astype(mx.uint64) for _, g in flat), mx.array(0, mx.uint64))
            if self.nonfinite == "raise":
                _raise_if_nonfinite(seen)
        # Which gradients hold elements that are NaN, ±inf or huge (|g| >= 2^60: moments
        # may overflow), read on the host (one sync on gradients the step needs anyway):
        # the others take the step without the element-wise selects of masking and
        # saturation, MLX's slowest operations on the CPU. Inside mx.compile nothing can
        # be read, and every parameter takes the step that handles them.
        # Parameters the compiled quantized step takes (adamkit.mlx._native) mask in it.
        native = self._native_positions(flat, parameters)
        counts = None
        if self.nonfinite != "propagate" or self.quant_format is not None or len(flat) > 1:
            others = [i for i in range(len(flat)) if i not in native]
            found = _suspects([flat[i][1] for i in others], flat[0][1] if flat else None)
            if found is not None:
                counts = [0] * len(flat)
                for i, count in zip(others, found):
                    counts[i] = count
        ok = None
        if seen is not None and self.nonfinite == "skip":
            if counts is None:  # decided on the device: every update selects on it
                ok = seen == 0
            elif (sum(counts) or native) and int(seen):
                return self._skip(gradients, parameters, seen)
        if not self._initialized:
            self.init(gradients)
        elif self.amsgrad:  # checked: now add the maxima a switch to amsgrad needs
            for path, g in flat:
                self._check_state(path, g, _find(self._state, path), add_missing=True)
        for name, scheduler in self._schedulers.items():
            self.state[name] = scheduler(self.step)
        t = self.step + 1
        decoupled = self.decoupled_weight_decay
        self._consts64 = step_consts(self.algorithm, t, self.learning_rate, self._hyper_vector(), decoupled, ok)
        self._consts = self._consts64.astype(mx.float32)
        self._t = t.astype(mx.uint32)
        self._ok = ok
        # per gradient, in tree_flatten's order (tree_map's): clean, its streams, and the
        # results of the steps taken together (small tensors in one fused call)
        # Quantized state with coupled L2 decay: a non-finite parameter makes its gradient
        # non-finite inside the step, so the codec must store it saturated (no short path).
        coupled = self.quant_format is not None and (not decoupled or self.algorithm == "adamax")
        l2 = counts is not None and coupled and self.weight_decay != 0
        self._clean = [counts is not None and counts[i] == 0 and i not in native for i in range(len(flat))]
        self._finite_quant = not l2
        self._compiled_quant = native
        self._placed = self._place(flat) if counts is not None else {}
        self._masked: list[mx.array] = []
        self._together = self._step_together(flat, parameters) if counts is not None else {}
        self._position = 0
        if ok is not None:
            self.state["nonfinite_count"] = self.state["nonfinite_count"] + seen
            self.state["skipped_steps"] = self.state["skipped_steps"] + (~ok).astype(mx.uint64)
            t = self.step + ok.astype(mx.uint64)
        self.state["step"] = t
        out = tree_map(self.apply_single, gradients, parameters, self.state)
        if self._masked:
            total = sum((m.astype(mx.uint64) for m in self._masked), mx.array(0, mx.uint64))
            self.state["nonfinite_count"] = self.state["nonfinite_count"] + total
        return out

    def _native_positions(self, flat: list[tuple[str, mx.array]], parameters: dict) -> set[int]:
        """The gradients whose step is the compiled quantized step (:mod:`adamkit.mlx._native`):
        quantized state, on MLX's CPU, a format and dtypes it takes, the module loaded
        (the first quantized step starts building it)."""
        if self.quant_format is None or mx.default_device() != mx.cpu:
            return set()
        out = set()
        module = None
        for i, (path, g) in enumerate(flat):
            p = _find(parameters, path)
            fmt = self.state_format(p)
            if isinstance(fmt, QuantFormat) and _native.supports(self.algorithm, fmt, p, g):
                module = module or _native.module()
                if module is None:
                    return set()
                out.add(i)
        return out

    def _place(self, flat: list[tuple[str, mx.array]]) -> dict[int, list]:
        """Each gradient's streams: on MLX's CPU, parameters are spread over one stream per
        core (largest first, each to the least loaded), so that their steps run side by
        side; a quantized parameter's codecs also take the next streams. Not inside
        ``mx.compile`` (its graph is one stream's) nor on other devices."""
        if mx.default_device() != mx.cpu:
            return {}
        streams = _cpu_streams()
        if len(streams) < 2:
            return {}
        load = [0] * len(streams)
        out = {}
        for position in sorted(range(len(flat)), key=lambda i: -flat[i][1].size):
            i = load.index(min(load))
            load[i] += flat[position][1].size
            out[position] = [streams[(i + j) % len(streams)] for j in range(len(streams))]
        return out

    def _step_together(self, flat: list[tuple[str, mx.array]], parameters: dict) -> dict[int, tuple]:
        """Small parameters with dense state and clean gradients, stepped in one fused call
        per (dtype, state dtype): gradients, parameters and state concatenated, the results
        sliced back. Per call MLX spends ~0.2 ms on the CPU, more than a step of a
        thousand elements; a concatenation costs a copy. Not with history (NAdam's
        per-parameter ``mu_product``)."""
        if self.spec.history:
            return {}
        keys = self.spec.state_keys(self.amsgrad)
        groups: dict[tuple, list[tuple[int, mx.array, mx.array, dict]]] = {}
        for position, (path, g) in enumerate(flat):
            if g.size >= SMALL or not self._clean[position]:
                continue
            p, state = _find(parameters, path), _find(self._state, path)
            fmt = self.state_format(p)
            if not isinstance(fmt, QuantFormat):
                groups.setdefault((p.dtype, g.dtype, fmt), []).append((position, g, p, state))
        out: dict[int, tuple] = {}
        for (dtype, _, _), members in groups.items():
            if len(members) < 2:
                continue
            sizes = [g.size for _, g, _, _ in members]
            cuts = list(itertools.accumulate(sizes))[:-1]

            def joined(arrays: list[mx.array]) -> mx.array:
                return mx.concatenate([a.reshape(-1) for a in arrays])

            step = compiled(self.algorithm, keys, None, self.maximize, self.amsgrad, False, False, 0, True)
            consts = self._consts64 if dtype == mx.float64 else self._consts
            new_p, *new_state, _ = step(
                joined([g for _, g, _, _ in members]),
                joined([p for _, _, p, _ in members]),
                consts,
                *(joined([st[k] for _, _, _, st in members]) for k in keys),
            )
            pieces = [mx.split(a, cuts) for a in (new_p, *new_state)]
            for j, (position, _, p, _) in enumerate(members):
                shaped = [piece[j].reshape(p.shape) for piece in pieces]
                out[position] = (shaped[0], dict(zip(keys, shaped[1:])))
        return out

    def _skip(self, gradients: dict, parameters: dict, seen: mx.array) -> dict:
        """A step skipped on the host: counted, nothing else changes."""
        if not self._initialized:
            self.init(gradients)
        self.state["nonfinite_count"] = self.state["nonfinite_count"] + seen
        self.state["skipped_steps"] = self.state["skipped_steps"] + 1
        return tree_map(lambda g, p: p, gradients, parameters)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        """One parameter's compiled step (:func:`adamkit.mlx._rules.compiled`)."""
        position = self._position
        self._position += 1
        if position in self._together:
            new_p, new_state = self._together[position]
            state.update(new_state)
            return new_p
        fmt = self.state_format(parameter)
        keys = self.spec.state_keys(self.amsgrad)
        history = tuple(self.spec.history)
        quant = fmt if isinstance(fmt, QuantFormat) else None
        names = [f"{k}_{part}" for k in keys for part in ("codes", "absmax")] if quant else list(keys)
        names += history
        clean = self._clean[position]
        mask, skip = self.nonfinite == "mask" and not clean, self._ok is not None
        if position in self._compiled_quant:  # one primitive: decode, rule, masking, skip, encode
            mask = self.nonfinite == "mask"
            step = _native.step_fn(_native.module(), self.algorithm, keys, quant, self.maximize, self.amsgrad, mask)
        else:
            finite = clean and (quant is None or self._finite_quant)
            step = compiled(self.algorithm, keys, quant, self.maximize, self.amsgrad, mask, skip, len(history), finite)
        consts = self._consts64 if parameter.dtype == mx.float64 else self._consts
        lead = (consts, self._t) if quant else (consts,)
        streams = self._placed.get(position, [])
        with mx.stream(streams[0]) if streams else contextlib.nullcontext():
            extra = {"streams": streams} if quant else {}
            new_p, *new_state, masked = step(gradient, parameter, *lead, *(state[k] for k in names), **extra)
        state.update(zip(names, new_state))
        if mask:
            self._masked.append(masked)
        return new_p

    # ---------------------------------------------------------------- torch side
    def to_torch_state_dict(self, names: Any, parameters: dict, **kwargs: Any) -> dict[str, Any]:
        """This optimizer's state as a torch ``state_dict``:
        :func:`adamkit.mlx.to_torch_state_dict`."""
        from .convert import to_torch_state_dict

        return to_torch_state_dict(self, names, parameters, **kwargs)

    def load_torch_state_dict(self, state_dict: Mapping[str, Any], names: Any, parameters: dict, **kwargs: Any) -> None:
        """Take the state of a torch ``state_dict``: :func:`adamkit.mlx.load_torch_state_dict`."""
        from .convert import load_torch_state_dict

        load_torch_state_dict(self, state_dict, names, parameters, **kwargs)


def _format_record(fmt: QuantFormat) -> mx.array:
    """(bits, block, codes): codes 0 nearest (the dynamic maps), 1 dithered (4 bits), 2
    the tapered maps (``quant_map="tapered"``)."""
    return mx.array([fmt.bits, fmt.block_key, 2 if fmt.tapered else int(fmt.dither)], mx.int32)


def _checked(name: str, value: Any, below: float = math.inf) -> float:
    """``value`` as a float (a Python, numpy or MLX scalar), in ``[0, below)``."""
    bound = "[0, 1)" if below == 1.0 else ">= 0"
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not 0.0 <= number < below:
        raise ValueError(f"Invalid {name}: {value!r} (a number {bound})")
    return number


def _check_parameter(p: Any) -> None:
    if not isinstance(p, mx.array):
        raise TypeError(f"parameters and gradients must be mlx arrays, got {type(p).__name__}")
    if not mx.issubdtype(p.dtype, mx.floating):
        raise TypeError(f"adamkit.mlx steps real floating-point parameters, got {p.dtype}")


def _check_pair(g: Any, p: Any) -> None:
    _check_parameter(g)
    _check_parameter(p)
    if tuple(g.shape) != tuple(p.shape):
        raise ValueError(f"a gradient of shape {tuple(g.shape)} for a parameter of shape {tuple(p.shape)}")


def _find(tree: Any, path: str) -> Any:
    """The subtree of ``tree`` at a ``tree_flatten`` path (``"layers.0.weight"``)."""
    for part in path.split("."):
        tree = (
            tree[int(part)] if isinstance(tree, (list, tuple)) else tree.get(part) if isinstance(tree, dict) else None
        )
    return tree


def _check_scales(scales: list[tuple[str, str, mx.array]]) -> None:
    """Block scales of quantized state (a loaded ``optimizer.state``) are finite and not
    negative: read once, when the state is taken up (not inside ``mx.compile``)."""
    if not scales:
        return
    bad = _read([mx.sum(~((v >= 0) & (v < math.inf))) for _, _, v in scales])
    for (path, key, _), count in zip(scales, bad or []):
        if count:
            raise ValueError(f"parameter {path!r}: {key} holds {count} negative or non-finite block scale(s)")


@cache
def _cpu_streams() -> list:
    """One MLX CPU stream per core (``ADAMKIT_MLX_STREAMS`` overrides; at most 8): MLX runs
    each stream's operations on its own thread."""
    count = int(os.environ.get("ADAMKIT_MLX_STREAMS", os.cpu_count() or 1))
    return [mx.new_stream(mx.cpu) for _ in range(max(1, min(count, 8)))]


def _tracing(step: mx.array) -> bool:
    """Whether this runs inside a transformation (``mx.compile``), where nothing is read."""
    try:
        step.item()
    except (RuntimeError, ValueError):
        return True
    return False


#: Parameters below this many elements are stepped together (see ``_step_together``).
SMALL = 1 << 16


def _suspects(grads: list[mx.array], probe: mx.array | None = None) -> list[int] | None:
    """Per gradient, its elements that are NaN, ±inf or huge, read on the host (None
    inside ``mx.compile``, and then the step's place is not decided here either). The
    small gradients are counted together, one by one only if they hold any. ``probe``:
    a gradient, which tells whether this runs inside ``mx.compile`` when ``grads`` is empty."""

    def count(g: mx.array) -> mx.array:
        return mx.sum(~(mx.abs(g) < HUGE))

    small = [i for i, g in enumerate(grads) if g.size < SMALL]
    exprs = [count(g) for g in grads if g.size >= SMALL]
    if len(small) > 1:
        exprs.append(count(mx.concatenate([grads[i].reshape(-1).astype(mx.float32) for i in small])))
    elif small:
        exprs.append(count(grads[small[0]]))
    if _tracing(exprs[0] if exprs else probe.reshape(-1)[:1].sum() if probe is not None else mx.array(0)):
        return None
    values = _read(exprs)
    if values is None:
        return None
    out = [0] * len(grads)
    for i, v in zip([i for i, g in enumerate(grads) if g.size >= SMALL], values):
        out[i] = v
    if small and values[-1]:
        for i, v in zip(small, _read([count(grads[i]) for i in small]) or []):
            out[i] = v
    return out


def _read(counts: list[mx.array]) -> list[int] | None:
    """The counts on the host, or None inside a transformation (``mx.compile``), where
    nothing can be read."""
    if not counts:
        return []
    try:
        return [int(x) for x in mx.stack(counts).tolist()]
    except (RuntimeError, ValueError):
        return None


def _raise_if_nonfinite(seen: mx.array) -> None:
    try:
        count = int(seen)
    except (RuntimeError, ValueError) as err:  # evaluated inside a transformation (mx.compile)
        raise RuntimeError(
            "nonfinite='raise' reads the gradients on the host, which mx.compile does not allow: use "
            "nonfinite='skip' or 'mask' inside a compiled step"
        ) from err
    if count:
        raise FloatingPointError(f"{count} gradient element(s) are NaN or infinite; nothing was changed")


_ARGS = """
    Args:
        learning_rate: γ, a float or a schedule (a callable of the step array, as
            ``mlx.optimizers`` schedules); ``lr=`` is accepted as torch's name for it.
        betas: (β1, β2), each in [0, 1).
        eps: ε.
        weight_decay: λ.
        state_bits: 32 (float32 state; float64 for float64 parameters), 16 (bfloat16
            moments, math in float32), 8 or 4 (block-wise quantized moments with the
            torch side's codebooks: :mod:`adamkit.quant`) for parameters of at least
            ``min_quant_size`` elements; smaller ones keep 32-bit state.
        block_size: elements per absmax of quantized state (default 256 at 8 bits, 128 at 4).
        min_quant_size: smaller parameters keep 32-bit state (default 4096).
        nonfinite: what a NaN/±inf gradient element does, as on the torch side:
            ``"mask"`` (default: its parameter and moments stay unchanged, and those of
            an element whose gradient is so large that its moments overflow; counted in
            ``nonfinite_count``), ``"skip"`` (the whole step is skipped, ``step`` not
            incremented; ``skipped_steps`` counts them), ``"propagate"`` (torch's and
            MLX's behaviour) or ``"raise"`` (FloatingPointError, nothing changed; reads
            the gradients on the host, so not inside ``mx.compile``).
        quant_map: 8-bit state's codebooks: ``"dynamic"`` (default, bitsandbytes'
            maps) or ``"tapered"`` (as on the torch side).
"""


class Adam(AdamFamily):
    __doc__ = (
        """Adam as ``torch.optim.Adam``: bias-corrected moments, L2 weight decay added to
    the gradient (``decoupled_weight_decay=True``: AdamW's decay), ``amsgrad``, ``maximize``.
"""
        + _ARGS
        + """        amsgrad: use the running maximum of ``v``.
        maximize: maximize the objective.
        decoupled_weight_decay: decay the parameter instead (AdamW).

    Example:
        >>> import mlx.nn as nn, adamkit.mlx
        >>> model = nn.Linear(4, 1)
        >>> opt = adamkit.mlx.Adam(learning_rate=1e-3)
"""
    )

    algorithm = "adam"

    def __init__(
        self,
        learning_rate: float | Callable[[mx.array], mx.array] = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        lr: float | None = None,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
        state_bits: int = 32,
        block_size: int | None = None,
        min_quant_size: int = 4096,
        nonfinite: str = "mask",
        quant_map: str = "dynamic",
    ) -> None:
        super().__init__(
            learning_rate, betas, eps, weight_decay, lr=lr, amsgrad=amsgrad, maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay, state_bits=state_bits, block_size=block_size,
            min_quant_size=min_quant_size, nonfinite=nonfinite, quant_map=quant_map,
        )  # fmt: skip


class AdamW(Adam):
    __doc__ = (
        """AdamW as ``torch.optim.AdamW``: Adam with decoupled weight decay,
    ``θ ← (1 - γλ)·θ`` before the update (``weight_decay`` defaults to 1e-2). Unlike
    ``mlx.optimizers.AdamW``, bias correction is always on.
"""
        + _ARGS
        + """        amsgrad: use the running maximum of ``v``.
        maximize: maximize the objective.
"""
    )

    def __init__(
        self,
        learning_rate: float | Callable[[mx.array], mx.array] = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        lr: float | None = None,
        maximize: bool = False,
        state_bits: int = 32,
        block_size: int | None = None,
        min_quant_size: int = 4096,
        nonfinite: str = "mask",
        quant_map: str = "dynamic",
    ) -> None:
        super().__init__(
            learning_rate, betas, eps, weight_decay, amsgrad, lr=lr, maximize=maximize,
            decoupled_weight_decay=True, state_bits=state_bits, block_size=block_size,
            min_quant_size=min_quant_size, nonfinite=nonfinite, quant_map=quant_map,
        )  # fmt: skip


class Adamax(AdamFamily):
    __doc__ = (
        """Adamax as ``torch.optim.Adamax``: ``u ← max(β2·u, |g| + ε)`` (ε inside the
    maximum), the first moment bias-corrected, L2 weight decay. ``mlx.optimizers.Adamax``
    has no bias correction and adds ε outside the maximum.
"""
        + _ARGS
        + """        maximize: maximize the objective.
"""
    )

    algorithm = "adamax"

    def __init__(
        self,
        learning_rate: float | Callable[[mx.array], mx.array] = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        lr: float | None = None,
        maximize: bool = False,
        state_bits: int = 32,
        block_size: int | None = None,
        min_quant_size: int = 4096,
        nonfinite: str = "mask",
        quant_map: str = "dynamic",
    ) -> None:
        super().__init__(
            learning_rate, betas, eps, weight_decay, lr=lr, maximize=maximize, state_bits=state_bits,
            block_size=block_size, min_quant_size=min_quant_size, nonfinite=nonfinite, quant_map=quant_map,
        )  # fmt: skip


class NAdam(AdamFamily):
    __doc__ = (
        """NAdam as ``torch.optim.NAdam``: Nesterov momentum with torch's momentum schedule
    ``μ_t = β1·(1 - ½·0.96^(t·ψ))`` and each parameter's ``mu_product``; L2 weight decay,
    or decoupled with ``decoupled_weight_decay=True`` (NAdamW). MLX has no NAdam.
"""
        + _ARGS
        + """        momentum_decay: ψ (default 4e-3).
        maximize: maximize the objective.
        decoupled_weight_decay: decay the parameter instead.
"""
    )

    algorithm = "nadam"

    def __init__(
        self,
        learning_rate: float | Callable[[mx.array], mx.array] = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum_decay: float = 4e-3,
        *,
        lr: float | None = None,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
        state_bits: int = 32,
        block_size: int | None = None,
        min_quant_size: int = 4096,
        nonfinite: str = "mask",
        quant_map: str = "dynamic",
    ) -> None:
        super().__init__(
            learning_rate, betas, eps, weight_decay, lr=lr, maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay, momentum_decay=momentum_decay, state_bits=state_bits,
            block_size=block_size, min_quant_size=min_quant_size, nonfinite=nonfinite, quant_map=quant_map,
        )  # fmt: skip
