"""Stepping: ``step()``, one path for every param group.

The mixin of :class:`~adamkit.optim._base.AdamFamily` that runs a step: every group
validated first; then each group's buckets (:class:`~adamkit.kernels.registry.Bucket`:
its cached plan's (:mod:`._plan`) when a table kernel takes all its parameters, else
made now from the parameters with a gradient), their step counters advanced, their step
scalars computed (on the host, or on the device for ``capturable=True``), each launched
by its kernel (``kernel.launch(bucket, scalars)``). Also: the differentiable step (the
rule written for autograd, not a kernel), the non-finite policy and its counts,
percentile clipping.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import warnings
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from .._scalars import StepScalars, rule_consts
from ..kernels import reference
from ..kernels._checks import is_plain
from ..kernels.registry import Bucket, Kernel, KernelUnavailableError
from ..quant import QuantFormat
from ..spec import Algorithm
from . import _sharded
from ._plan import GroupPlan, TrackedState, _Launch
from ._sharded import is_sharded, local
from ._state import _scalar_dtype, quant_format_of, state_columns
from ._validation import check_hyperparameters, state_problem

#: Group options that decide the format of new state (the plan creates state for
#: parameters that have none yet, so a change rebuilds it).
_FORMAT_OPTIONS = ("block_size", "block_wise", "quant_map", "min_quant_size", "paged")


def _format_options(group: Mapping[str, Any]) -> tuple[Any, ...]:
    """The group's format options, and the version of GlobalOptimManager's overrides."""
    from ..bnb import GlobalOptimManager

    values = tuple(repr(group.get(k)) for k in _FORMAT_OPTIONS)
    return (*values, GlobalOptimManager.get_instance().version)


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


def _salt(position: int, p: Tensor) -> int:
    """A tensor's salt for stochastic rounding: its position in its group, and for a
    DTensor shard its first element's global index too (shards draw apart)."""
    return position if not is_sharded(p) else (position * 0x9E3779B1 + _sharded.first_index(p)) & 0xFFFFFFFF


def _flat_local(t: Tensor) -> Tensor:
    """Quantized state as the kernels take it: flat (a DTensor's local rows, flattened)."""
    return local(t).view(-1) if is_sharded(t) else t


def _user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the caller of ``step()``."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level


