"""Sharded parameters: DTensor (FSDP2's ``fully_shard``, tensor parallelism).

A DTensor parameter is stepped through its local tensor, by the same kernels as a plain
one; its state is made of DTensors with the parameter's mesh and placements, so that
``state_dict()`` and ``torch.distributed.checkpoint`` see global tensors. What must not
depend on the world size does not: the state format is decided on the global shape,
quantization blocks follow global rows, and 4-bit dither follows global element indices.

Quantized state of a DTensor parameter is blocked in rows: a row is what follows the
last sharded dimension ``d`` (``inner = prod(shape[d+1:])`` elements, whole on every
rank), and it must be a whole number of blocks. Then a rank's shard is whole rows, hence
whole blocks, at any world size, and the state's global layout — codes
``(*shape[:d+1], inner·bits/8)``, absmax ``(*shape[:d+1], inner/B)`` — flattens to a plain
tensor's. A DTensor sharded along no dimension (replicated) keeps a plain tensor's flat
layout. Other DTensor parameters (their last dimension sharded, rows that are not
whole blocks) keep 32-bit state.

Global options reduce over the parameters' meshes: non-finite counts and the
skip/raise decision, percentile clipping's gradient norms. A count of a replicated
tensor is counted once: each rank's share is weighted by 1 / (its replication).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def _dtensor() -> Any:
    """The DTensor class, if its module was imported: no DTensor exists before (importing
    it here would cost every ``import adamkit`` ~0.4 s)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_sharded(t: Any) -> bool:
    """Whether ``t`` is a DTensor (its elements live in per-rank local tensors)."""
    cls = _dtensor()
    return cls is not None and isinstance(t, cls)


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
    return _dtensor().from_local(
        local_tensor, p.device_mesh, p.placements, run_check=False, shape=torch.Size(shape), stride=stride
    )


def _rows(p: Tensor) -> tuple[int, int] | None:
    """(the last sharded dimension ``d``, elements per row after it) of a DTensor; (-1,
    numel) if no dimension is sharded; None if a placement is partial."""
    dims = [-1]
    for placement in p.placements:
        if placement.is_partial():
            return None
        if placement.is_shard():
            dims.append(placement.dim % p.ndim)
    d = max(dims)
    return d, math.prod(p.shape[d + 1 :])


def one_range(p: Tensor) -> bool:
    """Whether each rank's shard of a DTensor is one range of global (row-major) element
    indices: sharded along one dimension with nothing but size-1 dimensions before it,
    by plain chunks (``_StridedShard`` interleaves them)."""
    dims = {pl.dim % p.ndim for pl in p.placements if pl.is_shard()}
    if not dims:
        return True
    if len(dims) > 1 or any(pl.is_shard() and type(pl).__name__ != "Shard" for pl in p.placements):
        return False
    return math.prod(p.shape[: dims.pop()]) == 1


def rows_quantizable(p: Tensor, block: int | None, dithered: bool = False) -> bool:
    """Whether a DTensor parameter's state can be quantized in global rows (whole blocks
    after its last sharded dimension), or flat (no dimension sharded). Dithered (4-bit)
    codes also need each shard to be one range of global indices (:func:`one_range`):
    their dither follows the index."""
    rows = _rows(p)
    if rows is None or (dithered and not one_range(p)):
        return False
    d, inner = rows
    if block is None:  # one absmax a tensor: only if not sharded
        return d < 0
    return d < 0 or (inner > 0 and inner % block == 0)


def quant_shape(p: Tensor, fmt: Any, column: str, shape: Sequence[int] | None = None) -> tuple[int, ...]:
    """The global shape of a DTensor parameter's quantized state entry ``column`` (with
    ``shape``: the local one, for the local tensor of that shape)."""
    d, inner = _rows(p) or (-1, 0)
    shape = tuple(p.shape if shape is None else shape)
    if d < 0:  # not sharded: a plain tensor's layout
        n = math.prod(shape)
        return (fmt.code_bytes(n),) if column.endswith("_codes") else (fmt.blocks(n),)
    width = inner * fmt.bits // 8 if column.endswith("_codes") else inner // fmt.block_size
    return (*shape[: d + 1], width)


@lru_cache(maxsize=4096)
def _offset(shape: tuple[int, ...], mesh: Any, placements: tuple[Any, ...]) -> int:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

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


def all_reduce_sum(values: dict[Any, Tensor], op: str = "sum") -> dict[Any, Tensor]:
    """``{mesh: vector}`` summed (or ``op="max"``: maximized) over each mesh's ranks
    (every mesh dim), in the meshes' common order, as float64 (int64 for "max"). The
    vectors of one mesh must have one length on every rank."""
    out = {}
    reduce_op = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
    for mesh in sorted(values, key=mesh_key):
        device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" else "cpu"
        vec = values[mesh].to(device, torch.int64 if op == "max" else torch.float64)
        for dim in range(mesh.ndim):
            dist.all_reduce(vec, op=reduce_op, group=mesh.get_group(dim))
        out[mesh] = vec.cpu()
    return out


def meshes_of(tensors: Sequence[Tensor]) -> list[Any]:
    """The distinct meshes of the DTensors among ``tensors``."""
    seen: dict[Any, None] = {}
    for t in tensors:
        if is_sharded(t):
            seen.setdefault(t.device_mesh, None)
    return list(seen)


def agreed_seed(seed: int, meshes: Sequence[Any]) -> int:
    """A random seed every rank of ``meshes`` agrees on (the largest drawn): replicas of
    a parameter must round alike."""
    if not meshes:
        return seed
    agreed = all_reduce_sum({m: torch.tensor([seed]) for m in meshes}, op="max")
    return max(int(v[0]) for v in agreed.values())


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
    from torch.distributed.tensor import distribute_tensor

    whole = full.detach().to(local(p).device, copy=True)
    return distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None)
