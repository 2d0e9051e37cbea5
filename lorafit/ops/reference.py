"""Pure-PyTorch reference ops: the source of truth every fast kernel is tested against.

Kernels take plain tensors (no modules), so a Triton or fused autograd version can be swapped in
behind the same signature and compared op for op.
"""

from __future__ import annotations

import torch


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The low-rank update `scaling * x @ A^T @ B^T`, in two thin matmuls (never forms B @ A).

    The scaling is applied to the thin (..., r) intermediate, not the wide (..., out) result.
    x: (..., in), A: (r, in), B: (out, r) -> (..., out)
    """
    return ((x @ A.t()) * scaling) @ B.t()  # (..., r) -> (..., out)


def lora_rows(
    x: torch.Tensor, A_stack: torch.Tensor, B_stack: torch.Tensor, scale: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """Per-row adapters: row b of the batch uses adapter `index[b]` (Punica's SGMV idea, gathered).

    One base matmul serves the whole batch elsewhere; this adds each row's own low-rank update.
    x: (B, T, in); A_stack: (n, r, in); B_stack: (n, out, r); scale: (n,); index: (B,) long.
    Ranks below r are zero-padded, and a row with no adapter points at an all-zero slot, so both
    cost a little compute but need no branching.
    """
    A = A_stack[index]  # (B, r, in)
    B = B_stack[index]  # (B, out, r)
    h = torch.bmm(x, A.transpose(1, 2))  # (B, T, r)
    y = torch.bmm(h, B.transpose(1, 2))  # (B, T, out)
    return y * scale[index].view(-1, 1, 1).to(y.dtype)


def dora_weight_norm(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """Row norms of `W + scaling * B @ A`: DoRA's denominator, one value per output feature.

    W: (out, in) -> (out,)
    """
    return torch.linalg.vector_norm(W + scaling * (B @ A), dim=1)