class _Stepping:
    """:class:`~adamkit.optim._base.AdamFamily`'s ``step()``.

    Expects of the optimizer: ``spec``, ``_state_keys``, ``_step_scalars`` and
    ``_advance`` (the algorithm's, from :mod:`._base`), ``_layout``, ``_init_state`` and
    ``_add_missing_state`` (:mod:`._state`), ``_kernel`` and ``_collect``
    (:mod:`._validation`).
    """

    algorithm: ClassVar[str]
    spec: Algorithm
    param_groups: list[dict[str, Any]]
    state: TrackedState
    nonfinite: str
    skipped_steps: int
    _nonfinite_count: int
    _warned_nonfinite: bool
    _pending_counts: list[tuple[Tensor, Any]]
    _plans: dict[int, GroupPlan]

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
        self._step_groups(None)
        return loss

    @torch.compiler.disable
    @torch.no_grad()
    def _step_groups(self, only: Collection[int] | None) -> None:
        """``step()``'s work for the groups at the positions ``only`` (every group if None).

        :class:`adamkit.CPUOffload` steps its host optimizer's groups one run at a time
        this way, to copy each run's parameters back while the next is stepped. Under
        ``nonfinite="skip"`` or ``"raise"`` only the groups stepped are screened: their
        caller steps every group at once then.
        """
        self._check_not_captured()
        self._settle_counts(wait=False)
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if not isinstance(self.state, TrackedState):  # reassigned, e.g. ``opt.state = defaultdict(dict)``
            self.state = TrackedState(self.state)
        groups = [(i, g) for i, g in enumerate(self.param_groups) if only is None or i in only]
        work = [self._prepare(i, group) for i, group in groups]
        on_device = all(group.get("capturable") for _, group in groups)
        if found_inf is not None and not on_device and float(found_inf) != 0:  # GradScaler saw inf/NaN: skip
            return
        if self.nonfinite in ("skip", "raise") and self._screen(work):
            return
        seed = None
        if any(group.get("stochastic_rounding") for _, group in groups):
            seed = int(torch.randint(0, 2**32, (), dtype=torch.int64))  # torch.manual_seed reproduces it
            rounded = [p for _, g in groups if g.get("stochastic_rounding") for p in g["params"]]
            seed = _sharded.agreed_seed(seed, _sharded.meshes_of(rounded))  # replicas round alike
        amp = (grad_scale, found_inf if on_device else None)
        # masked elements of DTensor shards by mesh (weighted: see _sharded); every mesh
        # of a stepped DTensor is there, whether this rank's shard is empty or not
        sharded: dict[Any, list[Any]] = {}
        masked = []
        managed = self.__dict__.get("_managed_arena")
        for w in work:
            if managed is not None and w.group.get("paged"):  # paged CUDA state to its GPU, before its kernels
                managed.prefetch(t for p in w.group["params"] for t in self.state.get(p, {}).values())
            masked.append(self._run(w, seed if w.group.get("stochastic_rounding") else None, amp, sharded))
        on_host = sum(m for m in masked if not isinstance(m, Tensor))
        if sharded and self.nonfinite == "mask":  # counted over every rank: one small all-reduce per mesh
            local_counts = {mesh: torch.tensor([float(sum(counts))]) for mesh, counts in sharded.items()}
            on_host += round(sum(float(t[0]) for t in _sharded.all_reduce_sum(local_counts).values()))
        if on_host:
            self._note_nonfinite(on_host, "masked: their parameters and moments were left unchanged")
        for count in (m for m in masked if isinstance(m, Tensor)):
            event = torch.cuda.Event() if count.is_cuda else None
            if event is not None:  # after the count's kernel: on its device's stream, not the current device's
                event.record(torch.cuda.current_stream(count.device))
            self._pending_counts.append((count, event))
        self._settle_counts(wait=False)

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
        self,
        work: _Work,
        sr_seed: int | None,
        amp: tuple[Tensor | None, Tensor | None] = (None, None),
        sharded: dict[Any, list[Any]] | None = None,
    ) -> int | Tensor:
        """One group's step: its validated buckets (a cached plan's, or made now from the
        parameters with a gradient), each given its step scalars and launched by its
        kernel. Returns the count of masked elements (a device tensor for kernels that
        count on the device), those of DTensor shards added to ``sharded`` instead (by
        mesh, weighted by 1 / replication)."""
        group = work.group
        flags = dict(
            # a group's ``amsgrad`` means nothing to a variant without it (torch ignores it too)
            amsgrad=bool(group.get("amsgrad", False)) and self.spec.amsgrad_key is not None,
            maximize=bool(group["maximize"]),
            mask_nonfinite=self.nonfinite == "mask",
            sr_seed=sr_seed,
        )
        if group.get("differentiable"):  # not a kernel: the rule written for autograd
            with torch.enable_grad():  # step() runs without: only this group's step is recorded
                return self._step_differentiable(group, work.triples or [], grad_scale=amp[0], **flags)
        capturable = bool(group.get("capturable"))
        grad_scale, found_inf = amp if capturable else (amp[0], None)  # on the host, found_inf skipped the step
        if work.launch is not None:
            work.launch.advance(self.state, self._advance(group))
            buckets, stepped, counters = work.launch.buckets(), work.launch.stepped(), None
            shards: list[tuple[Any, ...] | None] = [None] * len(buckets)
        else:
            buckets, counters, shards = self._buckets(group, work.triples or [], capturable)
            stepped = [local(p) for _, p, _ in work.triples or []]
            if sharded is not None and not capturable:  # a capturable step's counts stay on each device
                for mesh in _sharded.meshes_of([p for _, p, _ in work.triples or []]):
                    sharded.setdefault(mesh, [])
        masked: int | Tensor = 0
        for bucket, shard in zip(buckets, shards):
            kernel, device = bucket.kernel, bucket.device
            if capturable:  # nothing read or moved on the host
                scalars = self._capturable_scalars(
                    group, bucket.steps, bucket.param_dtype, kernel, maximize=flags["maximize"]
                )
                on_device = None if grad_scale is None and found_inf is None else (grad_scale, found_inf)
                kernel.launch(bucket, scalars, **flags, amp=on_device, count=self._device_counter(device))
                continue
            scale = None if grad_scale is None else grad_scale.to(device)
            if scale is not None and not kernel.amp_scale:  # unscaled first, as torch's fused kernels leave them
                torch._foreach_div_(bucket.gradients(), scale)
                scale = None
            scalars = self._host_scalars(group, bucket)
            if shard is None:
                masked = masked + kernel.launch(bucket, scalars, **flags, amp=None if scale is None else (scale, None))
                continue
            mesh, replicas, first = shard  # a DTensor shard: its dither continues the global tensor's
            scalars = dataclasses.replace(scalars, first_index=first)
            count = kernel.launch(bucket, scalars, **flags, amp=None if scale is None else (scale, None))
            if sharded is not None:  # read once a step, after every launch (a device count waits for its kernel)
                sharded[mesh].append(count / replicas)
        if found_inf is not None and capturable:  # a skipped step does not count
            if work.launch is not None:
                work.launch.unstep(found_inf)
            elif counters:
                torch._foreach_sub_(counters, [found_inf.to(counters[0].device, counters[0].dtype)] * len(counters))
        # kernels that write through addresses: autograd is told, as torch's in-place step
        # tells it, so a graph that saved a parameter before the step refuses to use it
        torch.autograd.graph.increment_version(stepped)
        return masked

    def _host_scalars(self, group: Mapping[str, Any], bucket: Bucket) -> StepScalars:
        """A bucket's step scalars, computed on the host in float64: one set per distinct
        (step, history) among its tensors. Returned: the first set (the call's constants
        with it); a tables bucket gets every tensor's ``tensor_scalars`` in its table."""
        keys = bucket.steps
        names = tuple(self.spec.history)
        if (keys == keys[0]).all():  # the usual case: every tensor at the same step
            uniq, inverse = keys[:1], np.zeros(len(keys), dtype=np.int64)
        else:  # some parameters' steps lag (they had no gradient for a while)
            uniq, inverse = np.unique(keys, axis=0, return_inverse=True)
        per_step = [self._step_scalars(group, float(u[0]), dict(zip(names, u[1:].tolist()))) for u in uniq]
        tab = bucket.tables
        if tab is not None:
            fields = self.spec.tensor_scalars
            values = np.array([[getattr(s, f) for f in fields] for s in per_step])[inverse.reshape(-1)]
            tab.scal = np.zeros((tab.ptrs.shape[0], len(fields)))
            tab.scal[slice(None) if bucket.rows is None else bucket.rows] = values
        elif len(uniq) > 1:
            raise AssertionError("a list bucket's tensors share one step")
        return per_step[0]

    def _plan_for(self, index: int, group: Mapping[str, Any]) -> GroupPlan | None:
        """The cached plan of a group whose parameters a table kernel takes, else None."""
        params = group["params"]
        keys = self._state_keys(group)
        capturable = bool(group.get("capturable"))
        signature = (keys, group["backend"], group["fused"], group["state_bits"], _scalar_dtype(), capturable,
                     *_format_options(group))  # fmt: skip
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
        arena = self._arena(params[0], group) if device.type == "cpu" else None
        plan = GroupPlan(
            params,
            kernels,
            self.state,
            keys,
            state_dtypes,
            _scalar_dtype(),
            signature,
            capturable,
            history,
            paged=None if arena is None else arena.zeros,
        )
        self._plans[index] = plan
        return plan

    def _screen(self, work: list[_Work]) -> bool:
        """For "skip"/"raise": True if this step must be skipped (raise: raises). With
        DTensor gradients every rank decides alike: the counts are reduced over their
        meshes (a non-finite element on one rank skips the step on all)."""
        pairs = [(w.index, i, g) for w in work for i, g in w.grads()]
        where = [(gi, pi) for gi, pi, _ in pairs]
        grads = [local(g) for _, _, g in pairs]
        bad = reference.nonfinite_indices(grads)
        counts = {i: int((~torch.isfinite(grads[i])).sum()) for i in bad}
        count = _sharded.global_count([g for _, _, g in pairs], counts)
        if not count:
            return False
        if self.nonfinite == "raise":
            first = f", the first in param group {where[bad[0]][0]}, parameter {where[bad[0]][1]}" if bad else ""
            if _sharded.meshes_of([g for _, _, g in pairs]):  # counted over ranks
                where_bad = f"over all ranks, in {len(bad)} tensor(s) on this rank{first}"
            else:
                where_bad = f"in {len(bad)} tensor(s){first}"
            raise FloatingPointError(
                f"{type(self).__name__}: {count} non-finite gradient element(s) {where_bad}; nothing was changed"
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

    def _settle_counts(self, wait: bool) -> None:
        """Add the device-side masked counts the GPU has finished (all, if ``wait``):
        reading one before would make ``step()`` wait for the kernels."""
        pending = getattr(self, "_pending_counts", [])
        while pending and (wait or pending[0][1] is None or pending[0][1].query()):
            count, _ = pending.pop(0)
            masked = int(count)
            if masked:
                self._note_nonfinite(masked, "masked: their parameters and moments were left unchanged")

    def _buckets(
        self, group: Mapping[str, Any], triples: list[tuple[int, Tensor, Tensor]], capturable: bool
    ) -> tuple[list[Bucket], list[Tensor], list[tuple[Any, ...] | None]]:
        """Buckets made now (the cached plan's tables do not fit): create missing state,
        advance each stepped parameter's ``step`` (on its device for a capturable step)
        and history, apply percentile clipping, then group the parameters by (device,
        layout, sharding) and, on the host, by step and history. DTensor parameters are
        stepped through their local tensors. Also returns the ``step`` counters advanced
        and each bucket's sharding: None, or (mesh, replication, first index) of its
        DTensor shards (:mod:`._sharded`)."""
        if not triples:
            return [], [], []
        keys = self._state_keys(group)
        states = []
        for _, p, _ in triples:
            if not self.state[p]:
                self.state[p] = self._init_state(p, group)
            state = self.state[p]
            self._add_missing_state(p, state, quant_format_of(state) or state[keys[0]].dtype, group)
            if capturable and state["step"].device != p.device:  # e.g. loaded from a checkpoint
                state["step"] = state["step"].to(p.device)
            states.append(state)
        steps = [st["step"] for st in states]
        torch._foreach_add_(steps, 1.0)
        layouts = [self._layout(p, g, st, group) for (_, p, g), st in zip(triples, states)]
        shards = [self._sharding(p, layout[1]) for (_, p, _), layout in zip(triples, layouts)]
        by: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        # an empty shard (more ranks than rows) has nothing to step: its step count advances
        stepping = [shard is None or local(p).numel() > 0 for (_, p, _), shard in zip(triples, shards)]
        if capturable:  # nothing read on the host
            for i, ((_, p, _), layout, shard) in enumerate(zip(triples, layouts, shards)):
                if stepping[i]:
                    by[(p.device, layout, shard)].append(i)
        else:
            step_values = torch.stack([s.to("cpu", torch.float64) for s in steps]).tolist()
            history = self._advanced_history(group, states, step_values)
            if group.get("percentile_clipping", 100) < 100:
                triples = self._clip_percentile(triples, states, step_values, group["percentile_clipping"])
            for i, ((_, p, _), layout, shard, t, h) in enumerate(zip(triples, layouts, shards, step_values, history)):
                if stepping[i]:
                    by[(p.device, layout, shard, (t, *h))].append(i)
        buckets, bucket_shards = [], []
        for (device, layout, shard, *key), idx in by.items():
            fmt = layout[1]
            if capturable:
                at: np.ndarray | Tensor = torch.stack([steps[i] for i in idx]).to(torch.float64)
            else:
                at = np.array([key[0]] * len(idx), dtype=np.float64)
            flat = _flat_local if isinstance(fmt, QuantFormat) else local  # codes and scales: as a plain tensor's
            buckets.append(
                Bucket(
                    self._kernel(group, device.type, layout), device, layout[0], fmt, at,
                    params=[local(triples[i][1]) for i in idx],
                    grads=[local(triples[i][2]) for i in idx],
                    state={k: [flat(states[i][k]) for i in idx] for k in state_columns(keys, fmt)},
                    salts=[_salt(triples[i][0], triples[i][1]) for i in idx],
                )
            )  # fmt: skip
            bucket_shards.append(shard)
        return buckets, steps, bucket_shards

    @staticmethod
    def _sharding(p: Tensor, fmt: Any) -> tuple[Any, ...] | None:
        """A parameter's bucket key for its sharding: None for a plain tensor; for a
        DTensor (mesh, replication, first index), the index only for dithered state (a
        bucket's tensors share one)."""
        if not is_sharded(p):
            return None
        first = _sharded.first_index(p) if isinstance(fmt, QuantFormat) and fmt.dither else 0
        return (p.device_mesh, _sharded.replication(p), first)

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

    @staticmethod
    def _clip_percentile(
        triples: list[tuple[int, Tensor, Tensor]], states: list[dict[str, Any]], steps: list[float], percentile: int
    ) -> list[tuple[int, Tensor, Tensor]]:
        """bitsandbytes' percentile clipping, per parameter: record the squared L2 norm of
        the gradient at ``step % 100`` of a 100-entry history (``state["gnorm_vec"]``; the
        first step fills every entry), and scale the gradient down to the norm at the
        ``percentile``-th place of the sorted history when it exceeds it. The gradient
        itself is not modified (the kernel gets a scaled copy). A non-finite norm is
        neither recorded nor used: the non-finite policy deals with that gradient. A
        DTensor gradient's norm is the whole tensor's (its shards' reduced over the mesh)."""
        norms = _sharded.global_norms([g for _, _, g in triples])
        out = []
        for (i, p, g), st, t, norm in zip(triples, states, steps, norms):
            sq = norm**2
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
