"""Quantized optimizer state: codebooks and the reference block-wise codec."""

from .blockwise import DEFAULT_BLOCK, QUANT_BITS, QuantFormat, dequantize, dither, quantize, unpack
from .codebooks import (
    CODEBOOKS,
    Codebook,
    codebook,
    dither_tables,
    dynamic_map,
    encoder_table,
    geometric_map,
    linear_map,
)

__all__ = [
    "CODEBOOKS",
    "DEFAULT_BLOCK",
    "QUANT_BITS",
    "Codebook",
    "QuantFormat",
    "codebook",
    "dequantize",
    "dither",
    "dither_tables",
    "dynamic_map",
    "encoder_table",
    "geometric_map",
    "linear_map",
    "quantize",
    "unpack",
]
