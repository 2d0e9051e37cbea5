"""Swap the linear layers of a loaded model for frozen quantized ones, one layer at a time.

Methods: "nf4" (QLoRA, Dettmers et al. 2023) and "ternary" (BitNet b1.58, Ma et al. 2024). Each layer
is quantized and swapped in before the next is touched, and the swapped-out fp module is dropped, so
peak memory is the quantized model plus one fp layer. Output heads (`skip`, default "lm_head") and
embeddings (not `nn.Linear`) stay in full precision. GPT-2's Conv1D layers are linear layers with
their weight stored (in, out): they are quantized transposed, as bitsandbytes does.
"""

from __future__ import annotations

import torch
from torch import nn

from lorafit.errors import LorafitError
from lorafit.modules import path_matches, plain_linear, read_by_weight, set_submodule
from lorafit.quant.linear import NF4Linear, PackedLinear
from lorafit.quant.nf4 import VALID_BLOCKSIZES
from lorafit.quant.ternary import TernaryLinear

METHODS = ("nf4", "ternary")


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): a linear layer whose weight is stored (in, out)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def quantize_linear(name: str, linear: nn.Linear, method: str = "nf4", *, blocksize: int = 64,
                    double_quant: bool = True, group_size: int | None = None,
                    compute_dtype: torch.dtype | None = None) -> PackedLinear:
    """Quantize one linear layer (named `name` for error messages) and return the frozen replacement."""
    if method not in METHODS:
        raise LorafitError(f"unknown quantization method {method!r} for layer {name!r}; use one of {METHODS}")
    if is_conv1d(linear):
        dense = nn.Linear(linear.weight.shape[0], linear.weight.shape[1], bias=linear.bias is not None,
                          device="meta")
        dense.weight = nn.Parameter(linear.weight.detach().T, requires_grad=False)
        dense.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        linear = dense
    if not isinstance(linear, nn.Linear):
        raise LorafitError(f"layer {name!r} is a {type(linear).__name__}, not nn.Linear; it cannot be quantized")
    weight = linear.weight
    if weight.dim() != 2 or weight.numel() == 0:
        raise LorafitError(f"layer {name!r} has weight shape {tuple(weight.shape)}; expected a non-empty (out, in)")
    if weight.device.type == "meta":
        raise LorafitError(f"layer {name!r} is on the meta device; load its weights before quantizing")
    if method == "nf4":
        if blocksize not in VALID_BLOCKSIZES:
            raise LorafitError(f"layer {name!r}: NF4 blocksize {blocksize} unsupported; use one of {VALID_BLOCKSIZES}")
        return NF4Linear.from_linear(linear, blocksize, double_quant, compute_dtype)
    if group_size is not None and (group_size <= 0 or linear.in_features % group_size):
        raise LorafitError(
            f"layer {name!r}: ternary group_size {group_size} does not divide in_features {linear.in_features}"
        )
    return TernaryLinear.from_linear(linear, group_size, compute_dtype)


@torch.no_grad()
def quantize_model(model: nn.Module, method: str = "nf4", skip: tuple[str, ...] = ("lm_head",), *,
                   blocksize: int = 64, double_quant: bool = True, group_size: int | None = None,
                   compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every plain `nn.Linear` not named in `skip` (nor read by weight in training:
    `lorafit.modules.read_by_weight`) by its quantized version, in place; returns `model`."""
    if method not in METHODS:
        raise LorafitError(f"unknown quantization method {method!r}; use one of {METHODS}")
    names = [n for n, m in model.named_modules()
             if (plain_linear(m) or is_conv1d(m)) and not path_matches(n, [*skip, *read_by_weight(model)])]
    for name in names:
        linear = model.get_submodule(name)
        set_submodule(model, name, quantize_linear(
            name, linear, method, blocksize=blocksize, double_quant=double_quant,
            group_size=group_size, compute_dtype=compute_dtype,
        ))
        del linear  # the fp weight is freed here unless something else (e.g. a tied head) still holds it
    return model


__all__ = ["METHODS", "NF4Linear", "TernaryLinear", "quantize_linear", "quantize_model"]
