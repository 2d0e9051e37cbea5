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

Numerics follow the module path: the base product runs in x's dtype, the low-rank path in the adapter
dtype (fp32 when A is fp32) and is cast back, so bf16 results match the module path to bf16 rounding.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.ops.triton import available as triton_available

# Route LoraLayer's plain path (one active LoRA/DoRA adapter on a Linear / NF4 base) through
# `FusedLoraFunction`. Off by default; LORAFIT_FUSED=1 or `set_enabled(True)` turns it on.
ENABLED: bool = os.environ.get("LORAFIT_FUSED", "0") not in ("", "0")

WeightFn = Callable[[torch.dtype], torch.Tensor]


def set_enabled(flag: bool) -> bool:
    """Turn the fused path on or off for every LoraLayer; returns the previous setting."""
    global ENABLED
    previous, ENABLED = ENABLED, bool(flag)
    return previous


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class FusedLoraFunction(torch.autograd.Function):
    """y = base(x) + s dropout(x) A^T B^T + b (optionally DoRA-rescaled). See the module docstring."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, magnitude: torch.Tensor | None,
                bias: torch.Tensor | None, weight: torch.Tensor | None, weight_fn: WeightFn | None,
                scaling: float, mask: torch.Tensor | None, keep: float) -> torch.Tensor:
        lora_dtype = A.dtype
        dora = magnitude is not None
        # DoRA needs the fp32 (adapter-dtype) weight for its norm; the base matmul reuses it, cast.
        W_full = _weight(weight, weight_fn, lora_dtype if dora else x.dtype)  # (out, in)
        h = x.to(lora_dtype)  # (..., in)
        if mask is not None:
            h = h * mask.to(lora_dtype) / keep
        v = (h @ A.t()) * scaling  # (..., r)
        lora_out = (v @ B.t()).to(x.dtype)  # (..., out)
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
                dropped = F.linear(h, W_full).to(x.dtype)  # (..., out) W h, adapter dtype as in _dora
                z = dropped + lora_out
                y = base + (factor - 1) * dropped + factor * lora_out
            ctx.norm = norm
            if b is not None:
                y = y + b
        ctx.scaling, ctx.keep, ctx.weight_fn = scaling, keep, weight_fn
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, A, B, v, mask, weight, factor, z)
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, A, B, v, mask, weight, factor, z = ctx.saved_tensors
        s, keep = ctx.scaling, ctx.keep
        need_x, need_A, need_B, need_m, need_b = ctx.needs_input_grad[:5]
        lora_dtype = A.dtype
        gx = gA = gB = gm = gb = None
        if need_b:
            gb = _flat(g).sum(0).to(ctx.bias_dtype)  # (out,)
        if need_m:
            gm = (_flat(g * z).sum(0).to(lora_dtype)) / ctx.norm  # (out,)
        g_lora = g if factor is None else g * factor  # (..., out) g' = f ⊙ g
        g32 = g_lora.to(lora_dtype)
        gv = g32 @ B  # (..., r)
        if need_B:
            gB = _flat(g32).t() @ _flat(v)  # (out, r)
        if need_A or need_x:
            h = x.to(lora_dtype)
            if mask is not None:
                h = h * mask.to(lora_dtype) / keep
        if need_A:
            gA = _flat(gv * s).t() @ _flat(h)  # (r, in)
        if need_x:
            # (out, in), recomputed; DoRA's dropped-input path runs in the adapter dtype (as in forward)
            W_full = _weight(weight, ctx.weight_fn, lora_dtype if factor is not None else g.dtype)
            W = W_full.to(g.dtype)
            gh = (gv * s) @ A  # (..., in)
            if mask is None:
                gx = (g_lora @ W).add_(gh.to(g.dtype))
            else:
                inner = gh if factor is None else gh + ((factor - 1) * g).to(lora_dtype) @ W_full
                inner = inner * mask.to(lora_dtype) / keep
                gx = (g @ W).add_(inner.to(g.dtype))
        return gx, gA, gB, gm, gb, None, None, None, None, None


def _weight(weight: torch.Tensor | None, weight_fn: WeightFn | None, dtype: torch.dtype) -> torch.Tensor:
    if weight is not None:
        return weight.to(dtype)
    assert weight_fn is not None
    return weight_fn(dtype)


def fused_lora_linear(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, *,
                      weight: torch.Tensor | None = None, weight_fn: WeightFn | None = None,
                      bias: torch.Tensor | None = None, magnitude: torch.Tensor | None = None,
                      dropout: float = 0.0, training: bool = True,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """LoRA/DoRA linear on plain tensors, one autograd node (see the module docstring for the math).

    x (..., in); A (r, in); B (out, r); weight (out, in) frozen dense base weight, or weight_fn(dtype)
    returning it (e.g. an NF4 dequantizer: called in forward and again in backward); bias (out,) frozen
    or trainable; magnitude (out,) turns on DoRA. Dropout with probability `dropout` applies to the
    low-rank input when `training`; `mask` (bool, shape of x) fixes the keep-mask instead of drawing it
    (as `torch.empty_like(x).bernoulli_(1 - p)`, the draw nn.Dropout makes on CPU).
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
    y = FusedLoraFunction.apply(x, A, B, magnitude, bias, weight, weight_fn, float(scaling), mask, keep)
    return y


# -- LoraLayer integration ---------------------------------------------------------------------


def weight_source(base: nn.Module) -> tuple[torch.Tensor | None, WeightFn | None]:
    """(dense (out, in) weight, None) for nn.Linear, (None, dequantizer) for a packed base
    (NF4 on CUDA uses the Triton dequant kernel when triton is importable)."""
    if isinstance(base, nn.Linear):
        return base.weight, None
    from lorafit.quant.linear import NF4Linear

    if isinstance(base, NF4Linear) and base.packed.is_cuda and base.double_quant and triton_available():
        from lorafit.ops.triton.nf4_dequant import dequantize_nf4_triton

        return None, lambda dtype: dequantize_nf4_triton(base.nf4(), dtype)
    return None, base.dequantize



def applies(layer: nn.Module) -> str | None:
    """The adapter name the fused path would run for this LoraLayer, or None if it does not apply:
    one active, unmerged LoRA/DoRA adapter on an nn.Linear (frozen weight) or quantized base,
    no per-row routing, not an embedding."""
    if not ENABLED or layer.disabled or layer.routing is not None or layer.is_embedding:
        return None
    names = [n for n in layer.active if n in layer.lora_A and n not in layer.merged]
    if len(names) != 1:  # merged adapters are already in the base weight, which the fused path reads
        return None
    base = layer.base_layer
    if isinstance(base, nn.Linear):
        if base.weight.requires_grad:
            return None
    elif not hasattr(base, "dequantize"):
        return None
    dropout = layer.lora_dropout[names[0]]
    if not isinstance(dropout, (nn.Dropout, nn.Identity)):
        return None
    return names[0]


def lora_layer_forward(layer: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
    """LoraLayer.forward for one adapter through `FusedLoraFunction` (same numbers as the module path)."""
    base = layer.base_layer
    weight, weight_fn = weight_source(base)
    dropout = layer.lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    return fused_lora_linear(
        x, layer.lora_A[name], layer.lora_B[name], layer.effective_scaling(name),
        weight=weight, weight_fn=weight_fn, bias=getattr(base, "bias", None),
        magnitude=layer.lora_magnitude.get(name),
        dropout=p, training=layer.training,
    )
