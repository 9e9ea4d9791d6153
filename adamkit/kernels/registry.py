"""(algorithm, device type, state format) → kernel, or a clear error saying why not.

Backends register their kernels here; the optimizers only ever call :func:`resolve`.
There is no ``if algorithm == ...`` anywhere else: a missing combination is a missing
registry entry, and the error says which.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..spec import ALGORITHMS as _ALGORITHMS
from ._tables import Tables

#: Backends in order of preference for ``backend="auto"`` (first available wins).
BACKENDS: tuple[str, ...] = ("triton", "numba", "reference")
#: Backends that are fused kernels (what ``fused=True`` asks for).
FUSED_BACKENDS: frozenset[str] = frozenset({"triton", "numba"})
#: Valid ``state_bits`` values; which of them a backend supports is in its entries.
STATE_BITS: tuple[int, ...] = (32, 16, 8, 4)
ALGORITHMS: tuple[str, ...] = tuple(_ALGORITHMS)


class KernelUnavailableError(RuntimeError):
    """No kernel fits the request: the message names the part that does not."""


@dataclass
class Bucket:
    """What one kernel call steps: tensors of one device, parameter dtype and state
    format, validated, with their step counts.

    The tensors come either as lists (``params``, ``grads``, ``state`` columns by key,
    ``salts``: each tensor's position in its group) or as a cached plan's address
    tables (``tables``, for kernels with ``tables``). ``steps``: the step counts the
    tensors take now, on the host as float64 [n, 1 + len(history)] (the count, then the
    algorithm's per-parameter history values) for the tensors at ``rows`` of the tables
    (None: all), or on the device as float64 [n] for a capturable step.
    """

    kernel: Kernel
    device: torch.device
    param_dtype: torch.dtype
    fmt: Any  # the state's dtype, or its QuantFormat
    steps: np.ndarray | Tensor
    params: Sequence[Tensor] | None = None
    grads: Sequence[Tensor] | None = None
    state: dict[str, list[Tensor]] | None = None
    salts: Sequence[int] | None = None
    tables: Tables | None = None
    rows: np.ndarray | None = None
    #: the gradients of a tables bucket, when asked for (AMP's unscale)
    table_grads: Callable[[], list[Tensor]] | None = field(default=None, repr=False)

    def gradients(self) -> list[Tensor]:
        """The gradients this call reads."""
        if self.grads is not None:
            return list(self.grads)
        assert self.table_grads is not None, "a tables bucket says where its gradients are"
        return self.table_grads()


@dataclass(frozen=True)
class Kernel:
    """A registered kernel: what it computes, where it runs, and the function."""

    algorithm: str
    backend: str
    device_types: frozenset[str] | None  # None: any device
    state_bits: frozenset[int]
    fn: Callable[..., int]
    #: (param dtype, state dtype, contiguous) -> why this kernel cannot take such
    #: tensors, or None. None here: it takes anything (the reference).
    unsupported: Callable[[Any, Any, bool], str | None] | None = None
    #: The same kernel over address tables (pointer-based backends): the optimizers
    #: cache the tables across steps, so 20,000 small tensors cost one cheap call.
    tables: Callable[..., int] | None = None
    #: Devices it takes only when asked for by name, never for ``backend="auto"``
    #: (Triton's interpreter on CPU tensors: correct, but far slower than numba).
    explicit_device_types: frozenset[str] = frozenset()
    #: It divides the gradients by an AMP scale itself (``amp=(grad_scale, found_inf)``);
    #: for the others the optimizer unscales them first.
    amp_scale: bool = False
    #: It can step with no host read (``capturable=True``): scalars as device tables.
    capturable: bool = False
    #: ``(steps, step_size, inv_bc2_sqrt, consts, decay) -> scalars``: a capturable
    #: step's device scalars (float64 [n] tensors; ``consts`` a RuleConsts; ``decay`` a
    #: device tensor or None) laid out as this kernel takes them.
    device_tables: Callable[..., Any] | None = None

    @property
    def fused(self) -> bool:
        return self.backend in FUSED_BACKENDS

    def launch(
        self,
        bucket: Bucket,
        scalars: Any,
        *,
        amsgrad: bool,
        maximize: bool,
        mask_nonfinite: bool,
        sr_seed: int | None,
        amp: tuple[Tensor | None, Tensor | None] | None = None,
        count: Tensor | None = None,
    ) -> int | Tensor:
        """Step ``bucket``: the one way the optimizers call a kernel.

        ``scalars``: the step's :class:`~adamkit._scalars.StepScalars` (per-tensor values
        of a tables bucket already in ``bucket.tables.scal``), or a capturable step's
        device tables (:attr:`device_tables`' layout). ``amp``: ``(grad_scale,
        found_inf)`` for kernels with ``amp_scale``; ``count``: the device counter of a
        capturable step's masked elements. Returns the count of masked elements."""
        extra: dict[str, Any] = {}
        if amp is not None:
            extra["amp"] = amp
        if count is not None:
            extra["count"] = count
        flags = dict(amsgrad=amsgrad, maximize=maximize, mask_nonfinite=mask_nonfinite, sr_seed=sr_seed)
        if bucket.tables is not None:
            assert self.tables is not None, f"the {self.backend} {self.algorithm} kernel takes no tables"
            return self.tables(bucket.tables, scalars, **flags, **extra)
        if not isinstance(bucket.fmt, torch.dtype):  # quantized state: its format
            extra["fmt"] = bucket.fmt
        assert bucket.params is not None and bucket.grads is not None and bucket.state is not None
        return self.fn(bucket.params, bucket.grads, bucket.state, scalars, salts=bucket.salts, **flags, **extra)

    def supports(self, device_type: str, state_bits: int, explicit: bool = False) -> bool:
        devices_ok = self.device_types is None or device_type in self.device_types
        devices_ok = devices_ok or (explicit and device_type in self.explicit_device_types)
        return devices_ok and state_bits in self.state_bits


def layout_refusal(backend: str) -> str:
    """Why ``backend``'s elementwise kernels refuse a tensor's layout (``unsupported``)."""
    return (
        f"the {backend} kernels need the parameter, its gradient and its state as plain tensors (not a subclass "
        "such as DTensor), contiguous, or all three laid out alike in dense memory (channels_last, say) and no "
        "stochastic rounding"
    )


_KERNELS: list[Kernel] = []


def register(
    algorithm: str,
    *,
    backend: str,
    device_types: tuple[str, ...] | None = None,
    state_bits: tuple[int, ...] = (32,),
    unsupported: Callable[[Any, Any, bool], str | None] | None = None,
    tables: Callable[..., int] | None = None,
    explicit_device_types: tuple[str, ...] = (),
    amp_scale: bool = False,
    device_tables: Callable[..., Any] | None = None,
) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorator: register ``fn`` as the ``backend`` kernel of ``algorithm`` (capabilities:
    see :class:`Kernel`; ``device_tables`` makes it capturable where the algorithm's
    scalars can be computed on the device)."""
    if algorithm not in ALGORITHMS or backend not in BACKENDS:
        raise ValueError(f"unknown algorithm {algorithm!r} or backend {backend!r}")

    def deco(fn: Callable[..., int]) -> Callable[..., int]:
        devices = None if device_types is None else frozenset(device_types)
        explicit = frozenset(explicit_device_types)
        capturable = device_tables is not None and _ALGORITHMS[algorithm].device_scalars is not None
        entry = Kernel(algorithm, backend, devices, frozenset(state_bits), fn, unsupported, tables, explicit)
        _KERNELS.append(replace(entry, amp_scale=amp_scale, capturable=capturable, device_tables=device_tables))
        resolve.cache_clear()
        return fn

    return deco


def is_forced(backend: str, fused: bool | None) -> bool:
    """Whether the request demands a fused kernel (rather than preferring one)."""
    return fused is True or backend in FUSED_BACKENDS


def check_backend_request(backend: str, fused: bool | None) -> None:
    """Validate ``backend`` and ``fused`` on their own (before any device is known)."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if fused is False and backend in FUSED_BACKENDS:
        raise ValueError(f"fused=False contradicts backend={backend!r}, a fused backend")
    if fused is True and backend == "reference":
        raise ValueError("fused=True contradicts backend='reference', which is not fused")


@cache
def resolve(
    algorithm: str, device_type: str, state_bits: int, backend: str = "auto", fused: bool | None = None
) -> Kernel:
    """The kernel to use, or :class:`KernelUnavailableError` naming what is missing.

    Args:
        algorithm: a name from :data:`adamkit.spec.ALGORITHMS`.
        device_type: ``param.device.type`` (``"cpu"``, ``"cuda"``, ...).
        state_bits: bits per optimizer-state element (32 = the parameter's dtype).
        backend: ``"auto"`` or a name from :data:`BACKENDS`.
        fused: torch's flag: None = best available, True = a fused kernel or an
            error, False = the reference.
    """
    check_backend_request(backend, fused)
    if state_bits not in STATE_BITS:
        raise ValueError(f"state_bits must be one of {STATE_BITS}, got {state_bits!r}")
    if backend != "auto":
        wanted = [backend]
    elif fused is True:
        wanted = [b for b in BACKENDS if b in FUSED_BACKENDS]
    elif fused is False:
        wanted = ["reference"]
    else:
        wanted = list(BACKENDS)
    for name in wanted:
        for k in _KERNELS:
            if (
                k.algorithm == algorithm
                and k.backend == name
                and k.supports(device_type, state_bits, backend != "auto")
            ):
                return k
    what = f"{' or '.join(wanted)} kernel for {algorithm} on {device_type!r} with state_bits={state_bits}"
    have = sorted({(k.backend, str(sorted(k.state_bits))) for k in _KERNELS if k.algorithm == algorithm})
    message = f"no {what}; registered for {algorithm} (backend, state_bits): {have or 'none'}"
    if fused:  # torch's words for it first
        devices = sorted({d for k in _KERNELS if k.fused and k.algorithm == algorithm for d in k.device_types or ()})
        message = (
            "`fused=True` requires all the params to be floating point Tensors of supported devices: "
            f"{devices} ({message})"
        )
    raise KernelUnavailableError(message)
