"""Small operations on module trees that several rooms need: swap a submodule by its path, match a path
against short names, tell a plain linear layer (LoRA and quantization wrap only those) and the
layers a family's training forward reads by weight.

Kept on the ground floor (it imports nothing of lorafit) so that quantization, adapter injection,
training fusions and merging share one definition instead of each writing its own.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the module at dotted `path` (e.g. "model.layers.0.mlp") under `root` by `new`."""
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, new)


def path_matches(path: str, names: Iterable[str]) -> bool:
    """PEFT's rule for a list of names: `path` equals a name or ends with "." + name."""
    return any(path == n or path.endswith("." + n) for n in names)


def plain_linear(module: nn.Module) -> bool:
    """An nn.Linear that computes x W^T + b and nothing else: a subclass with its own forward (Llama 4's
    router returns scores and logits) is left alone by LoRA and by quantization."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


# Children whose parent's training forward hands their weight to a fused kernel instead of calling them:
# Granite 4's Mamba layers train through mamba2_split_conv1d_scan_combined, which reads `out_proj.weight`.
# A LoRA there would not train (PEFT's is silently left out) and a quantized weight would not be read.
READ_BY_WEIGHT: dict[str, list[str]] = {"granitemoehybrid": ["mamba.out_proj"]}


def read_by_weight(model: nn.Module) -> list[str]:
    """Short names (path_matches) of the modules of `model` that its training forward reads by weight."""
    return READ_BY_WEIGHT.get(getattr(getattr(model, "config", None), "model_type", None), [])
