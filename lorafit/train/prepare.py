"""Get a loaded model ready to train an adapter: the one place that changes a model for training.

    1. add the adapter (unless the model already has it) and make it the active, trainable one; with
       `method: full`, make every weight trainable instead (lorafit.train.full)
    2. the fused LoRA Function on or off (`TrainConfig.fused_lora`)
    3. gated MLPs as `GatedMLP` (`fused_mlp`), RMSNorms as the Triton kernel on CUDA
    4. per-layer activation checkpointing (by default on a GPU only), optionally offloaded to host memory
    5. no KV cache (training never reads one back)

Each step is its own function elsewhere; this file only says which run, in which order, from the
config, so the Trainer (and a user's own loop) gets the same model from the same settings.
"""

from __future__ import annotations

import torch
from torch import nn

from lorafit.config import DEFAULT_ADAPTER, LoraConfig
from lorafit.device import model_device
from lorafit.lora.inject import adapter_configs, apply_lora, lora_layers, set_adapter, set_fused
from lorafit.lora.targets import check_trainable, find_targets
from lorafit.train.checkpointing import enable_checkpointing
from lorafit.train.config import TrainConfig
from lorafit.train.full import make_fully_trainable
from lorafit.train.fusion import fuse_gated_mlps, fuse_rmsnorms


def prepare_model(model: nn.Module, config: TrainConfig, adapter: str = DEFAULT_ADAPTER,
                  device: torch.device | None = None) -> nn.Module:
    """Apply `config`'s training-time changes to `model` in place (see the module docstring).
    `device`: where the model will train when that is not where it is now (FSDP moves each rank's
    shards of a model loaded on the host to its GPU); the GPU-only choices follow it."""
    device = device or model_device(model)
    if config.method == "full":
        make_fully_trainable(model)
    elif adapter not in adapter_configs(model):
        lora = config.lora
        if isinstance(lora, LoraConfig) and (lora.target_modules is not None or not lora.target_parameters):
            check_trainable(model, find_targets(model, lora.target_modules, lora.layers_to_transform))
        apply_lora(model, config.lora, adapter)
    else:
        check_trainable(model, [path for path, layer in lora_layers(model) if adapter in layer.adapter_names()])
        set_adapter(model, adapter)
    set_fused(model, config.fused_lora)
    if config.fused_mlp:
        fuse_gated_mlps(model)
    if config.fused_norm and device.type == "cuda":
        fuse_rmsnorms(model)
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    checkpointing = config.gradient_checkpointing
    if checkpointing if checkpointing is not None else device.type == "cuda":
        enable_checkpointing(model, offload=config.offload_activations)
    return model
