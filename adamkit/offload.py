"""CPU offload for GPU training: the optimizer's state and step on the host.

:class:`CPUOffload` keeps a host copy of every parameter (pinned memory on CUDA),
steps it with an optimizer built on the host copies — adamkit's fused CPU kernels, at
32, 16, 8 or 4 bits of state — and copies the result back to the device. The device
holds only the parameters and their gradients; the moments never touch it.

How a step overlaps the training loop:

- Each gradient is copied to its pinned host buffer as backward produces it (a
  post-accumulate-grad hook queues the copy on a side stream), so the copies overlap
  the rest of backward.
- ``step()`` checks each copy against the gradient it was made from (the same tensor,
  unchanged since: its version counter): a gradient clipped, unscaled or otherwise
  changed after backward is copied again, so global-norm clipping, ``GradScaler`` and
  gradient accumulation give the same numbers as without offload (they wait for the
  end of backward). Then it steps the parameters run by run (``chunk_size`` elements
  at a time) and queues each run's copy back to the device while the next run is
  stepped; the device's current stream waits for the copies before the next forward.
- With ``step_in_backward=True`` each run of parameters is stepped on a worker thread
  as soon as all its gradients have arrived, during the rest of backward: the
  fastest mode, for training without global-norm clipping or ``GradScaler``. Gradient
  accumulation then needs :meth:`CPUOffload.accumulate` around the backward passes
  that must not step.

The wrapper is a :class:`torch.optim.Optimizer`: its ``param_groups`` hold the device
parameters and the hyperparameters, which LR schedulers change as usual; its
``state_dict()`` is the one ``optimizer_class`` would give for the same parameters and
groups (it loads into a non-offloaded optimizer and back).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from .optim import AdamFamily, AdamW
from .optim._validation import check_hyperparameters

#: Elements per run of parameters stepped and copied back together on a GPU (16M: 64 MiB
#: of fp32 parameters, ~10 ms of CPU step, which hides the ~2.5 ms copy of the run before;
#: each run costs a kernel call: 4M-element runs made GPT-2's host step 11 % slower).
CHUNK_SIZE = 1 << 24


@dataclass
class _Run:
    """Consecutive parameters of one group, stepped by one group of the host optimizer."""

    group: int  # position in the wrapper's param_groups
    inner: int  # position in the host optimizer's param_groups
    params: list[Tensor]  # on the device
    arrived: set[int] = field(default_factory=set)  # ids of params whose gradient arrived this backward
    pending: Future[None] | None = None  # its step on the worker (step_in_backward)
    done: bool = False  # stepped on the worker since the last step() / zero_grad()
    copied_back: Any = None  # the event after its parameters' copy to the device


def _hook(ref: weakref.ref[CPUOffload], p: Tensor) -> None:
    """The gradient hook: a weak reference, so that a dropped optimizer is collected
    (and its hooks removed) while the model lives on."""
    opt = ref()
    if opt is not None:
        opt._on_grad(p)


class _Copies:
    """The device side: copies between device parameters and host buffers.

    On CUDA, copies to the host run on one side stream and copies back on another,
    each followed by an event; for CPU parameters (tests, or a CPU stand-in) a copy is
    a plain synchronous ``copy_`` and an event is None.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.to_host_stream = torch.cuda.Stream(device) if self.cuda else None
        self.to_device_stream = torch.cuda.Stream(device) if self.cuda else None

    def to_host(self, dst: Tensor, src: Tensor) -> Any:
        if not self.cuda:
            dst.copy_(src)
            return None
        stream = self.to_host_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))  # after the kernel that made src
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
            src.record_stream(stream)  # src may be freed (zero_grad) before the copy ran
            return stream.record_event()

    def to_device(self, dsts: list[Tensor], srcs: list[Tensor]) -> Any:
        if not self.cuda:
            for d, s in zip(dsts, srcs):
                if d.data_ptr() != s.data_ptr():  # not a shared host copy
                    d.copy_(s)
            return None
        stream = self.to_device_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))  # after the forward/backward reading them
        with torch.cuda.stream(stream):
            for d, s in zip(dsts, srcs):
                d.copy_(s, non_blocking=True)
            return stream.record_event()

    @staticmethod
    def wait(event: Any) -> None:
        if event is not None:
            event.synchronize()

    def join(self) -> None:
        """Make the device's current stream wait for every copy back queued so far."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.to_device_stream)


def _groups(params: Any) -> list[dict[str, Any]]:
    groups = list(params)
    if not groups:
        raise ValueError("CPUOffload got an empty parameter list")
    if not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    out = []
    for g in groups:
        if not isinstance(g, dict):
            raise TypeError("param groups must all be dicts, or all be tensors")
        g = dict(g)
        ps = g["params"]
        g["params"] = [ps] if isinstance(ps, Tensor) else list(ps)
        out.append(g)
    return out


class CPUOffload(Optimizer):
    """Train on the device with the optimizer's state and step on the CPU.

    Args:
        params: the device parameters, or param-group dicts, as for any optimizer.
        optimizer_class: the host optimizer (default :class:`adamkit.AdamW`). adamkit's
            optimizers step run by run (see ``chunk_size``); other ``torch.optim``
            optimizers in one ``step()`` (not those that need a closure, as LBFGS).
        state_bits: passed to ``optimizer_class`` when given (adamkit: 32, 16, 8 or 4).
        step_in_backward: step each run of parameters on a worker thread as soon as its
            gradients have arrived, during backward. Not with global-norm clipping or
            ``GradScaler`` (the step has happened before they run; ``GradScaler``
            raises); gradient accumulation needs :meth:`accumulate`.
        copy_grads_in_backward: copy each gradient to the host as backward produces it
            (default). ``step()`` copies again a gradient changed since in a way autograd
            sees (a new tensor, an in-place operation: clipping, accumulation) or by
            ``GradScaler``; set False if the training loop writes gradients in a way it
            does not (through ``.data``, by collectives), to copy every gradient in
            ``step()``.
        chunk_size: elements per run of parameters stepped and copied back together
            (default: 16M on a GPU; on the CPU, where copies are synchronous, one run per
            group). A group with ``stochastic_rounding`` is one run.
        pin_memory: keep host copies in pinned memory (default: for CUDA parameters).
        **kwargs: the host optimizer's arguments (``lr``, ``betas``, ``weight_decay``...).

    Attributes:
        optimizer: the host optimizer, over the host copies.
    """

    #: CPU parameters step in place (no host copies, no copies made): what ``adamkit
    #: bench --offload`` times on a machine without a GPU. Off by default, so that CPU
    #: parameters exercise the copies as a device's would.
    _share_cpu = False

    def __init__(
        self,
        params: Any,
        optimizer_class: Callable[..., Optimizer] = AdamW,
        *,
        state_bits: int | None = None,
        step_in_backward: bool = False,
        copy_grads_in_backward: bool = True,
        chunk_size: int | None = None,
        pin_memory: bool | None = None,
        **kwargs: Any,
    ) -> None:
        if chunk_size is not None and (
            not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if step_in_backward and not copy_grads_in_backward:
            raise ValueError(
                "step_in_backward steps from the gradients copied in backward: copy_grads_in_backward=False "
                "contradicts it"
            )
        groups = _groups(params)
        devices = {p.device for g in groups for p in g["params"] if isinstance(p, Tensor)}
        if len(devices) > 1:
            raise ValueError(f"CPUOffload needs every parameter on one device, got {sorted(map(str, devices))}")
        device = devices.pop() if devices else torch.device("cpu")
        if state_bits is not None:
            kwargs["state_bits"] = state_bits
        self.device = device
        if chunk_size is None:  # CPU parameters: copies are synchronous, nothing to overlap
            chunk_size = CHUNK_SIZE if device.type == "cuda" else 1 << 62
        self.step_in_backward = bool(step_in_backward)
        self.copy_grads_in_backward = bool(copy_grads_in_backward)
        self.chunk_size = chunk_size
        self._rounding = bool(kwargs.get("stochastic_rounding", False))
        self._pin = device.type == "cuda" if pin_memory is None else bool(pin_memory)
        self._share_host = device.type == "cpu" and self._share_cpu
        self._copies = _Copies(device)
        self._host: dict[Tensor, Tensor] = {}  # device parameter -> host copy
        self._grad_copies: dict[Tensor, tuple[Any, int, Any]] = {}  # param -> (grad ref, version, event)
        self._versions: dict[Tensor, tuple[int, int]] = {}  # param -> (version, data_ptr) after our copy
        self._runs: list[_Run] = []
        self._group_runs: list[list[_Run]] = []
        self._run_of: dict[Tensor, _Run] = {}
        self._lock = threading.RLock()
        self._accumulating = 0
        self._worker: ThreadPoolExecutor | None = None
        self._hooks: list[Any] = []
        seen: set[Tensor] = set()
        for g in groups:
            self._check_params(g["params"], seen)
        host_groups = [self._host_group(i, g) for i, g in enumerate(groups)]
        self.optimizer = optimizer_class([c for runs in host_groups for c in runs], **kwargs)
        # GlobalOptimManager's overrides (keep_embeddings_32bit, ...) are the device parameters'
        self.optimizer.__dict__["_offloaded"] = weakref.WeakValueDictionary({id(h): p for p, h in self._host.items()})
        self._by_runs = isinstance(self.optimizer, AdamFamily)
        if self.step_in_backward:
            if getattr(self.optimizer, "nonfinite", "mask") in ("skip", "raise"):
                raise ValueError(
                    f"step_in_backward steps each run of parameters on its own: nonfinite="
                    f"{self.optimizer.nonfinite!r}, which decides for the whole step, needs step_in_backward=False"
                )
            if not self._by_runs or any(g.get("stochastic_rounding") for g in self.optimizer.param_groups):
                raise ValueError(
                    "step_in_backward needs an adamkit optimizer without stochastic_rounding (which draws one "
                    "seed for the whole step)"
                )
        self._building = True
        try:
            super().__init__(groups, dict(self.optimizer.defaults))
        finally:
            self._building = False
        self._adopt_defaults()
        for g in self.param_groups:
            for p in g["params"]:
                self._watch(p)

    # ------------------------------------------------------------ construction
    def _check_params(self, params: list[Any], seen: set[Tensor]) -> None:
        """Refuse what cannot be offloaded, before anything is built."""
        for p in params:
            if not isinstance(p, Tensor) or not p.is_leaf or not p.is_floating_point():
                raise TypeError("CPUOffload takes floating-point leaf tensors (parameters)")
            if p.is_sparse or p.layout != torch.strided:
                raise ValueError("CPUOffload takes dense parameters")
            if p.device != self.device:
                raise ValueError(f"CPUOffload's parameters are on {self.device}, got one on {p.device}")
            if p in seen or p in self._host:
                raise ValueError("a parameter appears more than once in the parameter groups")
            seen.add(p)

    def _host_group(self, index: int, group: dict[str, Any]) -> list[dict[str, Any]]:
        """The host optimizer's groups for the wrapper's group ``index``: its parameters'
        host copies in runs of at most ``chunk_size`` elements, the same options."""
        options = {k: v for k, v in group.items() if k != "params"}
        whole = bool(group.get("stochastic_rounding", self._rounding))  # one seed, positions in the group
        runs: list[list[Tensor]] = [[]]
        size = 0
        for p in group["params"]:
            if runs[-1] and size + p.numel() > self.chunk_size and not whole:
                runs.append([])
                size = 0
            runs[-1].append(p)
            size += p.numel()
        out = []
        first = len(self._runs)
        mine = []
        for k, ps in enumerate(runs):
            hosts = []
            for p in ps:
                if self._share_host:  # the host copy is the parameter: its copies are no-ops
                    h = p.data
                else:
                    h = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=self._pin)
                    h.copy_(p.detach())
                h.requires_grad_(p.requires_grad)
                self._host[p] = h
                hosts.append(h)
            run = _Run(group=index, inner=first + k, params=ps)
            self._runs.append(run)
            mine.append(run)
            for p in ps:
                self._run_of[p] = run
            out.append({**options, "params": hosts})
        self._group_runs.append(mine)
        return out

    def _watch(self, p: Tensor) -> None:
        self._versions[p] = (p._version, p.data_ptr())
        if p.requires_grad:
            self._hooks.append(p.register_post_accumulate_grad_hook(partial(_hook, weakref.ref(self))))

    def _adopt_defaults(self, indices: Iterable[int] | None = None) -> None:
        """Give wrapper groups the options their host groups were completed with."""
        for i in range(len(self.param_groups)) if indices is None else indices:
            inner = self.optimizer.param_groups[self._group_runs[i][0].inner]
            self.param_groups[i].update({k: v for k, v in inner.items() if k != "params"})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_building", False):
            super().add_param_group(param_group)
            return
        (group,) = _groups([param_group])
        self._check_params(group["params"], set())
        index = len(self.param_groups)
        before, runs_before = len(self.optimizer.param_groups), len(self._runs)
        try:
            for run in self._host_group(index, group):
                self.optimizer.add_param_group(run)
            super().add_param_group(group)
        except Exception:  # nothing of the new group stays
            del self.optimizer.param_groups[before:]
            del self.param_groups[index:]
            for run in self._runs[runs_before:]:
                for p in run.params:
                    self._run_of.pop(p, None)
                    self._host.pop(p, None)
            del self._runs[runs_before:]
            del self._group_runs[index:]
            raise
        self._adopt_defaults([index])
        for p in self.param_groups[-1]["params"]:
            self._watch(p)
            self.optimizer.__dict__["_offloaded"][id(self._host[p])] = p

    # ------------------------------------------------------------ hyperparameters
    def _sync_options(self) -> None:
        """Copy each wrapper group's options (a scheduler's lr, ...) to its host groups,
        and check them (an adamkit host optimizer's rules) before anything steps."""
        inner = self.optimizer.param_groups
        for run in self._runs:
            g, h = self.param_groups[run.group], inner[run.inner]
            for k, v in g.items():
                if k != "params" and h.get(k, _MISSING) is not v:
                    h[k] = v
        if self._by_runs:
            for i, g in enumerate(self.param_groups):
                check_hyperparameters(g, f" (param group {i})")
                if g.get("stochastic_rounding") and len(self._group_runs[i]) > 1:
                    raise ValueError(
                        f"stochastic_rounding was switched on in param group {i} after CPUOffload split it into "
                        f"runs: pass it when the group is added (one run, one seed per step)"
                    )
            if self.step_in_backward and (
                self.optimizer.nonfinite in ("skip", "raise")
                or any(g.get("stochastic_rounding") for g in self.param_groups)
            ):
                raise ValueError(
                    "step_in_backward steps each run on its own: not with nonfinite='skip'/'raise' or "
                    "stochastic_rounding (which decide for the whole step)"
                )

    # ------------------------------------------------------------ gradients
    def _grad_of(self, p: Tensor) -> Tensor | None:
        g = p.grad
        if g is None:
            return None
        if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device or g.layout != torch.strided:
            raise ValueError(
                f"a gradient must match its parameter: got {tuple(g.shape)} {g.dtype} on {g.device} "
                f"({g.layout}) for {tuple(p.shape)} {p.dtype} on {p.device}"
            )
        return g

    def _copy_grad(self, p: Tensor, g: Tensor) -> Any:
        h = self._host[p]
        if self._share_host:
            h.grad = g
            self._grad_copies[p] = (weakref.ref(g), g._version, None)
            return None
        buf = h.grad
        if buf is None or buf.shape != h.shape or buf.dtype != h.dtype:
            buf = self._grad_buffers.get(h)
            if buf is None:
                buf = self._grad_buffers[h] = torch.empty(h.shape, dtype=h.dtype, device="cpu", pin_memory=self._pin)
        event = self._copies.to_host(buf, g)
        h.grad = buf
        self._grad_copies[p] = (weakref.ref(g), g._version, event)
        return event

    @property
    def _grad_buffers(self) -> dict[Tensor, Tensor]:
        """The pinned host buffers of the gradients, kept while a parameter has none."""
        buffers = self.__dict__.get("_buffers")
        if buffers is None:
            buffers = self.__dict__["_buffers"] = {}
        return buffers

    def _fresh(self, p: Tensor, g: Tensor) -> bool:
        """Whether the host buffer holds ``g`` as it is now (copied by the hook since it
        last changed)."""
        seen = self._grad_copies.get(p)
        return seen is not None and seen[0]() is g and seen[1] == g._version

    def _refresh_param(self, p: Tensor) -> None:
        """A device parameter changed outside the optimizer (loaded weights, ``p.data =``):
        its host copy takes the new values before the step."""
        if self._versions.get(p) != (p._version, p.data_ptr()):
            self._reload(p)

    def _reload(self, p: Tensor) -> None:
        h = self._host[p]
        if p.shape != h.shape or p.dtype != h.dtype:
            raise ValueError(
                f"a parameter changed shape or dtype since CPUOffload was built: {tuple(h.shape)} {h.dtype} "
                f"-> {tuple(p.shape)} {p.dtype}"
            )
        if not self._share_host:
            h.copy_(p.detach())
        elif h.data_ptr() != p.data_ptr():  # a new storage (``p.data = ...``): shared again
            h.set_(p.data)
        self._versions[p] = (p._version, p.data_ptr())

    @torch.no_grad()
    def reload_parameters(self) -> None:
        """Read every device parameter into its host copy again. Changes autograd sees
        (in-place operations, ``p.data = new``, ``load_state_dict``) are noticed before
        each step; call this after writing parameters through ``.data`` (``p.data.clamp_()``)."""
        with self._lock:
            self._join_worker()  # runs stepped in this backward stay stepped (not stepped again)
            for run in self._runs:
                self._copies.wait(run.copied_back)
                for p in run.params:
                    self._reload(p)

    @torch.no_grad()
    def _on_grad(self, p: Tensor) -> None:
        """Post-accumulate-grad hook: copy the gradient to the host as soon as it is ready;
        with ``step_in_backward``, hand a run whose gradients have all arrived to the worker."""
        if p not in self._run_of or not self.copy_grads_in_backward or self._accumulating:
            return
        with self._lock:
            g = self._grad_of(p)
            if g is None:
                return
            if not self.step_in_backward:
                self._copy_grad(p, g)
                return
            run = self._run_of[p]
            if id(p) in run.arrived:
                raise RuntimeError(
                    "CPUOffload(step_in_backward=True): a parameter's gradient arrived twice before step(); call "
                    "step() (or zero_grad()) after each backward, wrap the backward passes of an accumulated step "
                    "but the last in accumulate(), and do not share parameters across reentrant activation "
                    "checkpoints (use_reentrant=False is fine)"
                )
            if not any(r.arrived or r.done or r.pending for r in self._runs):  # the first gradient of this backward
                self._sync_options()
            self._copy_grad(p, g)
            run.arrived.add(id(p))
            if all(id(q) in run.arrived for q in run.params if q.requires_grad):
                for q in run.params:  # frozen: stepped if it has a gradient, as without offload
                    if id(q) not in run.arrived:
                        old = self._grad_of(q)
                        if old is None:
                            self._host[q].grad = None
                        elif not self._fresh(q, old):
                            self._copy_grad(q, old)
                self._refresh_run(run)
                if self._worker is None:
                    self._worker = ThreadPoolExecutor(1, thread_name_prefix="adamkit-offload")
                run.pending = self._worker.submit(self._step_run, run)

    @contextlib.contextmanager
    def accumulate(self) -> Iterator[None]:
        """Backward passes inside copy nothing and (``step_in_backward``) step nothing:
        wrap every micro-batch of an accumulated step but the last."""
        with self._lock:
            self._accumulating += 1
        try:
            yield
        finally:
            with self._lock:
                self._accumulating -= 1

    # ------------------------------------------------------------ stepping
    def _refresh_run(self, run: _Run) -> None:
        self._copies.wait(run.copied_back)  # its last copy back has read the host copies
        for p in run.params:
            self._refresh_param(p)

    def _wait_grads(self, run: _Run) -> None:
        """Wait for the copies of a run's gradients to the host."""
        for p in run.params:
            entry = self._grad_copies.get(p)
            if entry is not None:
                self._copies.wait(entry[2])

    @torch.no_grad()  # on the worker thread too
    def _step_run(self, run: _Run) -> None:
        """Step one run on the host and queue its copy back to the device."""
        self._wait_grads(run)
        self.optimizer._step_groups({run.inner})
        self._copy_back(run)

    def _copy_back(self, run: _Run) -> None:
        stepped = [p for p in run.params if self._host[p].grad is not None]
        run.copied_back = self._copies.to_device(stepped, [self._host[p] for p in stepped])
        for p in stepped:
            self._versions[p] = (p._version, p.data_ptr())

    #: GradScaler hands over ``grad_scale`` and ``found_inf`` instead of unscaling and
    #: skipping itself: its unscaling kernel writes the gradients in place without
    #: telling autograd (their version counters stay), so the step must know it ran.
    _step_supports_amp_scaling = True

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Step every parameter that has a gradient (those stepped during backward under
        ``step_in_backward`` are not stepped again) and copy the results to the device.

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # GradScaler sets them before the step and deletes them after; read, never set
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        amp = found_inf is not None or grad_scale is not None
        with self._lock:
            try:
                done = self._join_worker()
                if amp and self.step_in_backward:
                    for name in ("grad_scale", "found_inf"):
                        self.__dict__.pop(name, None)
                    raise RuntimeError(
                        "CPUOffload(step_in_backward=True) cannot be used with GradScaler: the parameters were "
                        "stepped with scaled gradients during backward; use step_in_backward=False"
                    )
                if found_inf is not None and float(found_inf) != 0:  # GradScaler saw inf/NaN: the step is skipped
                    return loss
                self._step_rest(done, recopy=amp, grad_scale=grad_scale)
            finally:
                self._end_backward(join=False)
                self._copies.join()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch's; under ``step_in_backward`` it also ends a backward that was not
        followed by ``step()`` (one that failed, or a skipped batch): the runs it stepped
        stay stepped, and the next backward starts afresh."""
        with self._lock:
            self._end_backward()
        super().zero_grad(set_to_none)

    def _end_backward(self, join: bool = True) -> None:
        """Forget this backward's arrivals and steps (after waiting for the worker)."""
        try:
            if join:
                self._join_worker()
        finally:
            for run in self._runs:
                run.arrived.clear()
                run.pending = None
                run.done = False

    def _join_worker(self) -> set[int]:
        """Wait for the runs stepped during backward; the positions of those stepped."""
        error = None
        for run in self._runs:
            if run.pending is not None:
                try:
                    run.pending.result()
                    run.done = True
                except BaseException as exc:  # noqa: BLE001 - raised below, once every run is joined
                    error = error or exc
                finally:
                    run.pending = None
        if error is not None:
            raise error
        return {k for k, run in enumerate(self._runs) if run.done}

    def _step_rest(self, done: set[int], recopy: bool = False, grad_scale: Tensor | None = None) -> None:
        """Copy the gradients not yet on the host (or changed since; every one under
        ``recopy``), then step with ``grad_scale`` (GradScaler's, not yet divided out)."""
        todo = [k for k in range(len(self._runs)) if k not in done]
        grads = {}
        for k in todo:  # validate every gradient and option before anything changes
            for p in self._runs[k].params:
                grads[p] = self._grad_of(p)
        self._sync_options()
        for k in todo:
            run = self._runs[k]
            self._refresh_run(run)
            for p in run.params:
                g, h = grads[p], self._host[p]
                if g is None:
                    h.grad = None
                elif recopy or not self.copy_grads_in_backward or not self._fresh(p, g):
                    self._copy_grad(p, g)
        opt = self.optimizer
        whole = (
            not self._by_runs
            or opt.nonfinite in ("skip", "raise")
            or any(g.get("stochastic_rounding") for g in opt.param_groups)
        )
        if whole:
            for k in todo:
                self._wait_grads(self._runs[k])
        with self._unscaling(grad_scale, [k for k in todo]):
            if whole:  # one step: a policy or a seed for the whole step, or not adamkit's optimizer
                hidden = self._hide_done(done)
                try:
                    opt.step()
                finally:
                    for h, buf in hidden:
                        h.grad = buf
                for k in todo:
                    self._copy_back(self._runs[k])
                return
            for k in todo:
                run = self._runs[k]
                if any(self._host[p].grad is not None for p in run.params):
                    self._step_run(run)

    @contextlib.contextmanager
    def _unscaling(self, grad_scale: Tensor | None, todo: list[int]) -> Iterator[None]:
        """GradScaler's scale for the host step, as the host optimizer takes it: the
        attributes GradScaler would set on it (adamkit's, torch's fused), or the
        gradients multiplied by the scale's reciprocal as ``GradScaler.unscale_`` does."""
        opt = self.optimizer
        if grad_scale is None:
            yield
            return
        scale = grad_scale.to("cpu")
        if getattr(opt, "_step_supports_amp_scaling", False):
            opt.grad_scale, opt.found_inf = scale, torch.zeros((), dtype=torch.float32)
            try:
                yield
            finally:
                for name in ("grad_scale", "found_inf"):
                    with contextlib.suppress(AttributeError):
                        delattr(opt, name)
            return
        for k in todo:
            self._wait_grads(self._runs[k])
        grads = [self._host[p].grad for k in todo for p in self._runs[k].params if self._host[p].grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale.double().reciprocal().float())
        yield

    def _hide_done(self, done: set[int]) -> list[tuple[Tensor, Tensor | None]]:
        """Take the gradients of runs already stepped off their host copies for one step."""
        hidden = []
        for k in done:
            for p in self._runs[k].params:
                h = self._host[p]
                hidden.append((h, h.grad))
                h.grad = None
        return hidden

    # ------------------------------------------------------------ state
    @property
    def state(self) -> _StateView:  # type: ignore[override]
        return _StateView(self)

    @state.setter
    def state(self, value: Any) -> None:
        if not getattr(self, "_building", False) and value:
            raise AttributeError("CPUOffload's state is its host optimizer's (CPUOffload.optimizer.state)")

    def state_dict(self) -> dict[str, Any]:
        """The host optimizer's ``state_dict`` with the wrapper's groups: what
        ``optimizer_class`` over the same parameters and groups would save."""
        for pre in self._optimizer_state_dict_pre_hooks.values():
            pre(self)
        with self._lock:
            self._join_worker()
            self._sync_options()
            inner = self.optimizer.state_dict()
        groups = []
        for runs in self._group_runs:
            first = dict(inner["param_groups"][runs[0].inner])
            first["params"] = [x for r in runs for x in inner["param_groups"][r.inner]["params"]]
            groups.append(first)
        out: dict[str, Any] = {"state": inner["state"], "param_groups": groups}
        for post in self._optimizer_state_dict_post_hooks.values():
            result = post(self, out)
            if result is not None:
                out = result
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of this wrapper or of ``optimizer_class`` (or torch's
        optimizer, as the host optimizer accepts) over the same parameters and groups.
        A checkpoint that does not fit raises and changes nothing."""
        for pre in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre(self, state_dict)
            if result is not None:
                state_dict = result
        if not isinstance(state_dict, Mapping) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError("a state_dict must be a mapping with 'state' and 'param_groups'")
        groups = state_dict["param_groups"]
        if not isinstance(groups, (list, tuple)) or len(groups) != len(self.param_groups):
            raise ValueError(
                f"the checkpoint has {len(groups) if isinstance(groups, (list, tuple)) else 'no'} param groups, "
                f"this optimizer {len(self.param_groups)}"
            )
        split = []
        for i, g in enumerate(groups):
            ids = g.get("params") if isinstance(g, Mapping) else None
            mine = self.param_groups[i]["params"]
            if not isinstance(ids, (list, tuple)) or len(ids) != len(mine):
                raise ValueError(f"param group {i}: the checkpoint's parameters do not match this optimizer's")
            at = 0
            for run in self._group_runs[i]:
                split.append({**g, "params": list(ids[at : at + len(run.params)])})
                at += len(run.params)
        with self._lock:
            self._join_worker()
            self.optimizer.load_state_dict({"state": state_dict["state"], "param_groups": split})
            self._adopt_defaults()  # the loaded options become the wrapper's
        for post in self._optimizer_load_state_dict_post_hooks.values():
            post(self)

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("a CPUOffload cannot be pickled or copied; save its state_dict() instead")

    def __repr__(self) -> str:
        return f"CPUOffload({self.optimizer!r}, device={self.device})"

    def close(self) -> None:
        """Remove the gradient hooks and stop the worker (also done when the optimizer
        is collected: the hooks hold it weakly)."""
        for h in self.__dict__.get("_hooks", ()):
            h.remove()
        self.__dict__.get("_hooks", []).clear()
        worker = self.__dict__.get("_worker")
        if worker is not None:
            worker.shutdown(wait=True)
            self._worker = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class _Missing:
    pass


_MISSING = _Missing()


class _StateView:
    """``CPUOffload.state``: the host optimizer's state, looked up by device parameter."""

    def __init__(self, owner: CPUOffload) -> None:
        self._owner = owner

    def __getitem__(self, p: Tensor) -> dict[str, Any]:
        return self._owner.optimizer.state[self._owner._host[p]]

    def __setitem__(self, p: Tensor, value: Mapping[str, Any]) -> None:
        """Frameworks move state to the parameters' device this way (Lightning); the
        state stays on the host, where the step is."""
        host = {k: v.to("cpu") if isinstance(v, Tensor) else v for k, v in value.items()}
        self._owner.optimizer.state[self._owner._host[p]] = host

    def __contains__(self, p: object) -> bool:
        host = self._owner._host.get(p) if isinstance(p, Tensor) else None
        return host is not None and host in self._owner.optimizer.state

    def __iter__(self) -> Iterator[Tensor]:
        return (p for p in self._owner._host if p in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def get(self, p: Tensor, default: Any = None) -> Any:
        return self[p] if p in self else default

    def items(self) -> Iterator[tuple[Tensor, dict[str, Any]]]:
        return ((p, self[p]) for p in self)

    def values(self) -> Iterator[dict[str, Any]]:
        return (self[p] for p in self)

    def keys(self) -> Iterator[Tensor]:
        return iter(self)
