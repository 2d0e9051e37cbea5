"""Fused SwiGLU activation forward and backward (Shazeer 2020), generic over models.

For the gate a and up projection b of a gated MLP (same shape; e.g. Llama's act(gate_proj(x)) *
up_proj(x)), with σ the logistic sigmoid, everything in fp32 inside the kernel:

    y = silu(a) ⊙ b = a σ(a) ⊙ b

    dL/da = g ⊙ b ⊙ σ(a) (1 + a (1 - σ(a)))
    dL/db = g ⊙ a σ(a)

Nothing but a and b is saved; silu(a) is recomputed in backward, so the (..., I) activation is never
stored. Elementwise, BLOCK elements per program. `triton` is imported lazily; under
TRITON_INTERPRET=1 the kernels run on CPU tensors.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def swiglu_fwd(a_ptr, b_ptr, y_ptr, n, BLOCK: tl.constexpr):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < n
        a = tl.load(a_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        y = a / (1.0 + tl.exp(-a)) * b  # not tl.sigmoid: see rmsnorm.py on triton's standard library
        tl.store(y_ptr + idx, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def swiglu_bwd(g_ptr, a_ptr, b_ptr, da_ptr, db_ptr, n, BLOCK: tl.constexpr):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < n
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        s = 1.0 / (1.0 + tl.exp(-a))
        da = g * b * s * (1.0 + a * (1.0 - s))
        db = g * a * s
        tl.store(da_ptr + idx, da.to(da_ptr.dtype.element_ty), mask=mask)
        tl.store(db_ptr + idx, db.to(db_ptr.dtype.element_ty), mask=mask)

    return triton, swiglu_fwd, swiglu_bwd


BLOCK = 1024


class SwiGLUFunction(torch.autograd.Function):
    """y = silu(a) * b elementwise. See the module docstring for the gradients."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        triton, fwd, _ = _kernels()
        a, b = a.contiguous(), b.contiguous()
        y = torch.empty_like(a)
        n = a.numel()
        fwd[(triton.cdiv(n, BLOCK),)](a, b, y, n, BLOCK=BLOCK)
        ctx.save_for_backward(a, b)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        triton, _, bwd = _kernels()
        a, b = ctx.saved_tensors
        g = g.contiguous()
        da, db = torch.empty_like(a), torch.empty_like(b)
        n = a.numel()
        bwd[(triton.cdiv(n, BLOCK),)](g, a, b, da, db, n, BLOCK=BLOCK)
        return da, db


def swiglu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """silu(a) * b with a fused Triton forward and backward."""
    return SwiGLUFunction.apply(a, b)


def swiglu_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The PyTorch reference, in fp32 then cast to a's dtype."""
    return (torch.nn.functional.silu(a.float()) * b.float()).to(a.dtype)
