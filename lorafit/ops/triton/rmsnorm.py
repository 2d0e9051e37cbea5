"""Fused RMSNorm forward and backward (Zhang & Sennrich 2019), generic over models.

For a row x (H,), weight w (H,) and `offset` (0 for Llama/Mistral/Qwen, 1 for Gemma's (1 + w)):

    rstd = 1 / sqrt(mean(x^2) + eps)
    x̂    = x * rstd                       (computed in fp32, rounded to x's dtype as HF does)
    y    = x̂ ⊙ (w + offset)               (stored in x's dtype)

Backward, with g = dL/dy and w' = w + offset (per row; H = row length):

    dL/dx = rstd * (g ⊙ w' - x̂ * mean(g ⊙ w' ⊙ x̂))
    dL/dw = Σ_rows g ⊙ x̂

One program per row in forward (keeps rstd, one fp32 per row, for backward). In backward each program
handles ROWS rows and writes its partial dL/dw to a (programs, H) fp32 buffer summed afterwards.
`triton` is imported lazily; under TRITON_INTERPRET=1 the kernels run on CPU tensors.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    # Own combine function instead of tl.sum (a @jit of triton's standard library): that one is bound
    # when triton is first imported, so it breaks under TRITON_INTERPRET=1 set later in the process.
    # It is bound as a module global on first use: kernels resolve names through their globals.
    global _add

    @triton.jit
    def _add(a, b):
        return a + b

    @triton.jit
    def rmsnorm_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, n_cols, stride, eps, offset, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.reduce(x * x, 0, _add) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
        xhat = (x * rstd).to(y_ptr.dtype.element_ty).to(tl.float32)
        tl.store(y_ptr + row * stride + cols, (xhat * w).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def rmsnorm_bwd(g_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, n_rows, n_cols, stride, offset,
                    ROWS: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        cmask = cols < n_cols
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32) + offset
        dw = tl.full((BLOCK,), 0.0, tl.float32)
        for i in range(ROWS):
            row = pid * ROWS + i
            mask = cols < tl.where(row < n_rows, n_cols, 0)  # a row past the end loads nothing
            x = tl.load(x_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row + cols * 0, mask=mask, other=0.0)  # (BLOCK,) copies of the row's rstd
            xhat = x * rstd
            gw = g * w
            dx = rstd * (gw - xhat * (tl.reduce(gw * xhat, 0, _add) / n_cols))
            tl.store(dx_ptr + row * stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dw += g * xhat
        tl.store(dw_ptr + pid * n_cols + cols, dw, mask=cmask)

    return triton, rmsnorm_fwd, rmsnorm_bwd


class RMSNormFunction(torch.autograd.Function):
    """y = x * rsqrt(mean(x^2) + eps) * (w + offset) over the last dim. See the module docstring."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
        triton, fwd, _ = _kernels()
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (rows, H)
        rows, h = x2.shape
        y = torch.empty_like(x2)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)  # (rows,)
        block = triton.next_power_of_2(h)
        fwd[(rows,)](x2, weight, y, rstd, h, x2.stride(0), float(eps), float(offset), BLOCK=block)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset, ctx.shape = float(offset), x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        triton, _, bwd = _kernels()
        x2, weight, rstd = ctx.saved_tensors
        rows, h = x2.shape
        g2 = g.reshape(-1, h).contiguous()
        dx = torch.empty_like(x2)
        per = 16 if rows >= 1024 else 4
        programs = triton.cdiv(rows, per)
        dw = torch.empty(programs, h, dtype=torch.float32, device=x2.device)  # partial sums
        bwd[(programs,)](g2, x2, weight, rstd, dx, dw, rows, h, x2.stride(0), ctx.offset,
                         ROWS=per, BLOCK=triton.next_power_of_2(h))
        return dx.view(ctx.shape), dw.sum(0).to(weight.dtype), None, None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    """Fused RMSNorm over the last dim (Triton)."""
    return RMSNormFunction.apply(x, weight, eps, offset)


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0) -> torch.Tensor:
    """The PyTorch reference (Llama's LlamaRMSNorm arithmetic, output in x's dtype)."""
    x32 = x.float()
    xhat = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (xhat.float() * (weight.float() + offset)).to(x.dtype)
