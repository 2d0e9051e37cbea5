"""4-bit NormalFloat (NF4) weights with double quantization, bit-compatible with bitsandbytes.

`quantize_nf4(W)` gives an `NF4Tensor`: packed 4-bit codes (two per byte, first value in the high
nibble), one absmax per block of 64 weights, and with double quantization those absmax values
centred on their mean and stored as 8-bit codes with one fp32 scale per 256 blocks (QLoRA, Dettmers
et al. 2023). `NF4Tensor.dequantize(dtype)` gives the dense weight back.

The arithmetic is `lorafit.quant.reference` (pure PyTorch, byte-identical to bitsandbytes' CPU code);
which implementation runs it, the C kernel on CPU, Triton on CUDA or the reference itself, is decided
per call by `lorafit.quant.backend`. All give the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafit.errors import LorafitError
from lorafit.quant import backend as nf4_backend
from lorafit.quant.reference import (
    NF4_LEVELS,
    STATS_BLOCKSIZE,
    VALID_BLOCKSIZES,
    dequantize_blockwise_8bit,
    dynamic_map,
    quantize_blockwise_8bit,
)

__all__ = ["NF4_LEVELS", "STATS_BLOCKSIZE", "VALID_BLOCKSIZES", "NF4Tensor", "dequantize_blockwise_8bit",
           "dynamic_map", "quantize_blockwise_8bit", "quantize_nf4"]


@dataclass
class NF4Tensor:
    """A weight stored as packed NF4 codes plus its (optionally double-quantized) block statistics.

    packed:    (ceil(numel / 2),) uint8, two codes per byte, first element in the high nibble.
    absmax:    (n_blocks,) uint8 dynamic-map codes of `absmax - offset` when double-quantized,
               else (n_blocks,) fp32 block absmax values.
    state2:    (ceil(n_blocks / 256),) fp32 absmax of the centred statistics (double quant only).
    code2:     (256,) fp32 dynamic map used for the statistics (double quant only).
    offset:    0-dim fp32 mean of the block absmax values (double quant only).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    state2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.state2 is not None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def stats(self) -> dict[str, torch.Tensor | None]:
        """The statistics as the backend ops take them (keyword arguments)."""
        if self.double_quant:
            return {"qabsmax": self.absmax, "state2": self.state2, "code2": self.code2, "offset": self.offset}
        return {"absmax": self.absmax}

    def block_absmax(self) -> torch.Tensor:
        """(n_blocks,) fp32 absmax per block, decoding the double-quantized statistics if needed."""
        if not self.double_quant:
            return self.absmax.float()
        assert self.code2 is not None and self.offset is not None and self.state2 is not None
        return dequantize_blockwise_8bit(self.absmax, self.state2, self.code2) + self.offset

    def dequantize(self, dtype: torch.dtype = torch.float32, backend: str | None = None) -> torch.Tensor:
        """The weight as a dense `dtype` tensor of the original shape (computed in fp32, then cast)."""
        return nf4_backend.dequantize_4bit(self.packed, self.shape, self.blocksize, dtype, backend=backend,
                                           **self.stats())

    def matmul(self, x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        """x (..., in) @ W^T, W this (out, in) weight (fused on CUDA for a few tokens; see backend)."""
        return nf4_backend.nf4_matmul(x, self.packed, tuple(self.shape), self.blocksize, backend=backend,
                                      **self.stats())

    def storage_tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.packed, self.absmax, self.state2, self.code2, self.offset) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.storage_tensors())

    def to(self, device: torch.device | str) -> NF4Tensor:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return NF4Tensor(
            self.packed.to(device), self.absmax.to(device), self.shape, self.dtype, self.blocksize,
            move(self.state2), move(self.code2), move(self.offset),
        )


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                 backend: str | None = None) -> NF4Tensor:
    """Quantize `weight` (fp32/bf16/fp16, any shape) to NF4 on its own device; byte-identical to
    bitsandbytes' CPU code. backend: None follows `lorafit.quant.backend` (see there)."""
    if blocksize not in VALID_BLOCKSIZES:
        raise LorafitError(f"NF4 blocksize {blocksize} is not supported; use one of {VALID_BLOCKSIZES}")
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise LorafitError(f"NF4 quantization needs a float32/bfloat16/float16 tensor, got {weight.dtype}")
    if weight.numel() == 0:
        raise LorafitError(f"cannot NF4-quantize an empty tensor of shape {tuple(weight.shape)}")
    flat = weight.detach().reshape(-1).float()
    packed, absmax = nf4_backend.quantize_4bit(flat, blocksize, backend)
    out = NF4Tensor(packed=packed, absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize)
    if double_quant:
        offset = absmax.mean()
        out.absmax, out.state2 = nf4_backend.quantize_stats(absmax, offset, backend)
        out.code2 = dynamic_map(flat.device).clone()
        out.offset = offset
    return out
