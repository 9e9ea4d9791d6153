"""Block-wise quantization of optimizer state: the reference, in torch (any device).

A state tensor of ``n`` elements in format :class:`QuantFormat` (``bits``,
``block_size``) is stored as

* ``codes``: uint8 — one code per element at 8 bits; at 4 bits two per byte, element
  ``2k`` in the low nibble and ``2k + 1`` in the high one (``ceil(n / 2)`` bytes);
* ``absmax``: float32, one per block of ``block_size`` elements (the last block may be
  shorter; ``block_size=None``: one for the whole tensor).

Encoding, for each block: ``absmax = max |x|``; ``y = x · (1 / absmax)`` in float32 (0
for an all-zero block); the code is the number of codebook midpoints strictly below
``y`` (the nearest value, ties to the lower code). Decoding: ``codebook[code] · absmax``.
The fused kernels compute exactly this; they may differ by one code where ``y`` lies
on a midpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .codebooks import CODEBOOKS, Codebook, codebook

#: Valid ``state_bits`` of quantized state.
QUANT_BITS = (8, 4)
#: Default block sizes: bitsandbytes' 256 at 8 bits; 128 at 4 bits (Li et al. 2023).
DEFAULT_BLOCK = {8: 256, 4: 128}


@dataclass(frozen=True)
class QuantFormat:
    """How one parameter's quantized state is laid out.

    Attributes:
        bits: 8 or 4 bits per element.
        block_size: elements per absmax, or None for one absmax per tensor
            (bitsandbytes' ``block_wise=False``).
    """

    bits: int
    block_size: int | None

    @staticmethod
    def from_key(bits: int, block_key: int) -> QuantFormat:
        """The format a checkpoint names: ``block_key`` 0 means one block per tensor."""
        return QuantFormat(bits, None if block_key == 0 else block_key)

    def __post_init__(self) -> None:
        if self.bits not in QUANT_BITS:
            raise ValueError(f"quantized state has {QUANT_BITS} bits, not {self.bits!r}")
        if self.block_size is not None and (
            isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 2
        ):
            raise ValueError(f"block_size must be an int >= 2 or None, got {self.block_size!r}")
        if self.bits == 4 and self.block_size is not None and self.block_size % 2:
            raise ValueError(f"4-bit state packs two codes per byte: block_size must be even, got {self.block_size}")

    def codebook(self, key: str) -> Codebook:
        """The codebook of state ``key`` (see :data:`~adamkit.quant.CODEBOOKS`)."""
        first, second, norm = CODEBOOKS[self.bits]
        return codebook(first if key == "exp_avg" else norm if key == "exp_inf" else second)

    @property
    def block_key(self) -> int:
        """``block_size`` as a number for checkpoints: 0 for one block per tensor."""
        return 0 if self.block_size is None else self.block_size

    def code_bytes(self, numel: int) -> int:
        return numel if self.bits == 8 else (numel + 1) // 2

    def blocks(self, numel: int) -> int:
        if self.block_size is None:
            return 1
        return max(1, math.ceil(numel / self.block_size))

    def block_of(self, numel: int) -> int:
        """The block length for a tensor of ``numel`` elements."""
        return max(numel, 1) if self.block_size is None else self.block_size


def _blocked(x: Tensor, block: int) -> Tensor:
    """``x`` (flat) zero-padded to whole blocks, as [blocks, block]."""
    n = x.numel()
    pad = (-n) % block if n else block
    return torch.nn.functional.pad(x.reshape(-1), (0, pad)).view(-1, block)


def quantize(x: Tensor, fmt: QuantFormat, book: Codebook) -> tuple[Tensor, Tensor]:
    """Encode ``x`` (any float dtype and shape; read flat): (codes uint8, absmax float32).

    A ``root`` codebook encodes ``sqrt(x)`` (and ``absmax`` is the block's largest root).
    """
    n = x.numel()
    x = x.detach().float()
    rows = _blocked(x.sqrt() if book.root else x, fmt.block_of(n))
    absmax = rows.abs().amax(dim=1)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    y = rows * inv[:, None]
    mids = book.midpoints.to(x.device)
    codes = torch.searchsorted(mids, y.contiguous(), right=False).reshape(-1)[:n].to(torch.uint8)
    if fmt.bits == 4:
        codes = torch.nn.functional.pad(codes, (0, n % 2))
        codes = codes[0::2] | (codes[1::2] << 4)
    return codes, absmax


def unpack(codes: Tensor, fmt: QuantFormat, numel: int) -> Tensor:
    """One code per element (int64), whatever the packing."""
    if fmt.bits == 4:
        codes = torch.stack([codes & 0xF, codes >> 4], dim=1).reshape(-1)[:numel]
    return codes.long()


def dequantize(codes: Tensor, absmax: Tensor, fmt: QuantFormat, book: Codebook, numel: int) -> Tensor:
    """Decode to a flat float32 tensor of ``numel`` elements."""
    values = book.values.to(codes.device)[unpack(codes, fmt, numel)]
    block = fmt.block_of(numel)
    scale = absmax.float().repeat_interleave(block)[:numel] if numel else absmax.new_zeros(0)
    out = values * scale
    return out * out if book.root else out
