"""Quantized optimizer state: codebooks and the reference block-wise codec."""

from .blockwise import DEFAULT_BLOCK, QUANT_BITS, QuantFormat, dequantize, quantize, unpack
from .codebooks import CODEBOOKS, Codebook, codebook, dynamic_map, encoder_table, linear_map

__all__ = [
    "CODEBOOKS",
    "DEFAULT_BLOCK",
    "QUANT_BITS",
    "Codebook",
    "QuantFormat",
    "codebook",
    "dequantize",
    "dynamic_map",
    "encoder_table",
    "linear_map",
    "quantize",
    "unpack",
]
