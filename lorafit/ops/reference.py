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


def lora_rows(x: torch.Tensor, groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]) -> torch.Tensor:
    """Per-row adapters: each group (rows, A, B, scaling) adds its low-rank update to its rows only.

    One base matmul serves the whole batch elsewhere; this adds each row's own update, one pair of
    thin matmuls per adapter present (Punica's SGMV idea, grouped rather than gathered, so no
    adapter weight is copied per row). Rows in no group get zero.
    x: (B, ..., in); rows: (n,) long; A: (r, in); B: (out, r) -> (B, ..., out)
    """
    out_features = groups[0][2].shape[0] if groups else 0
    out = x.new_zeros(*x.shape[:-1], out_features)  # (B, ..., out)
    for rows, A, B, scaling in groups:
        out.index_copy_(0, rows, lora_delta(x.index_select(0, rows), A, B, scaling))
    return out


def dora_weight_norm(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """Row norms of `W + scaling * B @ A`: DoRA's denominator, one value per output feature.

    W: (out, in) -> (out,)
    """
    return torch.linalg.vector_norm(W + scaling * (B @ A), dim=1)
