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

The same arithmetic as the reference dequantization followed by `F.linear`, which is what it is
tested against. The kernel takes plain tensors; `lorafit.quant.backend.nf4_matmul` chooses it (CUDA,
at most SMALL_M tokens) and `lorafit.quant.linear` gives it its backward (dL/dx = g W, W dequantized
again). `triton` is imported lazily on first call; under TRITON_INTERPRET=1 it runs on CPU tensors.
"""

from __future__ import annotations

import functools
import os

import torch

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


def nf4_matmul_triton(x: torch.Tensor, packed: torch.Tensor, shape: tuple[int, int], blocksize: int,
                      levels: torch.Tensor, *, absmax: torch.Tensor | None = None,
                      qabsmax: torch.Tensor | None = None, state2: torch.Tensor | None = None,
                      code2: torch.Tensor | None = None, offset: float = 0.0, stats_blocksize: int = 256,
                      block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """x (..., K) @ W^T for the NF4 weight W of `shape` (N, K), statistics as in `dequantize_4bit_triton`:
    the fused kernel, any M (it pays for M <= SMALL_M)."""
    triton, kernel = _kernel()
    n, k = shape
    x2 = x.reshape(-1, k).contiguous()  # (M, K)
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)  # (M, N)
    block_m = 16 if m <= 16 else 32
    double = qabsmax is not None
    stats = qabsmax if double else absmax
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    kernel[grid](x2, packed, stats, state2 if double else stats, code2 if double else stats, levels,
                 float(offset), out, m, n, k, x2.stride(0), out.stride(0),
                 blocksize=blocksize, stats_blocksize=stats_blocksize, DOUBLE=double,
                 PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                 DOT_FP32=interpret, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out.view(*x.shape[:-1], n)
