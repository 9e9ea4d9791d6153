"""Block-wise quantization of optimizer state: the reference, in torch (any device).

A state tensor of ``n`` elements in format :class:`QuantFormat` (``bits``,
``block_size``) is stored as

* ``codes``: uint8 — one code per element at 8 bits; at 4 bits two per byte, element
  ``2k`` in the low nibble and ``2k + 1`` in the high one (``ceil(n / 2)`` bytes);
* ``absmax``: float32, one per block of ``block_size`` elements (the last block may be
  shorter; ``block_size=None``: one for the whole tensor).

Each block is scaled by its ``absmax``, the largest finite ``|x|``: ``y = x · (1 /
absmax)`` in float32 (0 for an all-zero block; a block whose absmax is subnormal is
multiplied by 2^64 first, exactly, as ``1 / absmax`` would overflow). A non-finite
value is stored saturated, NaN as ``+absmax`` and ±inf as ``±absmax``, so that it
cannot spread to the rest of its block (``nonfinite="propagate"`` leaves the NaN in
the element's parameter). A ``root`` codebook quantizes ``sqrt(x)`` instead (and
``absmax`` is the block's largest root). Then, with the codebook's sorted values ``L``:

* **nearest codes** (8 bits): the code is the number of midpoints of ``L`` strictly
  below ``y`` (ties to the lower code); decoding gives ``L[code] · absmax``. The fused
  kernels compute exactly this; they may differ by one code where ``y`` lies on a
  midpoint. In an unsigned map whose code 0 is 0 (``udynamic8``: second moments,
  their maxima, ``exp_inf``), a value above 0 takes at least code 1 (3.25e-7 of the
  absmax): a second moment rounded to zero would turn ``m / (sqrt(v) + ε)`` into
  ``m / ε``.
* **dithered codes** (4 bits, ``Codebook.dither``): ``y`` (raised to ``L[0]`` if
  below or NaN, lowered to 2 if above) becomes a continuous position,
  ``k + (y - L[k]) / (L[k+1] - L[k])`` for ``y``
  in the interval ``k``, and the code is ``floor(position + u)``, at most 15, with
  ``u ∈ [0, 1)`` a dither known to encoder and decoder. Decoding subtracts it again,
  ``code + 1/2 - u``, and interpolates between the values (extrapolating half a code
  past the ends). Where nearest codes round every element of a slowly moving value the
  same way, step after step, this error is a fresh, zero-mean, uniform one per element
  and step (subtractive dither: Roberts 1962, Schuchman 1964): it averages out in the
  moments instead of biasing them. ``u`` comes from an additive low-discrepancy
  sequence over the element index ``j`` and the step ``t`` at which the codes were
  written, ``u = ((j · 3242174889 + t · 2654435769) mod 2^32 >> 16) / 2^16`` (the
  plastic number's and the golden ratio's fractions of 2^32): it is stored nowhere, and
  checkpoints need no more than the step they already hold.

  Exactly, in float32 and integer arithmetic with the
  :func:`~adamkit.quant.codebooks.dither_tables` (no fused multiply-adds; the kernels
  compute it bit for bit): ``position = trunc(y · rate[k] + offset[k])`` in units of
  2^-16 codes, ``code = min((position + (h >> 16)) >> 16, 15)`` with ``h`` the hash
  above; decoding, ``d = 2^15 - (h >> 16)`` and ``L[code] + d · (up[code] if d >= 0
  else down[code])``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .codebooks import (
    CODEBOOKS,
    DITHER_ALONG,
    ROLES,
    TAPERED8,
    UNDITHERED4,
    Codebook,
    codebook,
    dither_phase,
    dither_tables,
)

#: Valid ``state_bits`` of quantized state.
QUANT_BITS = (8, 4)
#: Default block sizes: bitsandbytes' 256 at 8 bits; 128 at 4 bits (Li et al. 2023).
DEFAULT_BLOCK = {8: 256, 4: 128}
#: float32's smallest normal (2^-126): below, ``1 / absmax`` would overflow.
FLOAT32_TINY = 2.0**-126


@dataclass(frozen=True)
class QuantFormat:
    """How one parameter's quantized state is laid out.

    Attributes:
        bits: 8 or 4 bits per element.
        block_size: elements per absmax, or None for one absmax per tensor
            (bitsandbytes' ``block_wise=False``).
        dither: dithered codes (see the module docstring); default, and only, at 4 bits.
            ``False`` at 4 bits is adamkit 0.1's nearest-code 4-bit format, which
            checkpoints may hold: it is decoded and re-encoded when loaded.
        tapered: the 8-bit tapered maps (``tapered8``, ``utapered8``:
            :func:`~adamkit.quant.codebooks.tapered_map`) instead of bitsandbytes'
            dynamic maps (``quant_map="tapered"``); 8 bits only.
    """

    bits: int
    block_size: int | None
    dither: bool | None = None
    tapered: bool = False

    @staticmethod
    def from_key(bits: int, block_key: int, dither: int | None = None, tapered: int | None = None) -> QuantFormat:
        """The format a checkpoint names: ``block_key`` 0 means one block per tensor;
        ``dither`` 0 or 1 (absent: a checkpoint from before dithering, nearest codes);
        ``tapered`` (``quant_map``) 0 or 1 (absent: 0, the dynamic maps).
        Kept per key: every step asks for each tensor's format."""
        return _format(bits, block_key, _flag("quant_dither", dither), _flag("quant_map", tapered))

    def __post_init__(self) -> None:
        if self.bits not in QUANT_BITS:
            raise ValueError(f"quantized state has {QUANT_BITS} bits, not {self.bits!r}")
        if self.dither is None:
            object.__setattr__(self, "dither", self.bits == 4)
        elif not isinstance(self.dither, bool) or (self.dither and self.bits != 4):
            raise ValueError(f"dither is a bool, True only at 4 bits; got {self.dither!r} at {self.bits} bits")
        if not isinstance(self.tapered, bool) or (self.tapered and self.bits != 8):
            raise ValueError(f"tapered is a bool, True only at 8 bits; got {self.tapered!r} at {self.bits} bits")
        if self.block_size is not None and (
            isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 2
        ):
            raise ValueError(f"block_size must be an int >= 2 or None, got {self.block_size!r}")
        if self.bits == 4 and self.block_size is not None and self.block_size % 2:
            raise ValueError(f"4-bit state packs two codes per byte: block_size must be even, got {self.block_size}")

    def codebook(self, key: str) -> Codebook:
        """The codebook of state ``key`` (see :data:`~adamkit.quant.CODEBOOKS`)."""
        from ..spec import BOOK_ROLES  # the key's role: each algorithm's spec names it

        if self.tapered:
            books = TAPERED8
        else:
            books = CODEBOOKS[self.bits] if self.dither or self.bits == 8 else UNDITHERED4
        return codebook(books[ROLES.index(BOOK_ROLES[key])])

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


def _flag(name: str, value: object) -> bool:
    """A checkpoint's 0/1 format entry (an int, bool, integral float or one-element
    tensor; None: absent, 0) as a bool; ValueError for anything else."""
    if value is None:
        return False
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            raise ValueError(f"{name} must be 0 or 1, got {value!r}")
        value = value.item()
    if isinstance(value, np.generic) and value.size == 1 and np.isrealobj(value):
        value = value.item()  # a numpy scalar (np.int64(1), np.bool_(True))
    if isinstance(value, (bool, int, float)) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{name} must be 0 or 1, got {value!r}")


@functools.lru_cache(maxsize=64)
def _format(bits: int, block_key: int, dither: bool, tapered: bool = False) -> QuantFormat:
    return QuantFormat(bits, None if block_key == 0 else block_key, dither, tapered)


def _blocked(x: Tensor, block: int) -> Tensor:
    """``x`` (flat) zero-padded to whole blocks, as [blocks, block]."""
    n = x.numel()
    pad = (-n) % block if n else block
    return torch.nn.functional.pad(x.reshape(-1), (0, pad)).view(-1, block)


def dither(numel: int, step: int, device: torch.device | str = "cpu", first_index: int = 0) -> Tensor:
    """int64 [numel]: the dither of elements ``0 .. numel-1`` (of a tensor whose first
    element has index ``first_index`` in the sequence) for codes written at step
    ``step``, in units of 2^-16 (``u = dither / 2^16 ∈ [0, 1)``)."""
    j = torch.arange(numel, dtype=torch.int64, device=device) & 0xFFFFFFFF
    low, high = DITHER_ALONG & 0xFFFF, DITHER_ALONG >> 16  # 16-bit halves: no int64 overflow
    h = (j * low + (((j * high) & 0xFFFF) << 16) + dither_phase(step, first_index)) & 0xFFFFFFFF
    return h >> 16


def _tables(book: Codebook, device: torch.device) -> dict[str, Tensor]:
    tab = dither_tables(book.name)
    names = ("values", "rate", "offset", "up", "down")
    return {k: torch.from_numpy(getattr(tab, k)).to(device) for k in names}


def quantize(x: Tensor, fmt: QuantFormat, book: Codebook, step: int = 0, first_index: int = 0) -> tuple[Tensor, Tensor]:
    """Encode ``x`` (any float dtype and shape; read flat): (codes uint8, absmax float32).

    A ``root`` codebook encodes ``sqrt(x)`` (and ``absmax`` is the block's largest root).
    A ``dither`` codebook's codes are for step ``step`` (the state's step count), their
    dither from index ``first_index`` on (:func:`dither`).
    """
    n = x.numel()
    x = x.detach().float()
    rows = _blocked(x.sqrt() if book.root else x, fmt.block_of(n))
    finite = rows.isfinite()
    absmax = torch.where(finite, rows.abs(), 0.0).amax(dim=1)
    rows = torch.where(finite, rows, torch.where(rows < 0, -absmax[:, None], absmax[:, None]))  # NaN: +absmax
    # a subnormal absmax's inverse overflows: such rows are scaled up first (exactly)
    scale = torch.where(absmax < FLOAT32_TINY, 2.0**64, 1.0)
    rows = rows * scale[:, None]
    inv = torch.where(absmax > 0, 1.0 / (absmax * scale), 0.0)
    y = (rows * inv[:, None]).reshape(-1)[:n]
    if book.dither:
        t = _tables(book, x.device)
        y = torch.where(y > t["values"][0], y, t["values"][0]).clamp(max=2.0)  # NaN: as L[0]; > 1: code 15
        k = torch.searchsorted(t["values"][1:-1], y.contiguous(), right=True)  # the interval: 0..14
        position = (y * t["rate"][k] + t["offset"][k]).to(torch.int64)  # in 2^-16 codes, truncated
        codes = ((position + dither(n, step, x.device, first_index)) >> 16).clamp(0, 15).to(torch.uint8)
    else:
        mids = book.midpoints.to(x.device)
        codes = torch.searchsorted(mids, y.contiguous(), right=False).to(torch.uint8)
        if not book.signed and float(book.values[0]) == 0.0:  # a value above 0 never decodes to 0
            codes = torch.where(rows.reshape(-1)[:n] > 0, codes.clamp(min=1), codes)
    if fmt.bits == 4:
        codes = torch.nn.functional.pad(codes, (0, n % 2))
        codes = codes[0::2] | (codes[1::2] << 4)
    return codes, absmax


def unpack(codes: Tensor, fmt: QuantFormat, numel: int) -> Tensor:
    """One code per element (int64), whatever the packing."""
    if fmt.bits == 4:
        codes = torch.stack([codes & 0xF, codes >> 4], dim=1).reshape(-1)[:numel]
    return codes.long()


def dequantize(
    codes: Tensor, absmax: Tensor, fmt: QuantFormat, book: Codebook, numel: int, step: int = 0, first_index: int = 0
) -> Tensor:
    """Decode to a flat float32 tensor of ``numel`` elements (codes, read flat, written at
    ``step``; dither from ``first_index`` on, as :func:`quantize`)."""
    codes, absmax = codes.reshape(-1), absmax.reshape(-1)
    code = unpack(codes, fmt, numel)
    if book.dither:
        t = _tables(book, codes.device)
        back = (
            32768 - dither(numel, step, codes.device, first_index)
        ).float()  # code + 1/2 - u, less the code, in 2^-16
        values = t["values"][code] + back * torch.where(back >= 0, t["up"][code], t["down"][code])
    else:
        values = book.values.to(codes.device)[code]
    block = fmt.block_of(numel)
    scale = absmax.float().repeat_interleave(block)[:numel] if numel else absmax.new_zeros(0)
    out = values * scale
    return out * out if book.root else out
