"""Put adapters into any `nn.Module`, switch between them, merge them, take them out.

Functions, not a wrapper class: the user's model stays their model (same class, same module
names; an adapted `q_proj` becomes a `LoraLayer` whose `base_layer` is the original module).
Every function validates first and modifies second, so a bad call leaves the model as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn

from lorafit.config import DEFAULT_ADAPTER, AdaLoraConfig, IA3Config, LoraConfig, check_adapter_name
from lorafit.errors import LorafitError
from lorafit.lora.adalora import SVDLayer
from lorafit.lora.base import is_linear, is_quantized
from lorafit.lora.experts import ExpertLoraLayer, expert_targets
from lorafit.lora.ia3 import IA3Layer, ia3_targets
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


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer | IA3Layer | ExpertLoraLayer | SVDLayer]]:
    """Every adapter-carrying layer: LoRA, (IA)³, MoE-expert LoRA and AdaLoRA layers. They share the small protocol the
    functions below use (active, merged, disabled, merge, unmerge, remove, adapter_names,
    adapter_params, base_layer)."""
    for name, module in model.named_modules():
        if isinstance(module, (LoraLayer, IA3Layer, ExpertLoraLayer, SVDLayer)):
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
    if isinstance(config, IA3Config):
        return _add_ia3(model, config, adapter, activate, only=list(ranks) if ranks is not None else None)
    if isinstance(config, AdaLoraConfig):
        return _add_adalora(model, config, adapter, activate, ranks)
    if config.target_modules is None and not config.target_parameters:  # record the family default
        config = replace(config, target_modules=default_targets(model))  # so the saved file says what was adapted
    experts = expert_targets(model, config.target_parameters) if config.target_parameters else {}
    expert_keys = {f"{p}.{n}" for p, names in experts.items() for n in names}
    if ranks is not None:
        experts = {p: [n for n in names if f"{p}.{n}" in ranks] for p, names in experts.items()}
        experts = {p: names for p, names in experts.items() if names}
        targets = [p for p in ranks if p not in expert_keys]
    else:
        targets = [] if config.target_modules is None else find_targets(
            model, config.target_modules, config.layers_to_transform)
    modules = dict(model.named_modules())
    taken = [t for t in targets if isinstance(modules[t], (IA3Layer, SVDLayer, ExpertLoraLayer))]
    if taken:
        raise LorafitError(f"{taken[0]} already carries an adapter of another method ({type(modules[taken[0]]).__name__}); "
                           "one module takes adapters of one method")
    if config.use_dora:
        embeddings = [t for t in targets if isinstance(_unwrapped(modules[t]), nn.Embedding)]
        if embeddings:
            raise LorafitError(f"use_dora: DoRA is not supported on embedding layers ({embeddings[0]}); "
                               "remove them from target_modules")
    if config.init == "loftq":
        for t in targets:
            check_loftq_target(t, _unwrapped(modules[t]))
    saved = _find_modules_to_save(model, config.modules_to_save)
    plan: list[_Step] = [(path, LoraLayer, LoraLayer, lambda layer, path=path: layer.add(
        adapter, ranks[path] if ranks is not None else config.rank_for(path), config.alpha_for(path),
        dropout=config.dropout, use_rslora=config.use_rslora, use_dora=config.use_dora, init=config.init,
        loftq_iter=config.loftq_iter)) for path in targets]
    plan += [(path, ExpertLoraLayer, ExpertLoraLayer, lambda layer, path=path, names=names: layer.add(
        adapter, names, ranks[f"{path}.{names[0]}"] if ranks is not None else config.r, config.alpha,
        use_rslora=config.use_rslora, init=config.init)) for path, names in experts.items()]
    return _install(model, config, adapter, activate, plan, saved)


# (module path, wrapper class, how to wrap the module found there, how to add the adapter to the wrapper)
_Step = tuple[str, type, Callable[[nn.Module], nn.Module], Callable[[nn.Module], None]]


def _install(model: nn.Module, config: LoraConfig | IA3Config | AdaLoraConfig, adapter: str,
             activate: bool | None, plan: list[_Step], saved: list[str]) -> nn.Module:
    """The one place adding an adapter changes the model, after every check has passed: freeze the
    base (first adapter), wrap and add along `plan`, freeze the new adapter, register, activate."""
    first = not adapter_configs(model)
    if first:
        for p in model.parameters():
            p.requires_grad_(False)
    modules = dict(model.named_modules())
    for path, wrapper, wrap, add in plan:
        layer = modules[path]
        if not isinstance(layer, wrapper):
            layer = wrap(layer)
            set_submodule(model, path, layer)
        add(layer)
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


def _add_ia3(model: nn.Module, config: IA3Config, adapter: str, activate: bool | None,
             only: list[str] | None) -> nn.Module:
    """add_adapter for an IA3Config (`only`: the paths a loaded file holds vectors for)."""
    targets = ia3_targets(model, config)  # validates everything first
    if only is not None:
        missing = [p for p in only if p not in targets]
        if missing:
            raise LorafitError(f"(IA)³ vector for {missing[0]}, which the adapter's target_modules do not match")
        targets = {p: ff for p, ff in targets.items() if p in only}
    saved = _find_modules_to_save(model, config.modules_to_save)
    config = replace(config, target_modules=config.target_modules or sorted({p.rsplit(".", 1)[-1] for p in targets}),
                     feedforward_modules=config.feedforward_modules if config.feedforward_modules is not None
                     else sorted({p.rsplit(".", 1)[-1] for p, ff in targets.items() if ff}))
    plan: list[_Step] = [(path, IA3Layer, lambda m, ff=ff: IA3Layer(m, ff),
                          lambda layer: layer.add(adapter, init_ones=config.init_ia3_weights))
                         for path, ff in targets.items()]
    return _install(model, config, adapter, activate, plan, saved)


def _add_adalora(model: nn.Module, config: AdaLoraConfig, adapter: str, activate: bool | None,
                 ranks: dict[str, int] | None) -> nn.Module:
    """add_adapter for an AdaLoraConfig: SVD-form layers of init_r triplets (or `ranks` from a file)."""
    if config.target_modules is None:
        config = replace(config, target_modules=default_targets(model))
    targets = list(ranks) if ranks is not None else find_targets(model, config.target_modules, wrapper=SVDLayer)
    modules = dict(model.named_modules())
    bad = [p for p in targets if not (isinstance(modules[p], SVDLayer) or is_linear(modules[p]))]
    if bad:
        raise LorafitError(f"AdaLoraConfig.target_modules matched {bad[0]} ({type(modules[bad[0]]).__name__}); "
                           "AdaLoRA adapts plain Linear, Conv1D or NF4 layers only")
    plan: list[_Step] = [(path, SVDLayer, SVDLayer, lambda layer, path=path: layer.add(
        adapter, ranks[path] if ranks is not None else config.init_r, config.init_r, config.alpha,
        dropout=config.dropout, init=ranks is None)) for path in targets]
    return _install(model, config, adapter, activate, plan, [])


def apply_lora(model: nn.Module, config: LoraConfig | IA3Config | AdaLoraConfig | None = None, adapter: str = DEFAULT_ADAPTER) -> nn.Module:
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
    for _, layer in adapter_layers(model):
        layer.active = [n for n in names if n in layer.adapter_names()]
        for n in layer.adapter_names():
            for p in layer.adapter_params(n):
                p.requires_grad_(n in names)
    for _, module in saved_modules(model):
        module.active = next((n for n in names if n in module.copies), None)
        for n, copy in module.copies.items():
            copy.requires_grad_(n in names)
    _set_bias_trainable(model, adapter_configs(model)[names[0]].bias)  # IA3Config.bias is "none"


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
    """Names of the adapters the model's adapted layers currently apply (`set_adapter` chooses them); [] if none."""
    for _, layer in adapter_layers(model):
        return list(layer.active)
    return []


