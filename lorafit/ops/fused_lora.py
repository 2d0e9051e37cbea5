"""A LoRA / QLoRA / DoRA linear layer as one autograd Function: base product, low-rank path and bias.

Notation (all per token; `...` are the leading dims, flattened to N tokens in the formulas):

    x (N, in)      input                      W (out, in)  frozen base weight (dense, or NF4 dequantized)
    A (r, in)      LoRA down                  B (out, r)   LoRA up              s  scaling (alpha / r)
    D (N, in)      dropout keep-mask / (1-p)  h = x ⊙ D    dropped input (h = x when p = 0)
    v = s h A^T    (N, r) the thin intermediate              b (out,)  bias (frozen or trainable)

LoRA forward                      y = x W^T + v B^T + b

LoRA backward, g = dL/dy (N, out); gv = g B (N, r) is formed once and reused:

    dL/dB = g^T v                                (out, r)
    dL/dA = s gv^T h                             (r, in)
    dL/dx = g W + D ⊙ (s gv A)                   (N, in)   (one (N, in) sum when p = 0)
    dL/db = Σ_N g                                (out,)

Five matmuls in backward (g W, g^T v, g B, gv^T h, gv A), two of them thin in r; the r-wide
intermediate v comes from forward, so h A^T is not recomputed. W is never saved: a dense base weight is
a frozen parameter that is referenced anyway, and an NF4 weight is dequantized again in backward
(`weight(dtype)` is called once in forward and once in backward). Saved for backward: x in its own
dtype (not the fp32 copy the low-rank path computes with), the boolean dropout mask when p > 0, v,
and for DoRA the (N, out) pre-scale output z below and the (out,) factor.

DoRA (Liu et al. 2024) rescales each output row by f = m / ||W + s B A||_row with the norm treated as a
constant (it is computed without gradient, exactly as `LoraLayer._dora` does):

    p = 0:   y = f ⊙ z + b,                     z = x W^T + v B^T
    p > 0:   y = x W^T + b + (f - 1) ⊙ (h W^T) + f ⊙ (v B^T),  z = h W^T + v B^T
             (the base output sees the full input, the DoRA correction the dropped one, as in PEFT)

    dL/dm = Σ_N (g ⊙ z) / ||W + s B A||_row
    with g' = f ⊙ g the LoRA grads above use g' for A and B, and
    p = 0:   dL/dx = g' W + s (g' B) A
    p > 0:   dL/dx = g W + D ⊙ ( ((f - 1) ⊙ g) W + s (g' B) A )

Numerics: the base product runs in x's dtype. The low-rank path runs in `compute_dtype`: by default
the adapter dtype (fp32 master weights), as the module path does, so results match it; a caller may
pass x's 16-bit dtype instead (`LoraLayer` does on CUDA), and then A and B are cast once per call, the
thin matmuls run on the tensor cores and the gradients of A and B are returned in fp32. DoRA's norm
always uses the fp32 weight. The Function takes plain tensors only (the weight, or a callable that
dequantizes it); which layers may use it is the LoRA layer's decision (`lorafit.lora.layer`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

WeightFn = Callable[[torch.dtype], torch.Tensor]


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class FusedLoraFunction(torch.autograd.Function):
    """y = base(x) + s dropout(x) A^T B^T + b (optionally DoRA-rescaled). See the module docstring."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, magnitude: torch.Tensor | None,
                bias: torch.Tensor | None, weight: torch.Tensor | None, weight_fn: WeightFn | None,
                scaling: float, mask: torch.Tensor | None, keep: float,
                compute_dtype: torch.dtype | None) -> torch.Tensor:
        lora_dtype = compute_dtype or A.dtype
        dora = magnitude is not None
        # DoRA needs the fp32 (adapter-dtype) weight for its norm; the base matmul reuses it, cast.
        W_full = _weight(weight, weight_fn, A.dtype if dora else x.dtype)  # (out, in)
        Ac, Bc = A.to(lora_dtype), B.to(lora_dtype)  # no copies when lora_dtype is A's
        h = x.to(lora_dtype)  # (..., in)
        if mask is not None:
            h = h * mask.to(lora_dtype) / keep
        v = (h @ Ac.t()) * scaling  # (..., r)
        lora_out = (v @ Bc.t()).to(x.dtype)  # (..., out)
        W = W_full.to(x.dtype)
        b = None if bias is None else bias.to(x.dtype)
        factor = z = None
        if not dora:
            # bias first, as the module path adds it (fused into the matmul for a dense base): same rounding
            y = F.linear(x, W, b) if weight is not None or b is None else F.linear(x, W) + b  # (..., out)
            y = y.add_(lora_out)
        else:
            base = F.linear(x, W)  # (..., out)
            with torch.no_grad():
                norm = torch.linalg.vector_norm(W_full + scaling * (B @ A), dim=1)  # (out,)
            factor = (magnitude / norm).to(x.dtype)  # (out,)
            if mask is None:
                z = base + lora_out  # (..., out)
                y = z * factor
            else:
                dropped = F.linear(h.to(W_full.dtype), W_full).to(x.dtype)  # (..., out) W h, fp32 as in _dora
                z = dropped + lora_out
                y = base + (factor - 1) * dropped + factor * lora_out
            ctx.norm = norm
            if b is not None:
                y = y + b
        ctx.scaling, ctx.keep, ctx.weight_fn, ctx.lora_dtype = scaling, keep, weight_fn, lora_dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, A, B, v, mask, weight, factor, z)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, A, B, v, mask, weight, factor, z = ctx.saved_tensors
        s, keep = ctx.scaling, ctx.keep
        need_x, need_A, need_B, need_m, need_b = ctx.needs_input_grad[:5]
        lora_dtype = ctx.lora_dtype
        A32, B32 = A, B  # the master weights: their gradients are returned in their dtype
        A, B = A.to(lora_dtype), B.to(lora_dtype)
        gx = gA = gB = gm = gb = None
        if need_b:
            gb = _flat(g).sum(0).to(ctx.bias_dtype)  # (out,)
        if need_m:
            gm = (_flat(g * z).sum(0).to(A32.dtype)) / ctx.norm  # (out,)
        g_lora = g if factor is None else g * factor  # (..., out) g' = f ⊙ g
        g32 = g_lora.to(lora_dtype)
        gv = g32 @ B  # (..., r)
        if need_B:
            gB = (_flat(g32).t() @ _flat(v)).to(B32.dtype)  # (out, r)
        if need_A or need_x:
            h = x.to(lora_dtype)
            if mask is not None:
                h = h * mask.to(lora_dtype) / keep
        if need_A:
            gA = (_flat(gv * s).t() @ _flat(h)).to(A32.dtype)  # (r, in)
        if need_x:
            # (out, in), recomputed; DoRA's dropped-input path runs in fp32 (as in forward)
            W_full = _weight(weight, ctx.weight_fn, A32.dtype if factor is not None else g.dtype)
            W = W_full.to(g.dtype)
            gh = (gv * s) @ A  # (..., in)
            if mask is None:
                gx = (g_lora @ W).add_(gh.to(g.dtype))
            else:
                inner = gh if factor is None else gh.to(W_full.dtype) + ((factor - 1) * g).to(W_full.dtype) @ W_full
                inner = inner * mask.to(inner.dtype) / keep
                gx = (g @ W).add_(inner.to(g.dtype))
        return gx, gA, gB, gm, gb, None, None, None, None, None, None


