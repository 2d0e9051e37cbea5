"""Hot-swap: replace a loaded adapter's weights in place, also inside a `torch.compile`d model.

    hotswap_adapter(model, "adapters/b", "default")      # same name, same modules, new weights

The adapter keeps its name, its place in every layer, whether it is active and trainable; only the
numbers change (A, B, DoRA's magnitude, trained biases, modules_to_save copies). The new adapter may
adapt fewer modules than the old one (the others get a zero update), not more.

A compiled graph is specialised on tensor shapes and on Python numbers such as each layer's scaling
alpha/r, so a swap to another rank or alpha would recompile. `prepare_for_compiled_hotswap(model,
max_rank)`, called before `torch.compile`, removes both causes once:

    A (r, in)  ->  [A; 0]        (max_rank, in)
    B (out, r) ->  [s·B, 0]      (out, max_rank)      scaling s  ->  1.0

so B'A' = s·BA, the same update, and every later swap writes its own s·B into the same buffers (zero
beyond its rank, smaller ranks included) while the scaling the graph baked in stays 1.0: no swap
recompiles. (PEFT keeps s as a tensor instead; folding it into B gives the graph no number to guard
at all, and the adapter stays a plain one: its config says r = alpha = max_rank, so it also saves
and reloads exactly.) A rank above max_rank is refused.

Validate first, modify second: a refused swap leaves the model unchanged.
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch
from torch import nn

from lorafit.config import LoraConfig, lora_scaling
from lorafit.errors import AdapterError, LorafitError
from lorafit.io import WEIGHTS_NAME, read_adapter
from lorafit.lora.inject import adapter_configs, lora_layers, saved_modules
from lorafit.lora.state import AdapterState, check_fits, set_adapter_state

_PADDED = "_lorafit_hotswap_rank"  # attribute on the model instance: the max_rank it was prepared for


def hotswap_adapter(model: nn.Module, path: str | os.PathLike, name: str) -> nn.Module:
    """Replace the weights of loaded adapter `name` by those of the PEFT-format folder `path`."""
    config, state = read_adapter(path)
    return hotswap_adapter_state(model, config, state, name, source=str(path))


def prepared_rank(model: nn.Module) -> int | None:
    """The max_rank `prepare_for_compiled_hotswap` padded this model's adapters to, or None."""
    return model.__dict__.get(_PADDED)


@torch.no_grad()
def prepare_for_compiled_hotswap(model: nn.Module, max_rank: int) -> nn.Module:
    """Pad every adapter to rank `max_rank` with zeros and fold its scaling into B (see the module
    docstring), so that swaps after `torch.compile` never recompile. Call it before compiling."""
    if not isinstance(max_rank, int) or isinstance(max_rank, bool) or max_rank < 1:
        raise LorafitError(f"prepare_for_compiled_hotswap: max_rank must be a positive integer, got {max_rank!r}")
    configs = adapter_configs(model)
    if not configs:
        raise LorafitError("prepare_for_compiled_hotswap: the model has no adapter; load one first")
    layers = list(lora_layers(model))
    for path, layer in layers:
        for n in layer.adapter_names():
            _check_swappable(layer, path, n)
            if layer.lora_A[n].shape[0] > max_rank:
                raise LorafitError(f"prepare_for_compiled_hotswap: adapter {n!r} has rank "
                                   f"{layer.lora_A[n].shape[0]} at {path}, above max_rank={max_rank}")
    for _, layer in layers:
        for n in layer.adapter_names():
            A, B, s = layer.lora_A[n], layer.lora_B[n], layer.scaling[n]
            _write(layer, n, A, B, s, max_rank)
    for n, config in configs.items():
        configs[n] = _unit_config(config, max_rank)
    model.__dict__[_PADDED] = max_rank
    return model


