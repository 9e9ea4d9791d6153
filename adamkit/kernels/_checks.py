"""What the kernels that read tensors through raw addresses check first.

The kernels that step many tensors through a table of addresses (Numba on the CPU,
Triton on CUDA) trust the table completely, so whatever builds one from tensors
refuses, with a clear error, what would make them read or write the wrong memory: a
tensor that is not a plain dense tensor (a wrapper subclass such as DTensor has no
data where ``data_ptr()`` points), a tensor with elements but no storage, a column
(parameters, gradients, one state entry) of two dtypes, sizes or layouts that
disagree. The optimizers never hand such tensors over (they check them first and take
the reference instead): this is the kernels' own guard, not the optimizers' error path.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter

import torch
from torch import Tensor
from torch._C import _disabled_torch_function_impl

#: No tensor with elements lives in the first page of memory: a smaller address is a
#: storage freed under its tensor (``untyped_storage().resize_(0)``) plus its offset.
LOWEST_ADDRESS = 4096

#: Tensor types whose ``data_ptr()`` is where their elements are: plain tensors, and
#: subclasses that change neither torch functions nor dispatch (found as they are met).
PLAIN_TYPES: set[type] = {Tensor, torch.nn.Parameter}
_DEFAULT_TORCH_FUNCTION = Tensor.__torch_function__.__func__


def is_plain(t: Tensor) -> bool:
    """Whether the fused kernels may step ``t`` through ``data_ptr()``: a dense strided
    tensor of a type that leaves torch's functions and dispatch alone. A wrapper
    subclass (DTensor, ...) holds its data elsewhere (its ``data_ptr()`` is 0), and a
    subclass overriding ``__torch_function__`` would not see the kernels' updates."""
    kind = type(t)
    if kind not in PLAIN_TYPES:
        if not isinstance(t, Tensor) or kind.__torch_dispatch__ is not Tensor.__torch_dispatch__:
            return False
        function = kind.__torch_function__
        if function is not _disabled_torch_function_impl and getattr(function, "__func__", None) is not (
            _DEFAULT_TORCH_FUNCTION
        ):
            return False
        PLAIN_TYPES.add(kind)
    return t.layout == torch.strided and not t.is_nested


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


_DTYPE = attrgetter("dtype")
_DEVICE_TYPE = attrgetter("device.type")


def check_table(
    columns: Sequence[Sequence[Tensor]], device_type: str, fmt: object | None = None, names: Sequence[str] = ()
) -> None:
    """Raise ValueError unless ``columns`` (parameters, gradients, then the state
    entries: lists parallel to the parameters) can be stepped as flat arrays by a
    table kernel on ``device_type``: plain tensors with storage on that device, one
    dtype per column (the gradients' the parameters'), dense state with the
    parameters' sizes, every row contiguous or laid out alike (``channels_last``).
    With a quantized ``fmt`` (:class:`adamkit.quant.QuantFormat`) the state columns
    are codes (``fmt.code_bytes(n)`` uint8) and absmax values (``fmt.blocks(n)``
    float32) in turn, contiguous."""
    params = columns[0]
    n = len(params)
    names = list(names) or ["parameters", "gradients"] + [f"state column {k}" for k in range(len(columns) - 2)]
    if any(len(col) != n for col in columns):
        raise ValueError(f"kernel table: columns of {[len(c) for c in columns]} tensors, expected {n} each")
    if n == 0:
        return
    numels = [p.numel() for p in params]
    contiguous = [p.is_contiguous() for p in params]
    for col, (name, tensors) in enumerate(zip(names, columns)):
        quantized = col >= 2 and fmt is not None
        bad = next((k for k, t in enumerate(tensors) if not isinstance(t, Tensor) or not is_plain(t)), None)
        if bad is not None:
            raise ValueError(f"kernel table, {name}, tensor {bad}: a {type(tensors[bad]).__name__} is not a plain "
                             "dense tensor")  # fmt: skip
        if set(map(_DEVICE_TYPE, tensors)) != {device_type}:
            raise ValueError(f"kernel table, {name}: tensors on {sorted(map(str, {t.device for t in tensors}))}, "
                             f"the kernel runs on {device_type}")  # fmt: skip
        if quantized:
            want = torch.uint8 if (col - 2) % 2 == 0 else torch.float32
        else:  # one dtype for the parameters and gradients, one for all the state
            want = params[0].dtype if col < 2 else columns[2][0].dtype
        dtypes = set(map(_DTYPE, tensors))
        if dtypes != {want}:
            raise ValueError(f"kernel table, {name}: {sorted(map(str, dtypes))} where {want} was expected")
        if quantized:
            size = fmt.code_bytes if (col - 2) % 2 == 0 else fmt.blocks  # type: ignore[attr-defined]
            sizes = [size(k) for k in numels]
        else:
            sizes = numels
        for k, (t, expected) in enumerate(zip(tensors, sizes)):
            where = f"kernel table, {name}, tensor {k}"
            if t.numel() != expected:
                raise ValueError(f"{where}: {t.numel()} elements, expected {expected}")
            if quantized or (contiguous[k] and t.is_contiguous()):
                if not t.is_contiguous():
                    raise ValueError(f"{where}: not contiguous")
            elif storage_order(params[k]) is None or storage_order(t) != storage_order(params[k]):
                raise ValueError(f"{where}: not laid out as its parameter in dense memory")
            if expected and t.data_ptr() < LOWEST_ADDRESS:
                raise ValueError(f"{where}: {expected} elements but no storage (address {t.data_ptr()})")
            held = t.untyped_storage().nbytes()
            if expected and (t.storage_offset() + expected) * t.element_size() > held:  # dense: extent = numel
                raise ValueError(f"{where}: {expected} elements but its storage holds {held} bytes (resized?)")