def _weight(weight: torch.Tensor | None, weight_fn: WeightFn | None, dtype: torch.dtype) -> torch.Tensor:
    if weight is not None:
        return weight.to(dtype)
    assert weight_fn is not None
    return weight_fn(dtype)


def fused_lora_linear(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, *,
                      weight: torch.Tensor | None = None, weight_fn: WeightFn | None = None,
                      bias: torch.Tensor | None = None, magnitude: torch.Tensor | None = None,
                      dropout: float = 0.0, training: bool = True, mask: torch.Tensor | None = None,
                      compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """LoRA/DoRA linear on plain tensors, one autograd node (see the module docstring for the math).

    x (..., in); A (r, in); B (out, r); weight (out, in) frozen dense base weight, or weight_fn(dtype)
    returning it (e.g. an NF4 dequantizer: called in forward and again in backward); bias (out,) frozen
    or trainable; magnitude (out,) turns on DoRA. Dropout with probability `dropout` applies to the
    low-rank input when `training`; `mask` (bool, shape of x) fixes the keep-mask instead of drawing it
    (as `torch.empty_like(x).bernoulli_(1 - p)`, the draw nn.Dropout makes on CPU). compute_dtype:
    the low-rank path's dtype (default A's; see the module docstring).
    """
    if (weight is None) == (weight_fn is None):
        raise ValueError("pass exactly one of weight= or weight_fn=")
    keep = 1.0
    if mask is not None:
        keep = 1.0 - dropout
        mask = mask.to(torch.bool)
    elif dropout > 0 and training:
        keep = 1.0 - dropout
        mask = torch.empty(x.shape, dtype=A.dtype, device=x.device).bernoulli_(keep).to(torch.bool)
    if weight is not None:
        weight = weight.detach()
    return FusedLoraFunction.apply(x, A, B, magnitude, bias, weight, weight_fn, float(scaling), mask, keep,
                                   compute_dtype)
