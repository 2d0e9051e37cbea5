"""Frozen quantized bases for LoRA: NF4 (QLoRA) and packed ternary (BitNet b1.58) linear layers."""

from lorafit.quant.apply import quantize_linear, quantize_model
from lorafit.quant.linear import NF4Linear, weight_storage_bytes
from lorafit.quant.nf4 import NF4Tensor, quantize_nf4
from lorafit.quant.ternary import (
    TernaryLinear,
    convert_to_packed,
    pack_ternary,
    quantize_ternary,
    unpack_ternary,
)

__all__ = [
    "NF4Linear",
    "NF4Tensor",
    "TernaryLinear",
    "convert_to_packed",
    "pack_ternary",
    "quantize_linear",
    "quantize_model",
    "quantize_nf4",
    "quantize_ternary",
    "unpack_ternary",
    "weight_storage_bytes",
]
