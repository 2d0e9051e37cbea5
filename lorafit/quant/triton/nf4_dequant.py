"""Triton kernels for NF4 dequantization (QLoRA, Dettmers et al. 2023), plain or double-quantized statistics.

Two layouts of the same arithmetic; which one is faster is a question for the GPU, so the GPU check
(bench/gpu_train.py) times both and `LAYOUT` names the default:

* "elements": one program writes BLOCK consecutive outputs; element i reads byte i // 2 (two
  neighbouring threads read the same byte: one coalesced load) and its block's statistics.
* "bytes": one program reads BLOCK bytes once each, decodes both nibbles, and writes the 2 * BLOCK
  outputs interleaved in registers (a layout conversion the compiler must make).

For byte j (elements 2j and 2j + 1; block sizes are even, so both lie in the same block):

    b       = (2 j) // blocksize                                   the block
    absmax  = code2[qabsmax[b]] * state2[b // 256] + offset        (double quant)
            = absmax[b]                                            (plain fp32 statistics)
    out[2j]     = LEVELS[packed[j] >> 4] * absmax                  (fp32, then cast to the output dtype)
    out[2j + 1] = LEVELS[packed[j] & 15] * absmax

Either way the kernel moves 0.5 B/element in and 2 B/element (bf16) out, writing the output dtype
directly (no fp32 buffer, no second pass). The arithmetic and
its order are the reference's (`lorafit.quant.reference.dequantize_4bit` after
`dequantize_blockwise_8bit`), and multiply-add fusion is switched off, so the result is bit-identical.
The kernel takes plain tensors; `triton` is imported on first call, and under TRITON_INTERPRET=1 the
kernel runs on CPU tensors.
"""

from __future__ import annotations

import functools

import torch

BLOCK_BYTES = 1024  # "bytes": packed bytes per program (2048 outputs, 4 KiB of bf16)
BLOCK_ELEMENTS = 2048  # "elements": outputs per program
LAYOUT = "elements"


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def nf4_dequant_elements(packed_ptr, absmax_ptr, state2_ptr, code2_ptr, levels_ptr, offset, out_ptr,
                             n, blocksize: tl.constexpr, stats_blocksize: tl.constexpr,
                             DOUBLE: tl.constexpr, BLOCK: tl.constexpr):
        idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) output elements
        mask = idx < n
        byte = tl.load(packed_ptr + idx // 2, mask=mask, other=0).to(tl.int32)
        code = tl.where(idx % 2 == 0, byte >> 4, byte & 15)
        block = idx // blocksize
        if DOUBLE:
            q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + q, mask=mask, other=0.0) * tl.load(
                state2_ptr + block // stats_blocksize, mask=mask, other=0.0) + offset
        else:
            scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        values = tl.load(levels_ptr + code) * scale
        tl.store(out_ptr + idx, values.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def nf4_dequant_bytes(packed_ptr, absmax_ptr, state2_ptr, code2_ptr, levels_ptr, offset, out_ptr,
                           n, n_bytes, blocksize: tl.constexpr, stats_blocksize: tl.constexpr,
                           DOUBLE: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        j = pid * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) byte indices
        mask = j < n_bytes
        byte = tl.load(packed_ptr + j, mask=mask, other=0).to(tl.int32)
        block = (2 * j) // blocksize
        if DOUBLE:
            q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + q, mask=mask, other=0.0) * tl.load(
                state2_ptr + block // stats_blocksize, mask=mask, other=0.0) + offset
        else:
            scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        hi = tl.load(levels_ptr + (byte >> 4)) * scale
        lo = tl.load(levels_ptr + (byte & 15)) * scale
        # (BLOCK, 2) -> (2 BLOCK,): elements 2j, 2j + 1, ... (tl.interleave is a jit function of triton's
        # standard library, which breaks when TRITON_INTERPRET is set after triton was imported)
        values = tl.reshape(tl.join(hi, lo), (2 * BLOCK,))
        idx = pid * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
        tl.store(out_ptr + idx, values.to(out_ptr.dtype.element_ty), mask=idx < n)

    return triton, {"elements": nf4_dequant_elements, "bytes": nf4_dequant_bytes}


def dequantize_4bit_triton(packed: torch.Tensor, shape: torch.Size | tuple[int, ...], blocksize: int,
                           dtype: torch.dtype, levels: torch.Tensor, *, absmax: torch.Tensor | None = None,
                           qabsmax: torch.Tensor | None = None, state2: torch.Tensor | None = None,
                           code2: torch.Tensor | None = None, offset: float = 0.0,
                           stats_blocksize: int = 256, layout: str | None = None) -> torch.Tensor:
    """Dense `dtype` tensor of `shape` from packed NF4 codes and either fp32 `absmax` or the
    double-quantized (`qabsmax` uint8, `state2` fp32, `code2` (256,) fp32, `offset`) statistics.

    `levels` is the (16,) fp32 NF4 table on the same device. Every tensor must be contiguous.
    layout: "elements" or "bytes" (see the module docstring); default `LAYOUT`."""
    triton, kernels = _kernels()
    layout = layout or LAYOUT
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    n = out.numel()
    double = qabsmax is not None
    stats = qabsmax if double else absmax
    args = (packed, stats, state2 if double else stats, code2 if double else stats, levels, float(offset), out)
    consts = dict(blocksize=blocksize, stats_blocksize=stats_blocksize, DOUBLE=double, **launch_options())
    if layout == "elements":
        kernels["elements"][(triton.cdiv(n, BLOCK_ELEMENTS),)](*args, n, BLOCK=BLOCK_ELEMENTS, **consts)
    else:
        n_bytes = (n + 1) // 2
        kernels["bytes"][(triton.cdiv(n_bytes, BLOCK_BYTES),)](*args, n, n_bytes, BLOCK=BLOCK_BYTES, **consts)
    return out


def launch_options() -> dict:
    """No multiply-add fusion: the reference rounds the product and the sum separately. (The
    interpreter runs numpy, which never fuses, and takes no compiler options.)"""
    import os

    return {} if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") else {"enable_fp_fusion": False}
