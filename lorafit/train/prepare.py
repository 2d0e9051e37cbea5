"""Get a loaded model ready to train an adapter: the one place that changes a model for training.

    1. add the adapter (unless the model already has it): a new one, or the PEFT-format adapter the run
       starts from (`adapter:`), and make it the active, trainable one; with `method: full`, make every
       weight trainable instead (lorafit.train.full). Preference methods (and grpo with beta > 0): the reference
       adapter (the start adapter, or `ref_adapter:`) as a second, frozen, inactive slot on the same base
       (REFERENCE)
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
from lorafit.errors import AdapterError
from lorafit.io import WEIGHTS_NAME, add_adapter_state, read_adapter
from lorafit.lora.inject import adapter_configs, apply_lora, lora_layers, set_adapter, set_fused
from lorafit.lora.state import check_fits
from lorafit.lora.targets import check_trainable, find_targets
from lorafit.train.checkpointing import enable_checkpointing
from lorafit.train.config import PREFERENCE_METHODS, TrainConfig
from lorafit.train.full import make_fully_trainable
from lorafit.train.fusion import fuse_gated_mlps, fuse_rmsnorms

REFERENCE = "reference"  # the adapter slot of the reference policy, when it is an adapter


def prepare_model(model: nn.Module, config: TrainConfig, adapter: str = DEFAULT_ADAPTER,
                  device: torch.device | None = None) -> nn.Module:
    """Apply `config`'s training-time changes to `model` in place (see the module docstring).
    `device`: where the model will train when that is not where it is now (FSDP moves each rank's
    shards of a model loaded on the host to its GPU); the GPU-only choices follow it."""
    device = device or model_device(model)
    if config.method == "full":
        make_fully_trainable(model)
    else:
        add_adapters(model, config, adapter)
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


def add_adapters(model: nn.Module, config: TrainConfig, adapter: str = DEFAULT_ADAPTER) -> None:
    """The trained adapter (new, or read from `config.adapter`) and, for a preference method, the
    reference slot (`config.ref_adapter`, else the start adapter). Both files are read and checked
    against the model before it changes: an adapter for another base is a one-line AdapterError."""
    loaded = adapter_configs(model)
    wants_reference = config.method in PREFERENCE_METHODS or (config.method == "grpo" and config.grpo.beta > 0)
    ref_path = config.ref_adapter or config.adapter if wants_reference else None
    wanted = [(adapter, config.adapter)] if config.adapter and adapter not in loaded else []
    if ref_path and REFERENCE not in loaded:
        wanted.append((REFERENCE, ref_path))
    read = {}
    for name, path in wanted:
        if path not in read:
            try:
                read[path] = read_adapter(path)
            except AdapterError as e:
                raise AdapterError(f"{'ref_adapter' if name == REFERENCE else 'adapter'}: {e}") from None
            adapter_config, state = read[path]
            try:
                check_fits(model, state, f"{path}/{WEIGHTS_NAME}", getattr(adapter_config, "target_parameters", None))
            except AdapterError as e:
                raise AdapterError(f"{'ref_adapter' if name == REFERENCE else 'adapter'}: {e}") from None
        if name == adapter:  # the start adapter trains: none of its layers may be read by weight
            check_trainable(model, list(read[path][1].layers))
    lora = config.lora
    if adapter in loaded:
        check_trainable(model, [path for path, layer in lora_layers(model) if adapter in layer.adapter_names()])
    elif not config.adapter and isinstance(lora, LoraConfig) and (
            lora.target_modules is not None or not lora.target_parameters):
        check_trainable(model, find_targets(model, lora.target_modules, lora.layers_to_transform))
    for name, path in wanted:
        add_adapter_state(model, *read[path], adapter=name, activate=False, source=path)
    if adapter not in adapter_configs(model):
        apply_lora(model, config.lora, adapter)
    set_adapter(model, adapter)  # the trained one: active and trainable; the reference slot stays frozen


def reference_slot(model: nn.Module) -> str | None:
    """The adapter slot of the reference policy (`REFERENCE`), or None: the base with adapters disabled."""
    return REFERENCE if REFERENCE in adapter_configs(model) else None