def hotswap_adapter_state(model: nn.Module, config: LoraConfig, state: AdapterState, name: str,
                          source: str = "adapter") -> nn.Module:
    """`hotswap_adapter` for an adapter already read (`lorafit.io.read_adapter`); `source` names it."""
    configs = adapter_configs(model)
    if name not in configs:
        raise LorafitError(f"hotswap_adapter: no adapter named {name!r} to replace; loaded adapters: "
                           f"{sorted(configs) or 'none'} (load_adapter adds a new one)")
    ranks = check_fits(model, state, f"{source}/{WEIGHTS_NAME}")
    layers = {path: layer for path, layer in lora_layers(model) if name in layer.lora_A}
    for path, layer in layers.items():
        _check_swappable(layer, path, name)
    extra = sorted(set(ranks) - set(layers))
    if extra:
        raise AdapterError(f"{source}: adapts {extra[0]}, which adapter {name!r} does not; a hot-swap keeps the "
                           "modules (fewer are fine): load it under a new name instead")
    if config.use_dora != configs[name].use_dora:
        raise AdapterError(f"{source}: use_dora={config.use_dora} but adapter {name!r} has use_dora="
                           f"{configs[name].use_dora}; a hot-swap keeps the kind of adapter")
    if config.use_dora and any("magnitude" not in entry for entry in state.layers.values()):
        raise AdapterError(f"{source}: use_dora is set but the file lacks magnitude vectors")
    had = sorted(path for path, module in saved_modules(model) if name in module.copies)
    if sorted(state.saved) != had:
        raise AdapterError(f"{source}: modules_to_save {sorted(state.saved)} differ from adapter {name!r}'s "
                           f"{had}; a hot-swap keeps the modules")
    padded = prepared_rank(model)
    if padded is not None and ranks and max(ranks.values()) > padded:
        path = max(ranks, key=ranks.__getitem__)
        raise LorafitError(f"hotswap_adapter: {source} has rank {ranks[path]} at {path}, above the max_rank="
                           f"{padded} given to prepare_for_compiled_hotswap; prepare with a larger max_rank")

    with torch.no_grad():
        for path, layer in layers.items():
            entry = state.layers.get(path)
            if entry is None:  # not adapted by the new adapter: a zero update
                layer.lora_A[name].zero_()
                layer.lora_B[name].zero_()
                continue
            A, B = (entry["embedding_A"], entry["embedding_B"]) if layer.is_embedding else (entry["A"], entry["B"])
            s = lora_scaling(config.alpha_for(path), ranks[path], config.use_rslora)
            _write(layer, name, A, B, s, padded)
            if "magnitude" in entry:
                layer.lora_magnitude[name].copy_(entry["magnitude"])
            if padded is None:
                dropout = layer.lora_dropout[name]
                if config.dropout != (dropout.p if isinstance(dropout, nn.Dropout) else 0.0):
                    layer.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
    set_adapter_state(model, name, AdapterState(biases=state.biases, saved=state.saved))
    configs[name] = config if padded is None else _unit_config(replace(
        config, target_modules=configs[name].target_modules, layers_to_transform=configs[name].layers_to_transform,
        dropout=configs[name].dropout), padded)
    return model


def _check_swappable(layer: nn.Module, path: str, name: str) -> None:
    if name in layer.merged:
        raise LorafitError(f"adapter {name!r} is merged into {path}; unmerge it before a hot-swap")
    if name in layer.pissa_init:
        raise LorafitError(f"adapter {name!r} was initialised with PiSSA (it changed the base weights of {path}); "
                           "delete it and load the new adapter instead")


def _write(layer: nn.Module, name: str, A: torch.Tensor, B: torch.Tensor, s: float, padded: int | None) -> None:
    """Store (A, B) with scaling s in `layer`'s adapter `name`, in place where the shapes allow.

    padded=None: as given (new Parameters when the rank changes). padded=R: zero-padded to rank R with
    s folded into B, the scaling left at 1.0."""
    old_A, old_B = layer.lora_A[name], layer.lora_B[name]
    r = A.shape[0]
    if padded is not None:
        A_new = torch.zeros(padded, A.shape[1], dtype=old_A.dtype, device=old_A.device)  # (R, in)
        B_new = torch.zeros(B.shape[0], padded, dtype=old_B.dtype, device=old_B.device)  # (out, R)
        A_new[:r] = A.to(A_new)
        B_new[:, :r] = B.to(device=B_new.device, dtype=torch.float64).mul(s).to(B_new.dtype)
        A, B, s = A_new, B_new, 1.0
    if old_A.shape == A.shape and old_B.shape == B.shape:
        old_A.copy_(A)
        old_B.copy_(B)
    else:
        layer.lora_A[name] = nn.Parameter(A.to(old_A).clone(), requires_grad=old_A.requires_grad)
        layer.lora_B[name] = nn.Parameter(B.to(old_B).clone(), requires_grad=old_B.requires_grad)
    layer.scaling[name] = s


def _unit_config(config: LoraConfig, rank: int) -> LoraConfig:
    """`config` for an adapter padded to `rank` with its scaling folded into B: r = alpha = rank."""
    return replace(config, r=rank, alpha=float(rank), use_rslora=False, rank_pattern={}, alpha_pattern={})
