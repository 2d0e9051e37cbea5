"""lorafit: low-rank adapters on full-precision, NF4 or ternary bases, in PEFT's file format.

    model = apply_lora(model, LoraConfig(r=16))      # freeze, inject, activate
    ...train...
    save_adapter(model, "out/adapter")                # PEFT-compatible files
    load_adapter(base, "out/adapter", adapter="a")    # also onto a bare base model

Nothing runs or prints on import, and nothing heavy is imported: the names below are loaded from their
modules on first use (PEP 562), so `import lorafit.train.estimate` works without torch installed.
Submodules are reachable as attributes too (`lorafit.io`, `lorafit.quant`, ...).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "AdaLoraConfig": "lorafit.config",
    "AdapterError": "lorafit.errors",
    "IA3Config": "lorafit.config",
    "LoraConfig": "lorafit.config",
    "LoraLayer": "lorafit.lora.layer",
    "LorafitError": "lorafit.errors",
    "add_weighted_adapter": "lorafit.lora.combine",
    "hotswap_adapter": "lorafit.lora.hotswap",
    "analyze_model": "lorafit.inspect.analyze",
    "load_adapter": "lorafit.io",
    "prepare_for_compiled_hotswap": "lorafit.lora.hotswap",
    "save_adapter": "lorafit.io",
    **{name: "lorafit.lora.inject" for name in (
        "active_adapters", "adapter_parameters", "adapter_per_row", "add_adapter", "apply_lora", "delete_adapter",
        "disable_adapters", "merge_adapter", "merge_and_unload", "print_trainable_parameters", "set_adapter",
        "set_adapter_scale", "trainable_parameters", "unload", "unmerge_adapter")},
}

__all__ = [
    "AdaLoraConfig",
    "AdapterError",
    "IA3Config",
    "LoraConfig",
    "LoraLayer",
    "LorafitError",
    "active_adapters",
    "adapter_parameters",
    "adapter_per_row",
    "add_adapter",
    "add_weighted_adapter",
    "analyze_model",
    "apply_lora",
    "delete_adapter",
    "disable_adapters",
    "hotswap_adapter",
    "load_adapter",
    "merge_adapter",
    "merge_and_unload",
    "prepare_for_compiled_hotswap",
    "print_trainable_parameters",
    "save_adapter",
    "set_adapter",
    "set_adapter_scale",
    "trainable_parameters",
    "unload",
    "unmerge_adapter",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ below imports on demand
    from lorafit.config import AdaLoraConfig, IA3Config, LoraConfig
    from lorafit.errors import AdapterError, LorafitError
    from lorafit.inspect.analyze import analyze_model
    from lorafit.io import load_adapter, save_adapter
    from lorafit.lora.combine import add_weighted_adapter
    from lorafit.lora.hotswap import hotswap_adapter, prepare_for_compiled_hotswap
    from lorafit.lora.inject import (
        active_adapters,
        adapter_parameters,
        adapter_per_row,
        add_adapter,
        apply_lora,
        delete_adapter,
        disable_adapters,
        merge_adapter,
        merge_and_unload,
        print_trainable_parameters,
        set_adapter,
        set_adapter_scale,
        trainable_parameters,
        unload,
        unmerge_adapter,
    )
    from lorafit.lora.layer import LoraLayer


def __getattr__(name: str) -> Any:
    """Load a public name (or a submodule) the first time it is asked for, then keep it here."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif not name.startswith("__"):
        try:
            value = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise  # the submodule exists but something it imports is missing
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
