"""AdaLoRA's SVD-form adapter layer and its orthogonality regularizer (Zhang et al. 2023, "AdaLoRA:
Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning", ICLR; arXiv:2303.10512).

    y = base(x) + dropout(x) @ (Q ⊙ λ)ᵀ @ Pᵀ · alpha / (init_r + 1e-5)

    Q = lora_A: (r, in)    right singular vectors     λ = lora_E: (r, 1)  singular values (start at 0)
    P = lora_B: (out, r)   left singular vectors      both start N(0, 0.02²)

The allocator (lorafit.lora.allocator) prunes a triplet (Pᵢ, λᵢ, Qᵢ) by zeroing λᵢ; P and Q are kept
near-orthogonal by the regularizer R = mean over matrices of ||QQᵀ - I||_F and ||PᵀP - I||_F, added
to the loss with weight orth_reg_weight. The divisor stays init_r (PEFT's `ranknum`) also after a
saved adapter drops its pruned triplets, so a file with fewer triplets computes the same update.
The base is any kind lorafit.lora.base knows (Linear, GPT-2's Conv1D, NF4/ternary); PEFT's SVDLinear
is the reference for the numbers.
"""

from __future__ import annotations

import torch
from torch import nn

from lorafit.lora.base import adapter_placement, base_dims, dense_weight, is_linear, write_weight

RANKNUM_EPS = 1e-5  # PEFT's guard in alpha / (ranknum + eps); kept so the numbers match to the bit


class SVDLayer(nn.Module):
    """A frozen base layer with named AdaLoRA adapters (P, λ, Q); see the module docstring."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if not is_linear(base_layer):
            raise TypeError(f"AdaLoRA adapts linear layers; {type(base_layer).__name__} is not one")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_dims(base_layer)
        self.lora_A = nn.ParameterDict()  # name -> Q (r, in)
        self.lora_E = nn.ParameterDict()  # name -> λ (r, 1)
        self.lora_B = nn.ParameterDict()  # name -> P (out, r)
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}  # alpha / (init_r + eps)
        self.active: list[str] = []
        self.merged: dict[str, None] = {}
        self.disabled = False

    def add(self, name: str, r: int, init_r: int, alpha: float, dropout: float = 0.0, init: bool = True) -> None:
        """Adapter `name` with r triplets (init_r while training; fewer when loaded after pruning)."""
        device, dtype = adapter_placement(self.base_layer)
        A = torch.zeros(r, self.in_features, device=device, dtype=dtype)
        B = torch.zeros(self.out_features, r, device=device, dtype=dtype)
        if init:  # PEFT's init: P, Q ~ N(0, 0.02²), λ = 0 (the model is unchanged at step 0)
            A.normal_(0.0, 0.02)
            B.normal_(0.0, 0.02)
        self.lora_A[name] = nn.Parameter(A)
        self.lora_E[name] = nn.Parameter(torch.zeros(r, 1, device=device, dtype=dtype))
        self.lora_B[name] = nn.Parameter(B)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = alpha / (init_r + RANKNUM_EPS)

    def remove(self, name: str) -> None:
        if name in self.merged:
            self.unmerge([name])
        for store in (self.lora_A, self.lora_E, self.lora_B, self.lora_dropout):
            if name in store:
                del store[name]
        self.scaling.pop(name, None)
        self.active = [a for a in self.active if a != name]

    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def adapter_params(self, name: str) -> list[nn.Parameter]:
        return [self.lora_A[name], self.lora_E[name], self.lora_B[name]]

    def delta_weight(self, name: str) -> torch.Tensor:
        """P (Q ⊙ λ) · scaling as a dense (out, in) matrix, fp32."""
        A, E, B = (t.detach().float() for t in (self.lora_A[name], self.lora_E[name], self.lora_B[name]))
        return (B @ (A * E)) * self.scaling[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.disabled:
            return y
        for name in self.active:
            if name in self.merged or name not in self.lora_A:
                continue
            A, E, B = self.lora_A[name], self.lora_E[name], self.lora_B[name]
            h = self.lora_dropout[name](x.to(A.dtype))
            y = y + ((h @ (A * E).T @ B.T) * self.scaling[name]).to(y.dtype)
        return y

    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        for name in names if names is not None else self.active:
            if name in self.merged or name not in self.lora_A:
                continue
            write_weight(self.base_layer, dense_weight(self.base_layer, torch.float32) + self.delta_weight(name))
            self.merged[name] = None

    @torch.no_grad()
    def unmerge(self, names: list[str] | None = None) -> None:
        for name in reversed(list(self.merged)):
            if names is not None and name not in names:
                continue
            del self.merged[name]
            write_weight(self.base_layer, dense_weight(self.base_layer, torch.float32) - self.delta_weight(name))

    def extra_repr(self) -> str:
        ranks = {n: a.shape[0] for n, a in self.lora_A.items()}
        return f"in={self.in_features}, out={self.out_features}, adapters={ranks}, active={self.active}"


def orthogonality_regularizer(model: nn.Module, adapter: str) -> torch.Tensor | None:
    """R = mean over the adapter's Q and P matrices of ||QQᵀ - I||_F and ||PᵀP - I||_F (paper eq. 4),
    differentiable; None when the model holds no AdaLoRA layer of that adapter."""
    terms = []
    for module in model.modules():
        if isinstance(module, SVDLayer) and adapter in module.lora_A:
            Q, P = module.lora_A[adapter], module.lora_B[adapter]
            for cov in (Q @ Q.T, P.T @ P):  # (r, r)
                eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
                terms.append(torch.linalg.matrix_norm(cov - eye, ord="fro"))
    return torch.stack(terms).mean() if terms else None
