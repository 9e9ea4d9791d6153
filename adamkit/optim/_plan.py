"""Cached launch plans: state and address tables for table-driven kernels.

For 20,000 small tensors torch's fused AdamW spends ~10 µs per tensor; a Python loop
that merely looks at each tensor a few times costs ~1 µs. So a param group whose
parameters a table kernel can all take (numba on the CPU, Triton on CUDA) gets a
:class:`GroupPlan`, built once and kept across steps:

* the address table's state columns are filled once: state the plan creates lives in
  one flat buffer per (state key, dtype segment), and state a parameter already has
  (earlier steps, a checkpoint) is used where it is, so a tensor taken from
  ``optimizer.state`` stays the one the optimizer updates, as in torch;
* the ``step`` counters are 0-dim views into one flat tensor: one add per step.

What the plan reuses is checked every step, with C-level ``map`` calls over the group
(no per-tensor Python bytecode), a slice of parameters at a time so that every pass
over a slice finds its tensors' metadata in cache: for each parameter and gradient
its type (plain tensors only: a subclass may not hold its data where ``data_ptr``
says), dtype, size in bytes, layout (contiguous, or the parameter's ``channels_last``
order), device and address. A gradient kept from the last step is checked as a new
one is (``.grad.data = t`` and ``.grad.set_(t)`` re-point the same tensor), and a
parameter whose data was replaced (``p.data = ...``) is followed where its dtype, size
and layout are unchanged. The optimizer's ``state`` and every per-parameter dict in
it are :class:`TrackedDict` s that count their mutations, so replacing
``opt.state[p]`` or ``opt.state[p]["exp_avg"]`` is noticed at no per-step cost; the
state tensors' storages are held by the plan, so whatever a user does to a state
tensor, the kernels never write to freed memory. Anything unexpected sends the step
down the general path, which explains errors precisely; a change of the parameters
themselves or of the state rebuilds the plan.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from itertools import repeat
from operator import attrgetter, is_, is_not, methodcaller
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import _memory
from .._paged import MIN_PAGED_NUMEL
from ..kernels._checks import LOWEST_ADDRESS, PLAIN_TYPES, storage_order
from ..kernels._tables import Tables, chunk_table, unit_table
from ..kernels.registry import Bucket, Kernel
from ..quant import QuantFormat
from . import _native

_GRAD = attrgetter("grad")
_DTYPE = attrgetter("dtype")
_SHAPE = attrgetter("shape")
#: whether a tensor is on a plan's kind of device (a plan's tensors share one device)
_ON_DEVICE = {"cpu": attrgetter("is_cpu"), "cuda": attrgetter("is_cuda")}
_data_ptr = Tensor.data_ptr
_is_contiguous = Tensor.is_contiguous
_untyped_storage = Tensor.untyped_storage
_nbytes = methodcaller("nbytes")
_storage_offset = Tensor.storage_offset
_storage_data_ptr = torch.UntypedStorage.data_ptr
#: Parameters per slice of the per-step checks: their metadata stays in L2 between passes.
SLICE = 512


def laid_out_like(t: Tensor, order: tuple[int, ...] | None) -> bool:
    """Whether ``t`` has the :func:`storage_order` ``order``, or is contiguous if None
    (a plan's key for a contiguous parameter)."""
    return t.is_contiguous() if order is None else storage_order(t) == order


class Counter:
    """A mutation count shared by an optimizer's state dicts."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


class _Tracking:
    """Mixin for dicts: every mutation bumps the shared ``_counter``."""

    _counter: Counter

    def __setitem__(self, key: Any, value: Any) -> None:
        self._counter.n += 1
        super().__setitem__(key, value)  # type: ignore[misc]

    def __delitem__(self, key: Any) -> None:
        self._counter.n += 1
        super().__delitem__(key)  # type: ignore[misc]

    def __ior__(self, other: Any) -> Any:
        self._counter.n += 1
        return super().__ior__(other)  # type: ignore[misc]

    def pop(self, *args: Any) -> Any:
        self._counter.n += 1
        return super().pop(*args)  # type: ignore[misc]

    def popitem(self) -> Any:
        self._counter.n += 1
        return super().popitem()  # type: ignore[misc]

    def clear(self) -> None:
        self._counter.n += 1
        super().clear()  # type: ignore[misc]

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._counter.n += 1
        super().update(*args, **kwargs)  # type: ignore[misc]

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self._counter.n += 1
        return super().setdefault(key, default)  # type: ignore[misc]


class TrackedDict(_Tracking, dict):
    """One parameter's state: a dict whose mutations are counted."""

    def __init__(self, counter: Counter, *args: Any) -> None:
        self._counter = counter
        dict.__init__(self, *args)

    def __reduce__(self) -> Any:  # dict's sets the items before the counter exists
        return (TrackedDict, (self._counter, dict(self)))


class TrackedState(_Tracking, defaultdict):
    """``optimizer.state``: param -> :class:`TrackedDict`, mutations counted."""

    def __init__(self, items: Any = ()) -> None:
        self._counter = Counter()
        defaultdict.__init__(self, self._new)
        for key, value in dict(items).items():
            defaultdict.__setitem__(self, key, self.adopt(value))

    def _new(self) -> TrackedDict:
        return TrackedDict(self._counter)

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, self.adopt(value))

    def put(self, key: Any, value: Any) -> None:
        """A plan's own write of its parameters' state, not counted: no other group's
        plan depends on these entries (a parameter is in one group), so it stays valid;
        the writing plan records the state it wrote."""
        defaultdict.__setitem__(self, key, self.adopt(value))

    def adopt(self, value: Any) -> Any:
        """``value`` as a TrackedDict of this state (a plain dict is converted)."""
        if isinstance(value, dict) and not (isinstance(value, TrackedDict) and value._counter is self._counter):
            return TrackedDict(self._counter, value)
        return value

    def __reduce__(self) -> Any:  # defaultdict's drops the counter; keep items and counter
        return (_rebuild_state, (self._counter, list(self.items())))

    @property
    def version(self) -> int:
        return self._counter.n


