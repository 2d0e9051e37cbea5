"""SwiGLU activation a = silu(g) * u for autograd, keeping only g and u for backward (Shazeer 2020).

With s = sigmoid(g):

    dL/dg = dL/da * u * s * (1 + g (1 - s))
    dL/du = dL/da * g * s

silu(g) is recomputed in backward instead of stored, so a gated MLP keeps two (tokens x intermediate)
tensors for its activation rather than three. On CUDA with triton importable the same Function runs as
one Triton kernel each way (`lorafit.ops.triton.swiglu`); elsewhere as the PyTorch ops below, whose
forward is exactly the plain MLP's `F.silu(g) * u`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorafit.device import triton_available


class SwiGLUFunction(torch.autograd.Function):
    """a = silu(g) * u, saving only g and u (gradients in the module docstring)."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(g, u)
        return F.silu(g) * u  # the same two ops as the plain MLP: identical forward numbers

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g, u = ctx.saved_tensors
        s = torch.sigmoid(g)
        silu = g * s
        grad_u = grad * silu if ctx.needs_input_grad[1] else None
        grad_g = None
        if ctx.needs_input_grad[0]:
            grad_g = (grad * u).mul_(s).mul_(silu.neg_().add_(g).add_(1.0))  # 1 + g - g s = 1 + g (1 - s)
        return grad_g, grad_u


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u for autograd, keeping only g and u (the Triton kernel on CUDA when available)."""
    if g.is_cuda and triton_available():
        from lorafit.ops.triton.swiglu import swiglu as swiglu_triton

        return swiglu_triton(g, u)
    return SwiGLUFunction.apply(g, u)
