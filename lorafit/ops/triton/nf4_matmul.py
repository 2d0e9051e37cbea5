"""Fused NF4 dequantize-and-matmul for small token counts (generation): y = x @ dequant(W)^T (+ b).

For M (tokens) small, a linear layer on an NF4 weight is bound by reading W; dequantizing W to a dense
buffer first reads 0.5 B/weight, writes 2 B/weight and reads them back. Here each program owns a tile
of BLOCK_N output features and loops over K in BLOCK_K steps: it reads the packed bytes of its
(BLOCK_N, BLOCK_K) tile of W, decodes them in registers and multiplies with the (BLOCK_M, BLOCK_K) tile
of x, so W is read once, at 0.5 B/weight plus its statistics, and never written.

Decoding element W[n, k] (flat index i = n K + k, row-major as stored):

    code    = (packed[i // 2] >> 4) if i even else (packed[i // 2] & 15)
    absmax  = code2[qabsmax[i // bs]] * state2[(i // bs) // 256] + offset     (double quant)
            = absmax[i // bs]                                                  (plain fp32 statistics)
    W[n, k] = NF4_LEVELS[code] * absmax

    y[m, n] = Σ_k x[m, k] W[n, k]   (fp32 accumulation; W cast to x's dtype before the product)

The same arithmetic as `lorafit.quant.nf4.NF4Tensor.dequantize` followed by `F.linear`, which is the
reference. `NF4MatmulFunction` adds the backward dL/dx = g W (W dequantized again; W is frozen).
`triton` is imported lazily on first call; under TRITON_INTERPRET=1 the kernel runs on CPU tensors.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from lorafit.quant.nf4 import STATS_BLOCKSIZE, NF4Tensor, _nf4_levels

SMALL_M = 16  # above this many tokens, dequantize once and use the dense matmul


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def nf4_matmul_kernel(x_ptr, packed_ptr, absmax_ptr, state2_ptr, code2_ptr, levels_ptr, offset, out_ptr,
                          M, N, K, stride_xm, stride_om,
                          blocksize: tl.constexpr, stats_blocksize: tl.constexpr, DOUBLE: tl.constexpr,
                          PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,) output features
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,) tokens
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)  # (BK,)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :],
                        mask=(rm < M)[:, None] & (rk < K)[None, :], other=0.0)  # (BM, BK)
            idx = rn[None, :].to(tl.int64) * K + rk[:, None]  # (BK, BN) flat index of W[n, k]
            wmask = (rn < N)[None, :] & (rk < K)[:, None]
            byte = tl.load(packed_ptr + idx // 2, mask=wmask, other=0).to(tl.int32)
            code = tl.where(idx % 2 == 0, byte >> 4, byte & 15)
            level = tl.load(levels_ptr + code, mask=wmask, other=0.0)
            block = idx // blocksize
            if DOUBLE:
                q = tl.load(absmax_ptr + block, mask=wmask, other=0).to(tl.int32)
                scale = tl.load(code2_ptr + q, mask=wmask, other=0.0) * tl.load(
                    state2_ptr + block // stats_blocksize, mask=wmask, other=0.0) + offset
            else:
                scale = tl.load(absmax_ptr + block, mask=wmask, other=0.0)
            w = (level * scale).to(x.dtype)  # (BK, BN) = W^T tile, rounded to x's dtype as the reference
            if DOT_FP32:  # the interpreter's dot mishandles 16-bit floats: same rounded values, fp32 product
                acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(x, w, input_precision=PRECISION)
        out = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], out, mask=(rm < M)[:, None] & (rn < N)[None, :])

    return triton, nf4_matmul_kernel


def nf4_matmul_triton(x: torch.Tensor, t: NF4Tensor, block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """x (..., K) @ dequant(t)^T with t of shape (N, K): the fused kernel, any M (best for M <= 16)."""
    triton, kernel = _kernel()
    n, k = t.shape
    x2 = x.reshape(-1, k).contiguous()  # (M, K)
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)  # (M, N)
    block_m = 16 if m <= 16 else 32
    double = t.double_quant
    state2 = t.state2 if double else t.absmax
    code2 = t.code2 if double else t.absmax
    offset = float(t.offset) if double else 0.0
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    kernel[grid](x2, t.packed, t.absmax, state2, code2, _nf4_levels(x.device), offset, out,
                 m, n, k, x2.stride(0), out.stride(0),
                 blocksize=t.blocksize, stats_blocksize=STATS_BLOCKSIZE, DOUBLE=double,
                 PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                 DOT_FP32=os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                 BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out.view(*x.shape[:-1], n)


def nf4_matmul_reference(x: torch.Tensor, t: NF4Tensor) -> torch.Tensor:
    """The PyTorch reference: dequantize, then a dense matmul."""
    return F.linear(x, t.dequantize(x.dtype))


class NF4MatmulFunction(torch.autograd.Function):
    """y = x W^T with W an NF4 weight (frozen). Backward: dL/dx = g W, W dequantized again, not saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, t: NF4Tensor) -> torch.Tensor:
        ctx.t = t
        return nf4_matmul_triton(x, t)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        from lorafit.ops.triton.nf4_dequant import dequantize_nf4_triton

        t = ctx.t
        W = dequantize_nf4_triton(t, g.dtype) if t.double_quant else t.dequantize(g.dtype)  # (N, K)
        return g @ W, None


def nf4_linear(x: torch.Tensor, t: NF4Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ dequant(t)^T + bias: the fused kernel for at most SMALL_M tokens on CUDA, else the reference."""
    tokens = x.numel() // x.shape[-1]
    if x.is_cuda and tokens <= SMALL_M:
        y = NF4MatmulFunction.apply(x, t)
    else:
        y = nf4_matmul_reference(x, t)
    return y if bias is None else y + bias.to(y.dtype)
