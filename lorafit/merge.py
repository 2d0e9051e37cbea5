"""Merging adapters into quantized bases, and saying what it costs.

Merging into an NF4 or ternary base means dequantize, add the update, requantize: the update is
small next to the quantization step, so part of it is rounded away. `merge_quantized` does the
merge and measures, per layer, how far the requantized layer's output moved from the exact merged
output on a probe batch. `merge_to_dense` instead writes the exact merged weights into 16/32-bit
`nn.Linear` layers, for export without that loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorafit.lora.base import dense_weight, is_quantized
from lorafit.lora.inject import forget_adapters, lora_layers, saved_modules
from lorafit.lora.layer import LoraLayer
from lorafit.modules import set_submodule


@dataclass
class MergeError:
    """How the requantized merged layer's output differs from the exact merged output."""

    layer: str
    max_abs: float
    mean_abs: float
    rel: float  # mean |error| / mean |exact output|


def _exact_merged(layer: LoraLayer) -> torch.Tensor:
    """The fp32 (out, in) weight with every active, not yet merged adapter folded in."""
    W = dense_weight(layer.base_layer, torch.float32)
    for name in layer.active:
        if name not in layer.merged and name in layer.lora_A:
            W, _ = layer.merged_weight(name, W)
    return W


@torch.no_grad()
def merge_quantized(model: nn.Module, probe_tokens: int = 64, seed: int = 0) -> list[MergeError]:
    """Merge the active adapters into their base layers (requantizing quantized ones) and report,
    per quantized layer, the output error requantization added on a Gaussian probe batch."""
    g = torch.Generator().manual_seed(seed)
    report = []
    for path, layer in lora_layers(model):
        if layer.is_embedding or not is_quantized(layer.base_layer):
            layer.merge()
            continue
        exact = _exact_merged(layer)
        layer.merge()
        x = torch.randn(probe_tokens, layer.in_features, generator=g)  # (N, in)
        y_exact = x @ exact.t()  # (N, out)
        err = (x @ dense_weight(layer.base_layer, torch.float32).t() - y_exact).abs()
        report.append(MergeError(path, err.max().item(), err.mean().item(),
                                 (err.mean() / y_exact.abs().mean().clamp_min(1e-12)).item()))
    return report


def format_report(report: list[MergeError]) -> str:
    if not report:
        return "no quantized layer was merged: the merge is exact"
    worst = max(report, key=lambda e: e.max_abs)
    mean_rel = sum(e.rel for e in report) / len(report)
    return (f"merged into {len(report)} quantized layers; requantizing changed layer outputs by "
            f"{100 * mean_rel:.2f}% on average (worst: {worst.layer}, max abs {worst.max_abs:.3g}); "
            "use merge_to_dense for an exact 16-bit export")


@torch.no_grad()
def merge_to_dense(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every adapted layer by a plain layer holding the exact merged weight: quantized bases
    become `nn.Linear` in `dtype` (no requantization), modules_to_save become their trained copy.
    Returns a model with no adapters."""
    for path, layer in list(lora_layers(model)):
        if layer.is_embedding or not is_quantized(layer.base_layer):
            layer.merge()
            set_submodule(model, path, layer.base_layer)
            continue
        W = _exact_merged(layer)
        bias = getattr(layer.base_layer, "bias", None)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, dtype=dtype,
                           device=W.device)
        linear.weight.copy_(W)
        if bias is not None:
            linear.bias.copy_(bias)
        linear.requires_grad_(False)
        set_submodule(model, path, linear)
    for path, module in list(saved_modules(model)):  # the trained copy replaces the wrapper
        keep = module.copies[module.active] if module.active in module.copies else module.original  # noqa: SIM401
        set_submodule(model, path, keep)
    forget_adapters(model)
    return model
