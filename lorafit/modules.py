"""Two small operations on module trees that several rooms need: swap a submodule by its path, and
match a path against short names.

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