def _rebuild_state(counter: Counter, items: list[tuple[Any, Any]]) -> TrackedState:
    state = TrackedState()
    state._counter = counter
    for key, value in items:
        defaultdict.__setitem__(state, key, value)
    return state


def quant_meta(fmt: QuantFormat) -> dict[str, int]:
    """The state entries that name a quantized format (``quant_bits``, ``quant_block``,
    ``quant_dither``, and ``quant_map`` 1 for the tapered maps: absent, the dynamic
    maps, so that their checkpoints are as before)."""
    meta = {"quant_bits": fmt.bits, "quant_block": fmt.block_key, "quant_dither": int(fmt.dither)}
    if fmt.tapered:
        meta["quant_map"] = 1
    return meta


def _columns(keys: tuple[str, ...], fmt: Any) -> list[tuple[str, torch.dtype, Callable[[Tensor], int] | None]]:
    """The flat state columns of a format: (state entry, dtype, elements per parameter;
    None: the parameter's own shape). Dense: one per key in the state dtype; quantized
    (:class:`adamkit.quant.QuantFormat`): codes (uint8) and absmax (float32) per key."""
    if isinstance(fmt, torch.dtype):
        return [(k, fmt, None) for k in keys]
    out: list[tuple[str, torch.dtype, Callable[[Tensor], int] | None]] = []
    for k in keys:
        out.append((f"{k}_codes", torch.uint8, lambda p: fmt.code_bytes(p.numel())))
        out.append((f"{k}_absmax", torch.float32, lambda p: fmt.blocks(p.numel())))
    return out


class _Segment:
    """The parameters of a plan that share (param dtype, state format): one kernel call."""

    def __init__(
        self, kernel: Kernel, members: np.ndarray, params: Sequence[Tensor], n_state: int, state_dtype: Any
    ) -> None:
        self.kernel = kernel
        self.state_dtype = state_dtype
        self.members = members  # indices into the group's params
        # all of them, in order (the usual single-dtype group): slices instead of gathers
        self.whole = members.size == len(params) and bool((members == np.arange(members.size)).all())
        self.numels = np.array([params[i].numel() for i in members], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.numels)])
        self.chunks = chunk_table(self.numels)
        self.units = unit_table(self.chunks)
        self.ptrs = np.zeros((len(members), 2 + n_state), dtype=np.int64)
        self.param_dtype = params[members[0]].dtype
        self.on_device: Tensor | None = None  # members as a device index (a capturable plan's, not whole)


