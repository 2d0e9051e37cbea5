"""Turn on per-layer activation checkpointing in a transformers model, with lorafit's checkpoint
function (`lorafit.ops.offload.checkpoint`: saved layer inputs optionally offloaded to pinned host
memory) in place of the one transformers would use.

transformers' layers call `self._gradient_checkpointing_func(layer, *args)` when checkpointing is on;
that hook is the one place we plug in, after transformers' own switch has set everything else up.
"""

from __future__ import annotations

import functools

from torch import nn

from lorafit.ops.offload import checkpoint


def enable_checkpointing(model: nn.Module, offload: bool = False) -> int:
    """Turn on transformers' per-layer gradient checkpointing with lorafit's checkpoint function
    (saved layer inputs offloaded to pinned host memory if `offload`); returns the number of layers
    set. Works with the fused LoRA path and the chunked loss, which see the same inputs either way.
    (A KV cache is useless while training; `lorafit.train.prepare` switches it off.)"""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:  # transformers >= 5.2x name; gradient_checkpointing_enable is its deprecated alias
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    from transformers.modeling_layers import GradientCheckpointingLayer

    fn = functools.partial(checkpoint, offload=offload)
    count = 0
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func"):
            module._gradient_checkpointing_func = fn
            count += isinstance(module, GradientCheckpointingLayer)
    return count