def delete_adapter(model: nn.Module, adapter: str) -> None:
    """Remove an adapter everywhere; layers left with no adapter become their base module again."""
    _check_name(model, adapter, exists=True)
    for path, layer in list(adapter_layers(model)):
        layer.remove(adapter)
        if not layer.adapter_names():
            set_submodule(model, path, layer.base_layer)
    for path, module in list(saved_modules(model)):
        module.remove(adapter)
        if not module.copies:
            set_submodule(model, path, module.original)
    del adapter_configs(model)[adapter]


def set_adapter_scale(model: nn.Module, adapter: str, scale: float) -> None:
    """Multiply an adapter's update by `scale` (0 disables it, 2 doubles it), merged or not."""
    _check_name(model, adapter, exists=True)
    config = adapter_configs(model)[adapter]
    if not isinstance(config, LoraConfig) or config.target_parameters:
        raise LorafitError(f"set_adapter_scale: {adapter!r} is an (IA)³, AdaLoRA or MoE-expert adapter; "
                           "scaling applies to plain LoRA adapters only")
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
    layers = [layer for _, layer in adapter_layers(model)]
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
    for _, layer in adapter_layers(model):
        layer.merge(names)


def unmerge_adapter(model: nn.Module) -> None:
    """Undo `merge_adapter`: take the merged updates back out of the base weights (to float rounding;
    a quantized base is requantized)."""
    for _, layer in adapter_layers(model):
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters and return the plain model: original module classes, no LoRA."""
    for path, layer in list(adapter_layers(model)):
        layer.merge()
        set_submodule(model, path, layer.base_layer)
    for path, module in list(saved_modules(model)):
        keep = module.copies[module.active] if module.active in module.copies else module.original  # noqa: SIM401 (ModuleDict has no .get)
        set_submodule(model, path, keep)
    forget_adapters(model)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Take every adapter out without merging: the base model as it was."""
    for path, layer in list(adapter_layers(model)):
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
    """Print and return PEFT's line: `trainable params: N || all params: M || trainable%: P`."""
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
        if not isinstance(adapter_configs(model)[n], LoraConfig) or any(
                n in layer.adapter_names() for _, layer in adapter_layers(model) if not isinstance(layer, LoraLayer)):
            raise LorafitError(f"adapter {n!r} is not a plain LoRA adapter ((IA)³ or MoE-expert LoRA); "
                               "per-row serving batches LoRA adapters only: serve it alone, merged")
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