class GroupPlan:
    """State and tables for one param group; see the module docstring.

    Args:
        params: the group's parameters (plain tensors on one device, all taken by
            table kernels, each listed once).
        kernels: the kernel of each parameter.
        state: the optimizer's ``state`` (read and updated in place); a parameter's
            existing state must be in its format, on its device, laid out as it is.
        keys: the state keys besides ``step``.
        state_dtypes: the state dtype (or quantized format) of each parameter.
        step_dtype: dtype of the ``step`` counters.
        signature: the group settings the plan depends on (compared each step).
        capturable: ``step`` counters on the parameters' device, advanced there
            (:meth:`_Launch.advance`), as torch's ``capturable=True`` keeps them.
        history: the algorithm's per-parameter history entries (NAdam's ``mu_product``):
            (dtype, initial value) by name, kept like ``step``, as views of one flat
            tensor each.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        kernels: Sequence[Kernel],
        state: TrackedState,
        keys: tuple[str, ...],
        state_dtypes: Sequence[Any],
        step_dtype: torch.dtype,
        signature: tuple[Any, ...],
        capturable: bool = False,
        history: Mapping[str, tuple[torch.dtype, float]] | None = None,
        paged: Callable[[int, torch.dtype], Tensor] | None = None,
    ) -> None:
        self.params = list(params)
        self._paged = paged
        n = len(self.params)
        self.device = params[0].device
        self.capturable = capturable
        self._on_device = _ON_DEVICE[self.device.type]
        self.keys = keys
        self.signature = signature
        self.numels = np.array([p.numel() for p in params], dtype=np.int64)
        self.nbytes = self.numels * np.array([p.element_size() for p in params], dtype=np.int64)
        self.itemsizes = np.array([p.element_size() for p in params], dtype=np.int64)
        self.dtypes = [p.dtype for p in params]
        self.shapes = [p.shape for p in params]
        #: each parameter's layout: None if contiguous, else its :func:`storage_order`
        #: (``channels_last`` weights), which its gradients and state share
        self.orders = [None if p.is_contiguous() else storage_order(p) for p in params]
        self._strided = any(o is not None for o in self.orders)
        self.steps = torch.zeros(n, dtype=step_dtype, device=self.device if capturable else "cpu")
        self.views: list[dict[str, Tensor]] = [{"step": self.steps[i]} for i in range(n)]
        #: the history entries, flat (their initial values are set for new parameters by
        #: the optimizer's state, copied in below, or at their first step)
        self.history = {k: torch.full((n,), v, dtype=dt) for k, (dt, v) in (history or {}).items()}
        for key, flat in self.history.items():
            for i in range(n):
                self.views[i][key] = flat[i]
        self.meta: list[dict[str, int]] = [{} for _ in params]  # quantized state's format entries
        self.segments: list[_Segment] = []
        self._held: list[Any] = []  # the flat buffers, and the storages of state used where it is
        by_layout: dict[tuple[Any, ...], list[int]] = {}
        for i, (p, sd) in enumerate(zip(params, state_dtypes)):
            by_layout.setdefault((p.dtype, sd, id(kernels[i])), []).append(i)
        for (_, sd, _), idx in by_layout.items():
            columns = _columns(keys, sd)
            seg = _Segment(kernels[idx[0]], np.array(idx, dtype=np.int64), params, len(columns), sd)
            for col, (key, dtype, count) in enumerate(columns):
                sizes = seg.numels if count is None else np.array([count(params[i]) for i in idx], dtype=np.int64)
                existing = [(state.get(params[i]) or {}).get(key) for i in idx]
                fresh = [row for row, t in enumerate(existing) if t is None]
                views = iter(self._flat(sizes[fresh], dtype, not key.endswith("_absmax")))
                for row, i in enumerate(idx):
                    if existing[row] is not None:  # earlier steps' or a checkpoint's: kept where it is
                        tensor = existing[row]
                        self._held.append(tensor.untyped_storage())
                    elif count is not None:
                        tensor = next(views)
                    elif self.orders[i] is None:
                        tensor = next(views).view(params[i].shape)
                    else:  # laid out as the parameter, as torch's zeros_like state is
                        tensor = next(views).as_strided(params[i].shape, params[i].stride())
                    self.views[i][key] = tensor
                    seg.ptrs[row, 2 + col] = tensor.data_ptr()
            if not isinstance(sd, torch.dtype):
                for i in idx:
                    self.meta[i] = quant_meta(sd)
            if capturable and not seg.whole:
                seg.on_device = torch.from_numpy(seg.members).to(self.device)
            self.segments.append(seg)
        self._record: tuple[np.ndarray, np.ndarray] | None = None  # the native checks' (see prepare)
        self.has_state = np.zeros(n, dtype=bool)
        for i, p in enumerate(params):
            old = state.get(p)
            if old:
                self.views[i]["step"].copy_(old["step"])
                for key in self.history:
                    self.views[i][key].copy_(old[key])
                state.put(p, {**old, **self.views[i], **self.meta[i]})
                self.has_state[i] = True
        #: where the storages of the state it steps are: an in-place resize_ of a state
        #: tensor or its storage moves it (checked every step)
        self._storages = [x.untyped_storage() if isinstance(x, Tensor) else x for x in self._held]
        self._storage_at = self._where_storages()
        self.version = state.version
        self.counter = state._counter  # this state's, not a new one's (which counts from 0 again)

    def _where_storages(self) -> np.ndarray:
        """The addresses of the state's storages."""
        # resize_ of a storage (to any other size, 0 included) reallocates it: its
        # address tells; one C-level pass (~0.1 us a storage)
        return np.fromiter(map(_storage_data_ptr, self._storages), dtype=np.int64, count=len(self._storages))

    def _flat(self, sizes: np.ndarray, dtype: torch.dtype, moment: bool = True) -> list[Tensor]:
        """Views of one new zero buffer, ``sizes`` elements each, each starting on 16
        bytes (the GPU kernels then move 16 bytes per access). Moments (not block scales)
        of paged state go to the optimizer's paged arena when the buffer is large."""
        unit = max(1, 16 // dtype.itemsize)
        offsets = np.concatenate([[0], np.cumsum(-(-sizes // unit) * unit)]).astype(np.int64)
        size = int(offsets[-1])
        if self._paged is not None and moment and size >= MIN_PAGED_NUMEL:
            flat = self._paged(size, dtype)
        elif self.device.type == "cpu":
            flat = _memory.zeros(size, dtype)  # on huge pages where possible
        else:
            flat = torch.zeros(size, dtype=dtype, device=self.device)
        self._held.append(flat)
        return [flat[int(lo) : int(lo) + int(k)] for lo, k in zip(offsets[:-1], sizes)]

    def intact(self, params: list[Tensor], state: TrackedState, signature: tuple) -> bool:
        """Whether the group and its state are still what this plan was built for
        (parameters compared by identity, ``operator.is_`` mapped in C: ``==`` on
        tensors would compare values)."""
        return (
            isinstance(state, TrackedState)
            and state._counter is self.counter
            and state.version == self.version
            and signature == self.signature
            and len(params) == len(self.params)
            and all(map(is_, params, self.params))
        )

    def _alike(self, tensors: list[Tensor], lo: int, hi: int, idx: np.ndarray | None = None) -> bool:
        """Whether ``tensors`` (of parameters ``lo:hi``, or those at ``idx``) are plain
        tensors with the parameters' dtypes, shapes, layouts and device, as the plan
        was built for: one C-level pass for each."""
        if idx is None:
            dtypes, shapes = self.dtypes[lo:hi], self.shapes[lo:hi]
        else:
            dtypes, shapes = [self.dtypes[i] for i in idx], [self.shapes[i] for i in idx]
        return (
            set(map(type, tensors)) <= PLAIN_TYPES
            and list(map(_DTYPE, tensors)) == dtypes
            and list(map(_SHAPE, tensors)) == shapes
            and self._laid_out(tensors, lo, hi, idx)
            and all(map(self._on_device, tensors))
        )

    def _in_storage(self, tensors: list[Tensor], rows: slice | np.ndarray) -> bool:
        """Whether each of ``tensors`` (laid out as the parameters at ``rows``, checked
        before) has a storage that still holds its elements (a storage can be resized
        under a tensor): C-level passes."""
        count = len(tensors)
        offsets = np.fromiter(map(_storage_offset, tensors), dtype=np.int64, count=count)
        held = np.fromiter(map(_nbytes, map(_untyped_storage, tensors)), dtype=np.int64, count=count)
        return bool(((offsets * self.itemsizes[rows] + self.nbytes[rows] <= held) | (self.nbytes[rows] == 0)).all())

    def _laid_out(self, tensors: list[Tensor], lo: int, hi: int, idx: np.ndarray | None = None) -> bool:
        """Whether ``tensors`` are laid out as the parameters ``lo:hi`` (or those at
        ``idx``): one C-level pass when every parameter is contiguous."""
        if not self._strided:
            return all(map(_is_contiguous, tensors))
        orders = self.orders[lo:hi] if idx is None else [self.orders[i] for i in idx]
        return all(map(laid_out_like, tensors, orders))

    def prepare(self) -> tuple[_Launch | None, list[Tensor | None] | None, bool]:
        """Check this step's parameters and gradients: ``(launch, gradients or None,
        False)``, or ``(None, None, stale)`` to send the step down the general path,
        ``stale`` when a parameter is no longer what the plan was built for (a new dtype,
        size or layout: the plan is rebuilt). Nothing is changed.

        The checks run in torch's C++ API once :mod:`adamkit.optim._native` is loaded
        (its build starts in the background for plans of many parameters), in Python
        until then; both check the same things."""
        if not self.capturable:
            steps = self.steps.numpy()
            if not (np.isfinite(steps).all() and (steps >= 0).all() and (steps == np.floor(steps)).all()):  # edited
                return None, None, True
        if not np.array_equal(self._where_storages(), self._storage_at):  # a state tensor resized in place
            return None, None, True
        native = _native.module(start=len(self.params) >= _native.MIN_PARAMS)
        if native is None:
            return self._prepare_python()
        if self._record is None:  # the record is taken of parameters the Python checks pass
            out = self._prepare_python()
            if not out[2]:
                self._record = self._describe(native)
            return out
        return self._prepare_native(native)

    def _describe(self, native: Any) -> tuple[np.ndarray, np.ndarray]:
        meta = np.empty((len(self.params), 6), dtype=np.int64)
        layouts = np.empty(2 * sum(len(s) for s in self.shapes), dtype=np.int64)
        native.describe(self.params, meta, layouts)
        return meta, layouts

    def _prepare_native(self, native: Any) -> tuple[_Launch | None, None, bool]:
        n = len(self.params)
        pptrs, gptrs, active = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64), np.empty(n, dtype=np.uint8)
        verdict, held = native.check(self.params, tuple(PLAIN_TYPES), *self._record, pptrs, gptrs, active)
        if verdict:
            return None, None, verdict == 1
        present = active.view(bool)
        idx = None if present.all() else np.flatnonzero(present)
        launch = _Launch(self, present, idx, gptrs, pptrs)
        launch.held = held  # the storages checked, until the step is done (a thread may drop a gradient)
        return launch, None, False

    def _prepare_python(self) -> tuple[_Launch | None, list[Tensor | None] | None, bool]:
        """:meth:`prepare`'s checks in Python, with C-level ``map`` calls."""
        params, n = self.params, len(self.params)
        grads: list[Tensor | None] = []
        pptrs = np.empty(n, dtype=np.int64)
        gptrs = np.zeros(n, dtype=np.int64)
        try:
            for lo in range(0, n, SLICE):
                hi = min(lo + SLICE, n)
                part = params[lo:hi]
                if not self._alike(part, lo, hi) or not self._in_storage(part, slice(lo, hi)):
                    return None, None, True
                pptrs[lo:hi] = np.fromiter(map(_data_ptr, part), dtype=np.int64, count=hi - lo)
                live = list(map(_GRAD, part))
                grads += live
                idx = None
                if not all(map(is_not, live, repeat(None))):  # not ``in``: that would call Tensor.__eq__
                    idx = lo + np.flatnonzero(np.fromiter(map(is_not, live, repeat(None)), dtype=bool, count=hi - lo))
                    live = [grads[i] for i in idx]
                rows = slice(lo, hi) if idx is None else idx
                if not self._alike(live, lo, hi, idx) or not self._in_storage(live, rows):
                    return None, None, False
                at = slice(lo, hi) if idx is None else idx
                gptrs[at] = np.fromiter(map(_data_ptr, live), dtype=np.int64, count=len(live))
        except RuntimeError:  # e.g. a tensor without storage
            return None, None, False
        active = np.fromiter(map(is_not, grads, repeat(None)), dtype=bool, count=n)
        freed = ((pptrs < LOWEST_ADDRESS) | (active & (gptrs < LOWEST_ADDRESS))) & (self.numels > 0)
        if freed.any():  # the general path says which
            return None, None, False
        idx = None if active.all() else np.flatnonzero(active)
        return _Launch(self, active, idx, gptrs, pptrs), grads, False


class _Launch:
    """One step of a plan, validated: :meth:`advance`, then :meth:`buckets` to launch."""

    def __init__(
        self, plan: GroupPlan, active: np.ndarray, idx: np.ndarray | None, gptrs: np.ndarray, pptrs: np.ndarray
    ) -> None:
        """``active``: which parameters have a gradient (``idx``: their indices, or None
        for all); ``gptrs``, ``pptrs``: every parameter's gradient and data addresses."""
        self.plan, self.active, self.idx, self.gptrs, self.pptrs = plan, active, idx, gptrs, pptrs
        self.held: Any = None

    def stepped(self) -> list[Tensor]:
        """The parameters this step updates (those with a gradient)."""
        params = self.plan.params
        return params if self.idx is None else [params[i] for i in self.idx]

    def advance(self, state: TrackedState, advance: Callable[[Any, Any], None] | None = None) -> None:
        """Create missing state and advance the stepped parameters' ``step`` counters (and
        their history, with ``advance``): on the host, or, for a capturable plan (every
        parameter has a gradient), on the device."""
        plan = self.plan
        self._adopt_new_state(state)
        if plan.capturable:
            assert self.idx is None, "capturable plans step every parameter"
            plan.steps.add_(1)
            return
        if self.idx is None:
            plan.steps.add_(1)
            values = plan.steps.numpy()
        else:
            plan.steps[torch.from_numpy(self.idx)] += 1
            values = plan.steps.numpy()[self.idx]
        if advance is None or values.size == 0:
            return
        if self.idx is None:
            advance(values.tolist(), plan.history)
            return
        rows_t = torch.from_numpy(self.idx)
        moved = {k: flat[rows_t] for k, flat in plan.history.items()}
        advance(values.tolist(), moved)
        for k, flat in plan.history.items():
            flat[rows_t] = moved[k]

    def unstep(self, found_inf: Tensor) -> None:
        """A capturable step that GradScaler skipped (``found_inf``) does not count."""
        self.plan.steps.sub_(found_inf.to(self.plan.steps.device, self.plan.steps.dtype))

    def buckets(self) -> list[Bucket]:
        """One :class:`Bucket` per segment (after :meth:`advance`): the plan's address
        tables with this step's parameter and gradient addresses, and the steps (with
        the history) of the parameters that have a gradient."""
        plan = self.plan
        everyone = self.idx is None
        if plan.capturable:
            t = plan.steps.to(torch.float64)
        else:
            keys = plan.steps.numpy().astype(np.float64).reshape(-1, 1)
            if plan.history:
                keys = np.column_stack([keys] + [flat.numpy().astype(np.float64) for flat in plan.history.values()])
        out = []
        for seg in plan.segments:
            chunks, units = seg.chunks, seg.units
            if seg.whole:
                seg.ptrs[:, 0], seg.ptrs[:, 1] = self.pptrs, self.gptrs
            else:
                seg.ptrs[:, 0], seg.ptrs[:, 1] = self.pptrs[seg.members], self.gptrs[seg.members]
            rows = None
            if not everyone:
                live = self.active[seg.members]
                chunks, units = chunks[live[chunks[:, 0]]], None
                rows = np.flatnonzero(live)
                if rows.size == 0:
                    continue
            if plan.capturable:
                steps = t if seg.whole else t.index_select(0, seg.on_device)
                tab = Tables(seg.ptrs, chunks, np.zeros((0, 2)), seg.members, seg.param_dtype, seg.state_dtype,
                             units, plan.device)  # fmt: skip
            else:
                steps = keys[seg.members] if rows is None else keys[seg.members[rows]]
                counts = plan.steps.numpy()[seg.members]  # dithered 4-bit codes depend on them
                tab = Tables(seg.ptrs, chunks, np.zeros((seg.members.size, 0)), seg.members, seg.param_dtype,
                             seg.state_dtype, units, plan.device, counts)  # fmt: skip
            members = seg.members if rows is None else seg.members[rows]
            out.append(
                Bucket(
                    seg.kernel, plan.device, seg.param_dtype, seg.state_dtype, steps, tables=tab, rows=rows,
                    table_grads=lambda members=members: [plan.params[i].grad for i in members],
                )
            )  # fmt: skip
        return out

    def _adopt_new_state(self, state: TrackedState) -> None:
        """Give the parameters stepped for the first time their views of the flat state."""
        plan = self.plan
        fresh = np.flatnonzero(self.active & ~plan.has_state)
        for i in fresh:
            state.put(plan.params[i], {**plan.views[i], **plan.meta[i]})
        if fresh.size:
            plan.has_state[fresh] = True
