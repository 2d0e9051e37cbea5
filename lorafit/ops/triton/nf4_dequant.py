"""Triton kernel for NF4 dequantization with double-quantized statistics (QLoRA, Dettmers et al. 2023).

One program handles BLOCK output elements: it reads the packed byte of each element (high nibble first),
looks the level up in the 16-entry NF4 table, decodes the element's block absmax from its 8-bit code
(code2[absmax_q[block]] * state2[block // 256] + offset) and writes level * absmax. The arithmetic is
the same as `lorafit.quant.nf4.NF4Tensor.dequantize`, which is the reference. `triton` is imported
lazily inside `dequantize_nf4_triton`, so importing this module never requires it; under
TRITON_INTERPRET=1 it also runs on CPU tensors.
"""

from __future__ import annotations

import functools

import torch

from lorafit.quant.nf4 import STATS_BLOCKSIZE, NF4Tensor, _nf4_levels


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def nf4_dequant_kernel(packed_ptr, qabsmax_ptr, state2_ptr, code2_ptr, levels_ptr, offset, out_ptr,
                           n, blocksize: tl.constexpr, stats_blocksize: tl.constexpr, BLOCK: tl.constexpr):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < n
        byte = tl.load(packed_ptr + idx // 2, mask=mask, other=0).to(tl.int32)
        nibble = tl.where(idx % 2 == 0, byte >> 4, byte & 15)
        level = tl.load(levels_ptr + nibble, mask=mask, other=0.0)
        block = idx // blocksize
        qa = tl.load(qabsmax_ptr + block, mask=mask, other=0).to(tl.int32)
        absmax = tl.load(code2_ptr + qa, mask=mask, other=0.0) * tl.load(
            state2_ptr + block // stats_blocksize, mask=mask, other=0.0) + offset
        tl.store(out_ptr + idx, level * absmax, mask=mask)

    return triton, nf4_dequant_kernel


def dequantize_nf4_triton(t: NF4Tensor, dtype: torch.dtype = torch.float32, block: int = 1024) -> torch.Tensor:
    """Dense `dtype` weight of `t` (double-quantized NF4) computed by the Triton kernel."""
    if not t.double_quant:
        raise ValueError("the Triton NF4 kernel expects double-quantized statistics")
    assert t.state2 is not None and t.code2 is not None and t.offset is not None
    triton, kernel = _kernel()
    n = t.numel
    out = torch.empty(n, dtype=torch.float32, device=t.packed.device)
    grid = (triton.cdiv(n, block),)
    kernel[grid](t.packed, t.absmax, t.state2, t.code2, _nf4_levels(t.packed.device), float(t.offset), out,
                 n, blocksize=t.blocksize, stats_blocksize=STATS_BLOCKSIZE, BLOCK=block)
    return out.view(t.shape).to(dtype)
