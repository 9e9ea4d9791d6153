"""Which SIMD code the quantized kernels run, chosen once at import.

* ``avx512``: :mod:`adamkit.kernels.cpu._avx512_adam` and :mod:`adamkit.kernels.cpu._avx512_codes`
  (16 lanes, register permutes, the decade encoder at 8 bits);
* ``avx2``: :mod:`adamkit.kernels.cpu._avx2_quant` (8 lanes, the decade encoder at 8
  bits);
* ``None``: the portable numba loops only (scalar table lookups).

``ADAMKIT_SIMD`` caps the choice: ``auto`` (default: the best the CPU has), ``avx2``
or ``none``. Set it before adamkit is imported (Numba's on-disk cache is keyed on it,
see :mod:`adamkit.kernels.cpu._cache`). :data:`LANES`, :data:`ISA`
and the functions below are module constants, so numba drops the code of the others.
"""

from __future__ import annotations

from ...quant.codebooks import encoder_table
from . import _avx2_quant as _avx2
from . import _avx512_codes as _x512

ISA = "avx512" if _x512.HAS_AVX512 else ("avx2" if _avx2.CPU_HAS_AVX2 and _avx2.simd_allowed() else None)
SIMD = ISA is not None
LANES = 16 if ISA == "avx512" else 8
#: Whether 4-bit Adam/AdamW blocks go through a SIMD block loop (decode, update, store
#: in one loop). Only with AVX-512: with AVX2 the dither tables and the rule's constants
#: overflow the 16 registers, and decoding rows first then running the numba loop
#: measured 5-10 % faster on the Zen 3.
FUSED4 = ISA == "avx512"
#: Whether 8-bit codes are decoded 64 at a time from byte planes (AVX512-VBMI's
#: ``vpermi2b``, :func:`adamkit.kernels.cpu._avx512_codes.decode_rows8_planes`) into the
#: rows before the block loop, instead of gathered in it: 4.7x faster per value than a
#: gather on Zen 4.
PLANES8 = ISA == "avx512" and _x512.HAS_VBMI
#: Whether the 8-bit unsigned row encoder gives a value above 0 code 1 at least itself
#: (AVX-512's does; with AVX2 a pass over the row after it finds the rows that need it).
FLOORED8 = ISA == "avx512"
#: Whether the tapered maps' rows are encoded by their SIMD encoder (AVX-512's
#: ``encode_rows_tapered8``: the exponent's shift, bias and offset from three register
#: permutes); elsewhere by the packed search-free table, an element at a time.
TAPERED8 = ISA == "avx512"

if ISA == "avx512":
    from ._avx512_adam import adam_rows_4, adam_rows_8, adam_rows_8d
    from ._avx512_codes import (
        ENCODER_CONSTANTS,
        decode_rows8,
        decode_rows8_planes,
        decode_rows8_planes_scaled,
        decode_rows_dither4,
        encode_rows_dither4,
    )
    from ._avx512_codes import encode_rows_dynamic8 as encode_rows_m8
    from ._avx512_codes import encode_rows_tapered8 as encode_rows_tm8
    from ._avx512_codes import encode_rows_udynamic8 as encode_rows_v8
    from ._avx512_codes import encode_rows_utapered8 as encode_rows_tv8

    #: Each codebook's table for this ISA's row encoder.
    encoder_constants = dict(ENCODER_CONSTANTS)
else:
    from ._avx2_quant import (
        adam_rows_8,
        decode_rows8,
        decode_rows_dither4,
        encode_rows_dither4,
        encode_rows_m8,
        encode_rows_v8,
    )

    adam_rows_4 = adam_rows_8d = decode_rows8_planes = decode_rows8_planes_scaled = None  # see FUSED4, PLANES8
    encode_rows_tm8 = encode_rows_tv8 = None  # see TAPERED8
    encoder_constants = {
        "dynamic8": lambda: _avx2.decade_constants8("dynamic8"),
        "udynamic8": lambda: _avx2.decade_constants8("udynamic8"),
        # the tapered maps: the portable path's packed table (see TAPERED8)
        "tapered8": lambda: encoder_table("tapered8")[0],
        "utapered8": lambda: encoder_table("utapered8")[0],
        **{k: (lambda name=k: _avx2.dither_constants8(name)) for k in _x512.ENCODER_CONSTANTS if k.endswith("_dither")},
    }

__all__ = [
    "FLOORED8", "FUSED4", "ISA", "LANES", "PLANES8", "SIMD", "TAPERED8", "adam_rows_4", "adam_rows_8",
    "adam_rows_8d", "decode_rows8", "decode_rows8_planes", "decode_rows8_planes_scaled", "decode_rows_dither4",
    "encode_rows_dither4", "encode_rows_m8", "encode_rows_tm8", "encode_rows_tv8", "encode_rows_v8",
    "encoder_constants",
]  # fmt: skip
