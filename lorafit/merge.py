"""Merging adapters into quantized bases, and saying what it costs.

Merging into an NF4 or ternary base means dequantize, add the update, requantize: the update is
small next to the quantization step, so part of it is rounded away. `merge_quantized` does the
merge and measures, per layer, how far the requantized layer's output moved from the exact merged
output on a probe batch; `merge_quantized_report` adds the same comparison for the model's logits
on probe tokens. `merge_to_dense` instead writes the exact merged weights into 16/32-bit
`nn.Linear` layers (every quantized layer, adapted or not), for export without that loss.

Relative change of one layer: mean |y_requantized - y_exact| / mean |y_exact| over a Gaussian probe
batch x, with y_exact = x (W_base + s B A)^T computed in fp32 before requantizing.

What of the update survives, per layer: with ΔW = s B A the exact update, W the (dequantized) base
and W' the requantized merge, the update the file actually carries is D = W' - W, and

    survival = <D, ΔW> / ||ΔW||²        the share of ΔW's direction kept (1: all of it; ~0: rounded away)
    residual = ||D - ΔW|| / ||ΔW||      how far the carried update is from the trained one
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorafit.lora.base import dense_weight, is_quantized
from lorafit.lora.inject import adapter_layers, forget_adapters, lora_layers, saved_modules
from lorafit.lora.layer import LoraLayer
from lorafit.modules import set_submodule


@dataclass
class MergeError:
    """How the requantized merged layer's output differs from the exact merged output."""

    layer: str
    max_abs: float
    mean_abs: float
    rel: float  # mean |error| / mean |exact output|
    survival: float = 1.0  # <D, ΔW> / ||ΔW||² (module docstring)
    residual: float = 0.0  # ||D - ΔW|| / ||ΔW||


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
        before = dense_weight(layer.base_layer, torch.float32)
        exact = _exact_merged(layer)
        layer.merge()
        after = dense_weight(layer.base_layer, torch.float32)
        x = torch.randn(probe_tokens, layer.in_features, generator=g).to(exact.device)  # (N, in)
        y_exact = x @ exact.t()  # (N, out)
        err = (x @ after.t() - y_exact).abs()
        update, carried = exact - before, after - before  # ΔW, D
        norm2 = (update * update).sum().clamp_min(1e-30)
        report.append(MergeError(path, err.max().item(), err.mean().item(),
                                 (err.mean() / y_exact.abs().mean().clamp_min(1e-12)).item(),
                                 ((carried * update).sum() / norm2).item(),
                                 ((carried - update).norm() / norm2.sqrt()).item()))
    return report


@dataclass
class MergeReport:
    """`merge_quantized`'s per-layer errors plus the change of the model's logits on probe tokens."""

    layers: list[MergeError]
    logits_rel: float  # mean |logits_after - logits_before| / mean |logits_before|
    logits_max_abs: float
    n_probe_tokens: int


def probe_ids(vocab_size: int, n: int = 32, seed: int = 0) -> torch.Tensor:
    """(1, n) token ids, the same for the same arguments: what the logits drift is measured on."""
    return torch.randint(0, vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def merge_quantized_report(model: nn.Module, ids: torch.Tensor | None = None) -> MergeReport:
    """`merge_quantized`, with the logits on `ids` (default `probe_ids`) compared before and after."""
    if ids is None:
        ids = probe_ids(model.get_input_embeddings().weight.shape[0])
    ids = ids.to(model.get_input_embeddings().weight.device)
    before = model(ids).logits.float()  # (1, n, vocab): adapters applied on top of the quantized base, exact
    layers = merge_quantized(model)
    diff = (model(ids).logits.float() - before).abs()
    return MergeReport(layers, (diff.mean() / before.abs().mean().clamp_min(1e-12)).item(), diff.max().item(),
                       ids.shape[-1])


def format_report(report: list[MergeError] | MergeReport, worst: int = 3) -> str:
    """A few lines for people: how much requantizing moved the layers (mean, max, the worst ones)
    and, given a MergeReport, the logits."""
    layers = report.layers if isinstance(report, MergeReport) else report
    if not layers:
        return "no quantized layer was merged: the merge is exact"
    mean_rel = sum(e.rel for e in layers) / len(layers)
    ranked = sorted(layers, key=lambda e: e.rel, reverse=True)
    lines = [f"merged into {len(layers)} quantized layers and requantized them; relative change of each layer's "
             f"output on a random probe: mean {100 * mean_rel:.3g}%, max {100 * ranked[0].rel:.3g}%",
             "  worst layers: " + ", ".join(f"{e.layer} {100 * e.rel:.3g}%" for e in ranked[:worst]),
             f"  share of the trained update that survives requantization: mean "
             f"{100 * sum(e.survival for e in layers) / len(layers):.3g}%, lowest "
             + ", ".join(f"{e.layer} {100 * e.survival:.3g}%" for e in sorted(layers, key=lambda e: e.survival)[:worst])]
    if isinstance(report, MergeReport):
        lines.append(f"  logits on {report.n_probe_tokens} probe tokens: mean relative change "
                     f"{100 * report.logits_rel:.3g}%, max abs change {report.logits_max_abs:.3g}")
    lines.append("  for exact weights instead, merge to dense 16-bit (lorafit merge --dense, merge_to_dense)")
    return "\n".join(lines)


@torch.no_grad()
def merge_to_dense(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every adapted layer by a plain layer holding the exact merged weight: quantized bases
    become `nn.Linear` in `dtype` (no requantization), modules_to_save become their trained copy, and
    quantized layers no adapter touched are dequantized into `nn.Linear` in `dtype` too. (IA)³, AdaLoRA
    and MoE-expert layers merge into their base in place (exact on a dense base; on a quantized one the
    merge requantizes before the dequantization, so close rather than exact).
    Returns a model with no adapters and no quantized layers."""
    for path, layer in list(lora_layers(model)):
        if layer.is_embedding or not is_quantized(layer.base_layer):
            layer.merge()
            set_submodule(model, path, layer.base_layer)
            continue
        set_submodule(model, path, _dense_linear(_exact_merged(layer), getattr(layer.base_layer, "bias", None), dtype))
    for path, layer in list(adapter_layers(model)):  # (IA)³, AdaLoRA, MoE experts: merged where they are
        layer.merge()  # (on a quantized base this requantizes: close, not exact; dequantized below)
        set_submodule(model, path, layer.base_layer)
    for path, module in list(saved_modules(model)):  # the trained copy replaces the wrapper
        keep = module.copies[module.active] if module.active in module.copies else module.original  # noqa: SIM401
        set_submodule(model, path, keep)
    for path, module in [(n, m) for n, m in model.named_modules() if is_quantized(m)]:  # layers no adapter touched
        set_submodule(model, path, _dense_linear(dense_weight(module, torch.float32), getattr(module, "bias", None), dtype))
    forget_adapters(model)
    return model


def _dense_linear(W: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    """A frozen nn.Linear holding the (out, in) weight W (and bias) in `dtype`."""
    linear = nn.Linear(W.shape[1], W.shape[0], bias=bias is not None, dtype=dtype, device=W.device)
    linear.weight.copy_(W)
    if bias is not None:
        linear.bias.copy_(bias)
    return linear.requires_grad_(False)
