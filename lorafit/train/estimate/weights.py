"""The frozen base's bytes, the `weights` term of an estimate: what each method keeps of the model.

With d the compute dtype's width (2 for bf16, 4 for fp32) and n the weights of the blocks' linears:

    full, lora   every parameter in d
    qlora        the linears in NF4, as lorafit.quant.linear.NF4Linear (and bitsandbytes) keeps them:
                   codes    4 bits per weight                                   n / 2
                   scales   one fp32 absmax per 64 weights                      n * 4/64
                            or, double-quantized, an 8-bit absmax per 64 weights and one fp32 scale
                            per 256 of those blocks                             n * (1/64 + 4/16384)
    ternary      the linears as lorafit.quant.ternary.TernaryLinear keeps them, per layer (out, in):
                   packed   (out, ceil(in / 4)) uint8, four 2-bit codes a byte  out * ceil(in / 4)
                   scale    (out, in / group_size) fp32; group_size = in (one scale per row) unless
                            chosen                                              out * in/group_size * 4

For both quantized methods everything else stays in d (`dense`): the embedding (not an nn.Linear),
the output head unless tied to it (lorafit.quant.load and quantize_model skip `lm_head`) and the
RMSNorm weights. Per weight a ternary linear costs 1/4 + 4/group_size bytes: 0.2505 for an 8192-wide
row with one scale, 0.3125 with group_size 64. Llama linears have no biases; none are counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorafit.train.estimate.setup import (
    DTYPE_BYTES,
    NF4_BYTES,
    NF4_DOUBLE_QUANT_BYTES,
    TERNARY_CODES_PER_BYTE,
    TERNARY_SCALE_BYTES,
    TrainSetup,
)
from lorafit.train.estimate.shapes import ModelShape

NF4_CODE_BYTES = 0.5  # 4 bits per weight


@dataclass(frozen=True)
class BaseWeights:
    """The base model's bytes in three parts that sum to `total`."""

    codes: float
    """The quantized linears' codes (NF4 4-bit, ternary packed 2-bit); 0 when nothing is quantized."""
    scales: float
    """Their scales (NF4 absmax statistics, ternary fp32 per row or group)."""
    dense: float
    """What stays in the compute dtype: everything for full/lora; embedding, untied head and norms else."""

    @property
    def total(self) -> float:
        return self.codes + self.scales + self.dense


def ternary_linear_bytes(in_features: int, out_features: int, group_size: int | None = None) -> tuple[int, int]:
    """(packed, scale) bytes of one TernaryLinear: out * ceil(in/4) uint8 and out * (in/group_size) fp32."""
    packed = out_features * -(-in_features // TERNARY_CODES_PER_BYTE)
    scale = out_features * (in_features // (group_size or in_features)) * TERNARY_SCALE_BYTES
    return packed, scale


def ternary_bytes(shape: ModelShape, group_size: int | None = None) -> tuple[int, int]:
    """(packed, scale) bytes of all the blocks' linears of `shape` as TernaryLinear."""
    layers = [ternary_linear_bytes(i, o, group_size) for i, o in shape.linears().values()]
    return shape.layers * sum(p for p, _ in layers), shape.layers * sum(s for _, s in layers)


def base_weights(setup: TrainSetup) -> BaseWeights:
    """The frozen (or, for 'full', trained) base of `setup`, in bytes (see the module docstring)."""
    s, d = setup.shape, DTYPE_BYTES[setup.dtype]
    if setup.method in ("full", "lora"):
        return BaseWeights(codes=0, scales=0, dense=s.n_params * d)
    dense = (s.n_params - s.n_linear_params) * d
    if setup.method == "ternary":
        packed, scale = ternary_bytes(s, setup.group_size)
        return BaseWeights(codes=packed, scales=scale, dense=dense)
    nf4 = NF4_DOUBLE_QUANT_BYTES if setup.double_quant else NF4_BYTES
    return BaseWeights(codes=s.n_linear_params * NF4_CODE_BYTES,
                       scales=s.n_linear_params * (nf4 - NF4_CODE_BYTES), dense=dense)
