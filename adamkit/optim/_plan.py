"""Cached launch plans: flat state and address tables for table-driven kernels.

For 20,000 small tensors torch's fused AdamW spends ~10 µs per tensor; a Python loop
that merely looks at each tensor a few times costs ~1 µs. So a param group whose
parameters a table kernel can all take (numba on the CPU) gets a :class:`GroupPlan`,
built once and kept across steps:

* its state lives in one flat buffer per (state key, dtype segment); the tensors in
  ``optimizer.state`` are views into it, so checkpoints keep torch's keys and shapes;
* the ``step`` counters are 0-dim views into one flat tensor: one add per step;
* the state columns of the address tables are filled once.

Per step only what can change is read, with C-level ``map`` calls over the group
(no per-tensor Python bytecode): the gradients, their size in bytes, contiguity (or,
for a ``channels_last`` parameter, its layout), device and addresses, and the
parameters' addresses. Each pass over 20,000 tensors costs 1-2 ms (a cache miss per
tensor), so the checks are the ones torch does not already guarantee: the ``.grad``
setter and autograd keep a gradient's dtype, shape and device equal to its
parameter's, but not its contiguity; the byte size still guards the kernel's reads
against a gradient resized behind torch's back (a bf16 gradient reinterpreted as fp16
through ``.data`` would go unnoticed). A parameter
whose address changed (``p.data = ...``) is checked in full. The optimizer's ``state`` and
every per-parameter dict in it are :class:`TrackedDict` s that count their
mutations, so replacing ``opt.state[p]`` or ``opt.state[p]["exp_avg"]`` is noticed
at no per-step cost (comparing 60,000 tensor identities cost 6 ms a step). Anything
unexpected sends the step down the general path, which explains errors precisely;
a structural change (new parameters, replaced state, other settings) rebuilds the
plan.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Callable, Sequence
from itertools import repeat
from operator import attrgetter, is_, is_not
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import _memory
from ..kernels.metadata import SLICE, Walker
from ..kernels.numba_cpu import Tables, chunk_table, unit_table
from ..kernels.registry import Kernel
from ..quant import QuantFormat

_GRAD = attrgetter("grad")
_CDATA = attrgetter("_cdata")
_NBYTES = attrgetter("nbytes")
_ref = weakref.ref
#: whether a tensor is on a plan's kind of device (a plan's tensors share one device;
#: autograd keeps a gradient on its parameter's)
_ON_DEVICE = {"cpu": attrgetter("is_cpu"), "cuda": attrgetter("is_cuda")}
_data_ptr = Tensor.data_ptr
_is_contiguous = Tensor.is_contiguous


def storage_order(t: Tensor) -> tuple[int, ...] | None:
    """``t``'s strides, those of its size-1 dimensions zeroed, if its elements fill
    their span of storage without gaps or overlaps in some order of its dimensions
    (contiguous, ``channels_last``, any permutation); else None. Tensors of one shape
    with the same key hold each element at the same offset, so an elementwise kernel
    can step them as flat arrays (torch gives a dense parameter's gradient its
    parameter's strides, up to size-1 dimensions, and ``zeros_like`` its state)."""
    dims = sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return None
        expected *= size
    return tuple(0 if size == 1 else stride for size, stride in zip(t.shape, t.stride()))


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


class _KeptGrads:
    """The ids of one step's gradients, and whether any of them has been freed since."""

    def __init__(self, grads: list[Tensor]) -> None:
        self.freed = False
        self.ids = list(map(id, grads))
        self.impls = np.fromiter(map(_CDATA, grads), dtype=np.int64, count=len(grads))  # their TensorImpls
        callback = self._freed
        self._refs = [_ref(g, callback) for g in grads]  # kept alive: their callbacks fire

    def _freed(self, _ref: weakref.ref) -> None:
        self.freed = True


def quant_meta(fmt: QuantFormat) -> dict[str, int]:
    """The state entries that name a quantized format (``quant_bits``, ``quant_block``,
    ``quant_dither``)."""
    return {"quant_bits": fmt.bits, "quant_block": fmt.block_key, "quant_dither": int(fmt.dither)}


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
    """Flat state and tables for one param group; see the module docstring.

    Args:
        params: the group's parameters (all on the CPU, all taken by table kernels).
        kernels: the kernel of each parameter.
        state: the optimizer's ``state`` (read and updated in place).
        keys: the state keys besides ``step``.
        state_dtypes: the state dtype (or quantized format) of each parameter.
        step_dtype: dtype of the ``step`` counters.
        signature: the group settings the plan depends on (compared each step).
        capturable: ``step`` counters on the parameters' device, advanced there
            (:meth:`_Launch.run_on_device`), as torch's ``capturable=True`` keeps them.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        kernels: Sequence[Kernel],
        state: TrackedState,
        keys: tuple[str, ...],
        state_dtypes: Sequence[torch.dtype],
        step_dtype: torch.dtype,
        signature: tuple[Any, ...],
        capturable: bool = False,
    ) -> None:
        self.params = list(params)
        self.device = params[0].device
        self.capturable = capturable
        self._on_device = _ON_DEVICE[self.device.type]
        self.keys = keys
        self.signature = signature
        self.numels = [p.numel() for p in params]
        self.dtypes = [p.dtype for p in params]
        self.nbytes = [p.nbytes for p in params]
        #: each parameter's layout: None if contiguous, else its :func:`storage_order`
        #: (``channels_last`` weights), which its gradients and state views share
        self.orders = [None if p.is_contiguous() else storage_order(p) for p in params]
        self._strided = any(o is not None for o in self.orders)
        self.steps = torch.zeros(len(params), dtype=step_dtype, device=self.device if capturable else "cpu")
        self.pptrs = np.full(len(params), -1, dtype=np.int64)  # parameter addresses last seen
        self._walker = Walker(self.params)
        self._kept: _KeptGrads | None = None  # last step's gradients, and
        self._gptrs = np.zeros(0, dtype=np.int64)  # their addresses
        self._fresh_grads = 0  # steps whose gradients were new tensors
        self.views: list[dict[str, Tensor]] = [{"step": self.steps[i]} for i in range(len(params))]
        by_layout: dict[tuple[Any, ...], list[int]] = {}
        for i, (p, sd) in enumerate(zip(params, state_dtypes)):
            by_layout.setdefault((p.dtype, sd, id(kernels[i])), []).append(i)
        self.meta: list[dict[str, int]] = [{} for _ in params]  # quantized state's format entries
        self.segments = []
        self._buffers = []  # keeps the flat state alive
        for (_, sd, _), idx in by_layout.items():
            columns = _columns(keys, sd)
            seg = _Segment(kernels[idx[0]], np.array(idx, dtype=np.int64), params, len(columns), sd)
            for col, (key, dtype, count) in enumerate(columns):
                sizes = seg.numels if count is None else np.array([count(params[i]) for i in idx], dtype=np.int64)
                # each view starts on 16 bytes: the GPU kernels then move 16 bytes per access
                unit = max(1, 16 // dtype.itemsize)
                offsets = np.concatenate([[0], np.cumsum(-(-sizes // unit) * unit)])
                size = int(offsets[-1])
                if self.device.type == "cpu":
                    flat = _memory.zeros(size, dtype)  # on huge pages where possible
                else:
                    flat = torch.zeros(size, dtype=dtype, device=self.device)
                self._buffers.append(flat)
                for row, i in enumerate(idx):
                    view = flat[offsets[row] : offsets[row] + sizes[row]]
                    if count is not None:
                        self.views[i][key] = view
                    elif self.orders[i] is None:
                        self.views[i][key] = view.view(params[i].shape)
                    else:  # laid out as the parameter, as torch's zeros_like state is
                        self.views[i][key] = view.as_strided(params[i].shape, params[i].stride())
                    seg.ptrs[row, 2 + col] = view.data_ptr()
            if not isinstance(sd, torch.dtype):
                for i in idx:
                    self.meta[i] = quant_meta(sd)
            if capturable and not seg.whole:
                seg.on_device = torch.from_numpy(seg.members).to(self.device)
            self.segments.append(seg)
        # adopt existing state (from earlier steps or a checkpoint): same values, our storage
        self.has_state = np.zeros(len(params), dtype=bool)
        for i, p in enumerate(params):
            old = state.get(p)
            if old:
                for key, view in self.views[i].items():
                    if key in old:  # a key missing (amsgrad switched on) starts at zero
                        view.copy_(old[key])
                state[p] = state.adopt({**old, **self.views[i], **self.meta[i]})
                self.has_state[i] = True
        self.version = state.version

    def intact(self, params: list[Tensor], state: TrackedState, signature: tuple) -> bool:
        """Whether the group and its state are still what this plan was built for
        (parameters compared by identity, ``operator.is_`` mapped in C: ``==`` on
        tensors would compare values)."""
        return (
            isinstance(state, TrackedState)
            and state.version == self.version
            and signature == self.signature
            and len(params) == len(self.params)
            and all(map(is_, params, self.params))
        )

    def _same_grads(self, grads: list[Tensor | None]) -> bool:
        """Whether ``grads`` are the very tensors checked last step (gradients kept
        across steps: ``zero_grad(set_to_none=False)``, accumulation).

        Compared by ``id``: while none of last step's gradients has been freed (their
        weak references' callbacks say so), no other live object can have the same id.
        Cheaper than dereferencing 20,000 weak references; gradients the user drops are
        freed as usual.
        """
        kept = self._kept
        return kept is not None and not kept.freed and list(map(id, grads)) == kept.ids

    def _kept_grads(self) -> np.ndarray | None:
        """The parameter addresses, if the gradients are the very tensors checked last
        step (as :meth:`_same_grads`), found without reading ``.grad``; else None.

        The metadata walker finds each gradient's TensorImpl, compared with those of
        last step's gradients: while none of them has been freed, no other tensor can
        have one of their TensorImpls. On 20,000 parameters this replaced reading
        ``.grad`` (5-6 ms after a large step) by a ~1.5 ms walk.
        """
        kept, walker, params = self._kept, self._walker, self.params
        if kept is None or kept.freed or not walker.finds_grads:
            return None
        n = len(params)
        pptrs = np.empty(n, dtype=np.int64)
        for lo in range(0, n, SLICE):
            hi = min(lo + SLICE, n)
            if not np.array_equal(walker.grads(lo, hi), kept.impls[lo:hi]):
                return None
            pptrs[lo:hi] = np.fromiter(map(_data_ptr, params[lo:hi]), dtype=np.int64, count=hi - lo)
        return pptrs

    def _remember(self, grads: list[Tensor], gptrs: np.ndarray) -> None:
        self._kept = _KeptGrads(grads)
        self._gptrs = gptrs

    def read(self, check_grads: bool) -> tuple[list[Tensor | None], np.ndarray, np.ndarray | None]:
        """This step's gradients, parameter addresses and, with ``check_grads``, the
        gradients' addresses if every parameter has a gradient that passes the checks
        of :meth:`prepare` (else None: :meth:`prepare` checks them itself). Raises
        RuntimeError for a tensor without storage.

        Slice by slice behind the metadata prefetcher (see
        :mod:`adamkit.kernels.metadata`) when it is on, so every pass over a slice finds
        its metadata in L2. 20,000 parameters after a large step: 10.1 -> 8 ms for
        ``.grad`` and addresses; 18.7 -> 14 ms with new gradients to check.
        """
        params, n, walker = self.params, len(self.params), self._walker
        if not walker.active:
            return list(map(_GRAD, params)), np.fromiter(map(_data_ptr, params), dtype=np.int64, count=n), None
        grads: list[Tensor | None] = []
        pptrs = np.empty(n, dtype=np.int64)
        gptrs = np.empty(n, dtype=np.int64) if check_grads else None
        for lo in range(0, n, SLICE):
            hi = min(lo + SLICE, n)
            walker.warm(lo, hi)
            part = params[lo:hi]
            grads += map(_GRAD, part)
            pptrs[lo:hi] = np.fromiter(map(_data_ptr, part), dtype=np.int64, count=hi - lo)
            if gptrs is not None:
                live = grads[lo:hi]
                if (
                    all(map(is_not, live, repeat(None)))  # not ``in``: that would call Tensor.__eq__
                    and list(map(_NBYTES, live)) == self.nbytes[lo:hi]
                    and self._laid_out(live, lo, hi)
                    and all(map(self._on_device, live))
                ):
                    gptrs[lo:hi] = np.fromiter(map(_data_ptr, live), dtype=np.int64, count=hi - lo)
                else:
                    gptrs = None
        return grads, pptrs, gptrs

    def _laid_out(self, grads: list[Tensor], lo: int, hi: int, idx: np.ndarray | None = None) -> bool:
        """Whether the gradients of parameters ``lo:hi`` (or those at ``idx``) are laid
        out as their parameters: one C-level pass when every parameter is contiguous."""
        if not self._strided:
            return all(map(_is_contiguous, grads))
        orders = self.orders[lo:hi] if idx is None else [self.orders[i] for i in idx]
        return all(map(laid_out_like, grads, orders))

    def prepare(self) -> tuple[_Launch | None, list[Tensor | None] | None]:
        """Check this step's gradients and parameters: (the launch, the gradients), or
        (None, ...) to send the step to the general path.

        Gradients that are the same tensor objects as last step's keep last step's
        checks and addresses (4 of the 6 passes over the group); a gradient resized in
        place (``resize_``, ``set_``) behind torch's back between steps goes unnoticed
        then.
        """
        n = len(self.params)
        try:
            kept_pptrs = self._kept_grads()
            if kept_pptrs is not None and np.array_equal(kept_pptrs, self.pptrs):
                return _Launch(self, np.ones(n, dtype=bool), None, self._gptrs, kept_pptrs), None
            kept = self._kept
            fresh = kept is None or kept.freed or self._walker.finds_grads  # else maybe kept, by id
            grads, all_pptrs, all_gptrs = self.read(check_grads=fresh)
        except RuntimeError:  # e.g. a tensor without storage
            return None, None
        if not fresh and self._same_grads(grads):
            if not np.array_equal(all_pptrs, self.pptrs):
                self._kept = None
                return self.prepare()
            return _Launch(self, np.ones(n, dtype=bool), None, self._gptrs, all_pptrs), grads
        if all_gptrs is not None:  # every gradient present and checked
            active, idx, params, numels, dtypes = np.ones(n, dtype=bool), None, self.params, self.numels, self.dtypes
            return self._launch_fresh(grads, active, idx, params, numels, dtypes, all_gptrs, all_pptrs)
        active = np.fromiter(map(is_not, grads, repeat(None)), dtype=bool, count=n)
        if active.all():
            idx, params, live_grads, numels, dtypes = None, self.params, grads, self.numels, self.dtypes
            nbytes, pptrs = self.nbytes, all_pptrs
        else:
            idx = np.flatnonzero(active)
            params = [self.params[i] for i in idx]
            live_grads = [grads[i] for i in idx]
            numels = [self.numels[i] for i in idx]
            dtypes = [self.dtypes[i] for i in idx]
            nbytes = [self.nbytes[i] for i in idx]
            pptrs = all_pptrs[idx]
        try:
            ok = (
                list(map(_NBYTES, live_grads)) == nbytes
                and self._laid_out(live_grads, 0, n, idx)
                and all(map(self._on_device, live_grads))
            )
            if not ok:
                return None, grads
            gptrs = np.fromiter(map(_data_ptr, live_grads), dtype=np.int64, count=len(live_grads))
        except RuntimeError:  # e.g. a tensor without storage
            return None, grads
        return self._launch_fresh(grads, active, idx, params, numels, dtypes, gptrs, pptrs)

    def _launch_fresh(
        self,
        grads: list[Tensor | None],
        active: np.ndarray,
        idx: np.ndarray | None,
        params: list[Tensor],
        numels: list[int],
        dtypes: list[torch.dtype],
        gptrs: np.ndarray,
        pptrs: np.ndarray,
    ) -> tuple[_Launch | None, list[Tensor | None]]:
        """The launch for checked new gradients, once moved parameters are checked too."""
        # a parameter whose storage moved (``p.data = ...``) is checked in full
        known = self.pptrs if idx is None else self.pptrs[idx]
        for k in np.flatnonzero(pptrs != known):
            p, order = params[k], self.orders[k if idx is None else idx[k]]
            same = p.device == self.device and p.numel() == numels[k] and p.dtype == dtypes[k]
            if not (same and laid_out_like(p, order)):
                return None, grads
        if idx is None and self._fresh_grads < 2:  # remember them, unless they are new every step
            self._fresh_grads += self._kept is not None
            self._remember(grads, gptrs)  # type: ignore[arg-type]
        else:
            self._kept = None
        return _Launch(self, active, idx, gptrs, pptrs), grads


class _Launch:
    """One step of a plan, validated: ``run`` performs it."""

    def __init__(
        self, plan: GroupPlan, active: np.ndarray, idx: np.ndarray | None, gptrs: np.ndarray, pptrs: np.ndarray
    ) -> None:
        self.plan, self.active, self.idx = plan, active, idx
        n = len(plan.params)
        if idx is None:
            self.gptrs, self.pptrs = gptrs, pptrs
        else:
            self.gptrs = np.zeros(n, dtype=np.int64)
            self.pptrs = np.zeros(n, dtype=np.int64)
            self.gptrs[idx], self.pptrs[idx] = gptrs, pptrs

    def run(
        self,
        state: TrackedState,
        scalars: Callable[[float], Any],
        *,
        amsgrad: bool,
        maximize: bool,
        mask_nonfinite: bool,
        sr_seed: int | None,
        grad_scale: Tensor | None = None,
    ) -> int:
        """Create missing state, advance the steps, launch every segment (``grad_scale``:
        an AMP scale the kernels divide the gradients by: the Triton kernels')."""
        plan = self.plan
        self._adopt_new_state(state)
        everyone = self.idx is None
        if everyone:
            plan.steps.add_(1)
            plan.pptrs[:] = self.pptrs
            values = plan.steps.numpy()
        else:
            plan.steps[torch.from_numpy(self.idx)] += 1
            plan.pptrs[self.active] = self.pptrs[self.active]
            values = plan.steps.numpy()[self.idx]
        if values.size == 0:
            return 0
        scal = np.zeros((len(plan.params), 2))
        rows = scal if everyone else np.zeros((values.size, 2))
        low, high = values.min(), values.max()
        if low == high:  # the usual case: every parameter at the same step
            per_step = [scalars(float(low))]
            rows[:] = (per_step[0].step_size, per_step[0].inv_bc2_sqrt)
        else:  # some parameters' steps lag (they had no gradient for a while)
            uniq, inverse = np.unique(values.astype(np.float64), return_inverse=True)
            per_step = [scalars(float(t)) for t in uniq]
            rows[:] = np.array([(s.step_size, s.inv_bc2_sqrt) for s in per_step])[inverse.reshape(-1)]
        if not everyone:
            scal[self.idx] = rows
        masked = 0
        for seg in plan.segments:
            chunks, units = seg.chunks, seg.units
            if seg.whole:
                seg.ptrs[:, 0], seg.ptrs[:, 1], seg_scal = self.pptrs, self.gptrs, scal
            else:
                members = seg.members
                seg.ptrs[:, 0], seg.ptrs[:, 1], seg_scal = self.pptrs[members], self.gptrs[members], scal[members]
            if not everyone:
                chunks, units = chunks[self.active[seg.members][chunks[:, 0]]], None
            steps = plan.steps.numpy()[seg.members]  # dithered 4-bit codes depend on them
            tab = Tables(
                seg.ptrs, chunks, seg_scal, seg.members, seg.param_dtype, seg.state_dtype, units, plan.device, steps
            )
            amp = {} if grad_scale is None else {"amp": (grad_scale.to(plan.device), None)}
            masked += seg.kernel.tables(
                tab, per_step[0], amsgrad=amsgrad, maximize=maximize, mask_nonfinite=mask_nonfinite, sr_seed=sr_seed,
                **amp,
            )  # fmt: skip
        return masked

    def _adopt_new_state(self, state: TrackedState) -> None:
        """Give the parameters stepped for the first time their views of the flat state."""
        plan = self.plan
        fresh = np.flatnonzero(self.active & ~plan.has_state)
        for i in fresh:
            state[plan.params[i]] = state.adopt({**plan.views[i], **plan.meta[i]})
        if fresh.size:
            plan.has_state[fresh] = True
            plan.version = state.version

    def run_on_device(
        self,
        state: TrackedState,
        scalars: Callable[[Tensor, torch.dtype], tuple[Tensor, Tensor]],
        *,
        amp: tuple[Tensor | None, Tensor | None],
        count: Tensor,
        amsgrad: bool,
        maximize: bool,
        mask_nonfinite: bool,
    ) -> int:
        """A capturable step (every parameter has a gradient): the ``step`` counters
        advance on the device (by ``1 - found_inf`` under GradScaler), ``scalars`` turns
        them (float64 [n]) and the work dtype into the kernel's device tables
        (per-tensor scalars, constants), masked elements are added to ``count``: nothing
        is read on the host."""
        plan = self.plan
        assert self.idx is None and plan.capturable, "capturable plans step every parameter"
        self._adopt_new_state(state)
        plan.steps.add_(1)
        plan.pptrs[:] = self.pptrs
        t = plan.steps.to(torch.float64)
        grad_scale, found_inf = amp
        for seg in plan.segments:
            if seg.whole:
                seg.ptrs[:, 0], seg.ptrs[:, 1], seg_t = self.pptrs, self.gptrs, t
            else:
                members = seg.members
                seg.ptrs[:, 0], seg.ptrs[:, 1] = self.pptrs[members], self.gptrs[members]
                seg_t = t.index_select(0, seg.on_device)
            tab = Tables(seg.ptrs, seg.chunks, np.zeros((0, 2)), seg.members, seg.param_dtype, seg.state_dtype,
                         seg.units, plan.device)  # fmt: skip
            seg.kernel.tables(
                tab, scalars(seg_t, seg.param_dtype), amsgrad=amsgrad, maximize=maximize,
                mask_nonfinite=mask_nonfinite, sr_seed=None,
                amp=amp if grad_scale is not None or found_inf is not None else None, count=count,
            )  # fmt: skip
        if found_inf is not None:  # a skipped step does not count
            plan.steps.sub_(found_inf.to(plan.steps.device, plan.steps.dtype))
        return 0
