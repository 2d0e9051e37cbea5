"""Put adapters into any `nn.Module`, switch between them, merge them, take them out.

Functions, not a wrapper class: the user's model stays their model (same class, same module
names; an adapted `q_proj` becomes a `LoraLayer` whose `base_layer` is the original module).
Every function validates first and modifies second, so a bad call leaves the model as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn

from lorafit.config import DEFAULT_ADAPTER, LoraConfig, check_adapter_name
from lorafit.errors import LorafitError
from lorafit.lora.base import is_quantized
from lorafit.lora.layer import LoraLayer, ModulesToSave, inside_wrapper
from lorafit.lora.loftq import check_loftq_target
from lorafit.lora.routing import RowRouting, StackCache, stacks_for
from lorafit.lora.targets import default_targets, find_targets, name_matches
from lorafit.modules import path_matches, set_submodule

_CONFIGS = "_lora_configs"  # attribute on the model instance: adapter name -> LoraConfig


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            yield name, module


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """Adapter name -> its LoraConfig, for the adapters in `model` (kept on the model instance)."""
    return model.__dict__.setdefault(_CONFIGS, {})


def forget_adapters(model: nn.Module) -> None:
    """Drop the adapter bookkeeping of a model whose adapters were merged away or unloaded."""
    model.__dict__.pop(_CONFIGS, None)


def _check_name(model: nn.Module, adapter: str, *, exists: bool) -> None:
    check_adapter_name(adapter)
    known = adapter_configs(model)
    if exists and adapter not in known:
        raise LorafitError(f"no adapter named {adapter!r}; loaded adapters: {sorted(known) or 'none'}")
    if not exists and adapter in known:
        raise LorafitError(f"an adapter named {adapter!r} is already loaded; pick another name or delete it first")


def add_adapter(model: nn.Module, config: LoraConfig, adapter: str = DEFAULT_ADAPTER,
                ranks: dict[str, int] | None = None, activate: bool | None = None) -> nn.Module:
    """Add a named adapter. activate=None makes it active only if it is the model's first adapter;
    True or False says so explicitly. An adapter left inactive is also frozen (`set_adapter` makes it
    active and trainable). The first adapter added freezes the base model. `ranks` fixes the rank per
    module path and restricts the adapter to those paths (used when loading a file)."""
    _check_name(model, adapter, exists=False)
    if config.target_modules is None:  # record the family default, so the saved file says what was adapted
        config = replace(config, target_modules=default_targets(model))
    targets = list(ranks) if ranks is not None else find_targets(
        model, config.target_modules, config.layers_to_transform)
    modules = dict(model.named_modules())
    if config.use_dora:
        embeddings = [t for t in targets if isinstance(_unwrapped(modules[t]), nn.Embedding)]
        if embeddings:
            raise LorafitError(f"use_dora: DoRA is not supported on embedding layers ({embeddings[0]}); "
                               "remove them from target_modules")
    if config.init == "loftq":
        for t in targets:
            check_loftq_target(t, _unwrapped(modules[t]))
    saved = _find_modules_to_save(model, config.modules_to_save)

    first = not adapter_configs(model)
    if first:
        for p in model.parameters():
            p.requires_grad_(False)
    for path in targets:
        layer = modules[path]
        if not isinstance(layer, LoraLayer):
            layer = LoraLayer(layer)
            set_submodule(model, path, layer)
        r = ranks[path] if ranks is not None else config.rank_for(path)
        layer.add(adapter, r, config.alpha_for(path), dropout=config.dropout, use_rslora=config.use_rslora,
                  use_dora=config.use_dora, init=config.init, loftq_iter=config.loftq_iter)
        for p in layer.adapter_params(adapter):
            p.requires_grad_(False)
    for path in saved:
        module = modules[path]
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            set_submodule(model, path, module)
        module.add(adapter)
        module.copies[adapter].requires_grad_(False)
    adapter_configs(model)[adapter] = config
    if first if activate is None else activate:
        set_adapter(model, adapter)
    return model


def apply_lora(model: nn.Module, config: LoraConfig | None = None, adapter: str = DEFAULT_ADAPTER) -> nn.Module:
    """Freeze the model, add an adapter and make it the active, trainable one."""
    add_adapter(model, config or LoraConfig(), adapter)
    set_adapter(model, adapter)
    return model


def _unwrapped(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLayer) else module


def _find_modules_to_save(model: nn.Module, names: list[str] | None) -> list[str]:
    if not names:
        return []
    found = [n for n, m in model.named_modules() if n and not isinstance(m, LoraLayer)
             and not inside_wrapper(n) and name_matches(n, names)]
    missing = [t for t in names if not any(path_matches(f, [t]) for f in found)]
    if missing:
        raise LorafitError(f"modules_to_save {missing} matched no module of {type(model).__name__}")
    return found


def set_adapter(model: nn.Module, adapter: str | list[str]) -> None:
    """Make these adapters active (applied in forward) and the only trainable ones."""
    names = [adapter] if isinstance(adapter, str) else list(adapter)
    for n in names:
        _check_name(model, n, exists=True)
    for _, layer in lora_layers(model):
        layer.active = [n for n in names if n in layer.lora_A]
        for n in layer.adapter_names():
            for p in layer.adapter_params(n):
                p.requires_grad_(n in names)
    for _, module in saved_modules(model):
        module.active = next((n for n in names if n in module.copies), None)
        for n, copy in module.copies.items():
            copy.requires_grad_(n in names)
    _set_bias_trainable(model, adapter_configs(model)[names[0]].bias)


def _set_bias_trainable(model: nn.Module, mode: str) -> None:
    for name, p in model.named_parameters():
        if not name.endswith("bias") or ".lora_" in name:
            continue
        if mode == "all":
            p.requires_grad_(True)
        elif mode == "lora_only":
            p.requires_grad_(name.endswith(".base_layer.bias"))
        elif ".copies." not in name:
            p.requires_grad_(False)


def active_adapters(model: nn.Module) -> list[str]:
    for _, layer in lora_layers(model):
        return list(layer.active)
    return []


def delete_adapter(model: nn.Module, adapter: str) -> None:
    """Remove an adapter everywhere; layers left with no adapter become their base module again."""
    _check_name(model, adapter, exists=True)
    for path, layer in list(lora_layers(model)):
        layer.remove(adapter)
        if not layer.lora_A:
            set_submodule(model, path, layer.base_layer)
    for path, module in list(saved_modules(model)):
        module.remove(adapter)
        if not module.copies:
            set_submodule(model, path, module.original)
    del adapter_configs(model)[adapter]


def set_adapter_scale(model: nn.Module, adapter: str, scale: float) -> None:
    """Multiply an adapter's update by `scale` (0 disables it, 2 doubles it), merged or not."""
    _check_name(model, adapter, exists=True)
    for _, layer in lora_layers(model):
        if adapter not in layer.lora_A:
            continue
        was_merged = adapter in layer.merged
        if was_merged:
            layer.unmerge([adapter])
        layer.user_scale[adapter] = float(scale)
        if was_merged:
            layer.merge([adapter])


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the bare base model inside the block; merged adapters are unmerged and merged back after."""
    layers = [layer for _, layer in lora_layers(model)]
    remerge = {id(layer): list(layer.merged) for layer in layers}
    saved = [m for _, m in saved_modules(model)]
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
    for m in saved:
        m.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
            layer.merge(remerge[id(layer)])
        for m in saved:
            m.disabled = False


def merge_adapter(model: nn.Module, adapter: str | list[str] | None = None) -> None:
    """Fold the active (or named) adapters into the base weights: no inference overhead after."""
    names = None if adapter is None else [adapter] if isinstance(adapter, str) else list(adapter)
    for n in names or []:
        _check_name(model, n, exists=True)
    for _, layer in lora_layers(model):
        layer.merge(names)


def unmerge_adapter(model: nn.Module) -> None:
    for _, layer in lora_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters and return the plain model: original module classes, no LoRA."""
    for path, layer in list(lora_layers(model)):
        layer.merge()
        set_submodule(model, path, layer.base_layer)
    for path, module in list(saved_modules(model)):
        keep = module.copies[module.active] if module.active in module.copies else module.original  # noqa: SIM401 (ModuleDict has no .get)
        set_submodule(model, path, keep)
    forget_adapters(model)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Take every adapter out without merging: the base model as it was."""
    for path, layer in list(lora_layers(model)):
        layer.unmerge()
        set_submodule(model, path, layer.base_layer)
    for path, module in list(saved_modules(model)):
        set_submodule(model, path, module.original)
    forget_adapters(model)
    return model


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What the optimizer should see: exactly the parameters that train."""
    return [p for p in model.parameters() if p.requires_grad]


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a quantized layer counts its logical in*out weights."""
    trainable = total = 0
    seen: set[int] = set()  # tied weights (embedding = output head) count once
    for module in model.modules():
        if is_quantized(module):
            total += module.in_features * module.out_features
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                total += bias.numel()
                trainable += bias.numel() if bias.requires_grad else 0
            continue
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> str:
    trainable, total = trainable_parameters(model)
    line = f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"
    print(line)
    return line


def set_fused(model: nn.Module, enabled: bool = True) -> int:
    """Turn the fused LoRA Function on or off in every LoRA layer (on by default); returns the count."""
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer.fused = bool(enabled)
    return len(layers)


@contextmanager
def adapter_per_row(model: nn.Module, row_adapters: list[str | None],
                    stacks: StackCache | None = None) -> Iterator[nn.Module]:
    """Inside the block, batch row i uses adapter `row_adapters[i]` (None: the base alone).

    Mixed-adapter batching for serving: one base matmul for the whole batch plus per-row low-rank
    products (lorafit.lora.routing). `stacks` keeps the adapters' stacked weights between blocks (a
    server passes its own); by default one cache per model is used."""
    for n in {n for n in row_adapters if n is not None}:
        _check_name(model, n, exists=True)
    layers = [layer for _, layer in lora_layers(model)]
    routing = RowRouting(row_adapters, stacks if stacks is not None else stacks_for(model))
    for layer in layers:  # validate every layer before attaching to any
        routing.check(layer)
    try:
        for layer in layers:
            routing.attach(layer)
        yield model
    finally:
        for layer in layers:
            routing.detach(layer)
