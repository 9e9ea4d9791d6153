"""Sharded parameters: DTensor (FSDP2's ``fully_shard``, tensor parallelism).

A DTensor parameter is stepped through its local tensor, by the same kernels as a plain
one; its state is made of DTensors with the parameter's mesh and placements, so that
``state_dict()`` and ``torch.distributed.checkpoint`` see global tensors. What must not
depend on the world size does not: the state format is decided on the global shape,
quantization blocks follow global rows, and 4-bit dither follows global element indices.

Quantized state of a DTensor parameter is blocked along the rows of its last dimension:
it needs that dimension whole on every rank (not sharded) and a multiple of the block
size. Then a rank's shard is whole rows, hence whole blocks, at any world size, and the
state's global layout — codes ``(*shape[:-1], C·bits/8)``, absmax ``(*shape[:-1], C/B)``
— flattens to a plain tensor's. Other DTensor parameters keep 32-bit state.

Global options reduce over the parameters' meshes: non-finite counts and the
skip/raise decision, percentile clipping's gradient norms. A count of a replicated
tensor is counted once: each rank's share is weighted by 1 / (its replication).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

try:  # torch built without distributed support has no DTensor: nothing is sharded
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover - torch without torch.distributed
    dist, DTensor, compute_local_shape_and_global_offset = None, None, None  # type: ignore[assignment]


def is_sharded(t: Any) -> bool:
    """Whether ``t`` is a DTensor (its elements live in per-rank local tensors)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """A DTensor's local tensor (under ``no_grad``: no autograd wrapper), else ``t``."""
    return t.to_local() if is_sharded(t) else t


def _contiguous_stride(shape: Sequence[int]) -> tuple[int, ...]:
    stride, out = 1, []
    for n in reversed(shape):
        out.append(stride)
        stride *= max(int(n), 1)
    return tuple(reversed(out))


def like(p: Tensor, local_tensor: Tensor, shape: Sequence[int] | None = None) -> Tensor:
    """``local_tensor`` as a DTensor on ``p``'s mesh and placements, of global ``shape``
    (default: ``p``'s, with ``p``'s strides)."""
    if shape is None:
        shape, stride = tuple(p.shape), tuple(p.stride())
    else:
        shape, stride = tuple(shape), _contiguous_stride(shape)
    return DTensor.from_local(
        local_tensor, p.device_mesh, p.placements, run_check=False, shape=torch.Size(shape), stride=stride
    )


def rows_quantizable(p: Tensor, block: int | None) -> bool:
    """Whether a DTensor parameter's state can be quantized in global rows: its last
    dimension not sharded (nor partial) and a whole number of ``block`` elements."""
    if block is None or p.ndim == 0 or p.shape[-1] % block:
        return False
    for placement in p.placements:
        if placement.is_partial() or (placement.is_shard() and placement.dim % p.ndim == p.ndim - 1):
            return False
    return True


def quant_shape(p: Tensor, fmt: Any, column: str) -> tuple[int, ...]:
    """The global shape of a DTensor parameter's quantized state entry ``column``."""
    last = p.shape[-1]
    width = last * fmt.bits // 8 if column.endswith("_codes") else last // fmt.block_size
    return (*p.shape[:-1], width)


@lru_cache(maxsize=4096)
def _offset(shape: tuple[int, ...], mesh: Any, placements: tuple[Any, ...]) -> int:
    _, offsets = compute_local_shape_and_global_offset(shape, mesh, placements)
    return sum(o * s for o, s in zip(offsets, _contiguous_stride(shape)))


def first_index(p: Tensor) -> int:
    """The global (row-major) index of a DTensor parameter's first local element: where
    its 4-bit dither sequence starts. For shards of whole leading rows (FSDP2) the local
    elements are one global range from it, so the codes do not depend on the world size."""
    if not is_sharded(p):
        return 0
    return _offset(tuple(p.shape), p.device_mesh, tuple(p.placements))


def replication(p: Tensor) -> int:
    """How many ranks hold each of a DTensor's local elements (its non-sharded mesh dims)."""
    mesh = p.device_mesh
    return math.prod(mesh.size(i) for i, pl in enumerate(p.placements) if not pl.is_shard())


def mesh_key(mesh: Any) -> tuple[Any, ...]:
    """A key ordering meshes alike on every rank (collectives must be issued in one order)."""
    return (tuple(mesh.mesh.flatten().tolist()), tuple(mesh.shape), tuple(mesh.mesh_dim_names or ()))


def all_reduce_sum(values: dict[Any, Tensor]) -> dict[Any, Tensor]:
    """``{mesh: float64 vector}`` summed over each mesh's ranks (every mesh dim), in the
    meshes' common order. The vectors of one mesh must have one length on every rank."""
    out = {}
    for mesh in sorted(values, key=mesh_key):
        vec = values[mesh].to(torch.float64)
        device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" else "cpu"
        vec = vec.to(device)
        for dim in range(mesh.ndim):
            dist.all_reduce(vec, group=mesh.get_group(dim))
        out[mesh] = vec.cpu()
    return out


def global_count(grads: Sequence[Tensor], counts: dict[int, int]) -> int:
    """The total of ``counts`` (by index into ``grads``) over every rank where some
    gradients are DTensors (each rank must hold the same DTensors); else the local total.
    Plain tensors' counts add up over ranks (they are reduced with the first mesh)."""
    meshes: dict[Any, float] = {}
    plain = 0
    for i, g in enumerate(grads):
        if is_sharded(g):
            meshes[g.device_mesh] = meshes.get(g.device_mesh, 0.0) + counts.get(i, 0) / replication(g)
        else:
            plain += counts.get(i, 0)
    if not meshes:
        return plain
    first = min(meshes, key=mesh_key)
    vectors = {m: torch.tensor([n, plain if m == first else 0], dtype=torch.float64) for m, n in meshes.items()}
    return round(sum(float(v.sum()) for v in all_reduce_sum(vectors).values()))


def global_norms(grads: Sequence[Tensor]) -> list[float]:
    """Each gradient's L2 norm, a DTensor's over the whole tensor (its shards' squared
    norms summed over the mesh, replicated ones once)."""
    if not grads:
        return []
    squares = [float(n) ** 2 for n in torch._foreach_norm([local(g) for g in grads])]
    by_mesh: dict[Any, list[int]] = {}
    for i, g in enumerate(grads):
        if is_sharded(g):
            by_mesh.setdefault(g.device_mesh, []).append(i)
    vectors = {m: torch.tensor([squares[i] / replication(grads[i]) for i in idx]) for m, idx in by_mesh.items()}
    for mesh, total in all_reduce_sum(vectors).items():
        for i, value in zip(by_mesh[mesh], total.tolist()):
            squares[i] = value
    return [math.sqrt(s) for s in squares]


def shard_of(p: Tensor, full: Tensor) -> Tensor:
    """This rank's shard of a whole state tensor ``full`` of a DTensor parameter ``p``
    (its leading dimensions are ``p``'s), as a DTensor: cut locally, no communication."""
    shape, offsets = compute_local_shape_and_global_offset(tuple(full.shape), p.device_mesh, tuple(p.placements))
    piece = full.detach()
    for dim, (size, start) in enumerate(zip(shape, offsets)):
        piece = piece.narrow(dim, start, size)
    return like(p, piece.to(local(p).device, copy=True).contiguous(), tuple(full.shape))
