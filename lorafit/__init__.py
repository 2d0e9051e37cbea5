"""lorafit: low-rank adapters on full-precision, NF4 or ternary bases, in PEFT's file format.

    model = apply_lora(model, LoraConfig(r=16))      # freeze, inject, activate
    ...train...
    save_adapter(model, "out/adapter")                # PEFT-compatible files
    load_adapter(base, "out/adapter", adapter="a")    # also onto a bare base model

Nothing runs or prints on import.
"""

from lorafit.config import LoraConfig
from lorafit.errors import AdapterError, LorafitError
from lorafit.io import load_adapter, save_adapter
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

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "LoraConfig",
    "LoraLayer",
    "LorafitError",
    "active_adapters",
    "adapter_parameters",
    "adapter_per_row",
    "add_adapter",
    "apply_lora",
    "delete_adapter",
    "disable_adapters",
    "load_adapter",
    "merge_adapter",
    "merge_and_unload",
    "print_trainable_parameters",
    "save_adapter",
    "set_adapter",
    "set_adapter_scale",
    "trainable_parameters",
    "unload",
    "unmerge_adapter",
]
