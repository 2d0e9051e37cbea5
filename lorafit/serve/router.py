"""Per-row adapter routing kept across decode steps, with the engine's own stacked adapter weights.

`lorafit.adapter_per_row` attaches a routing to every LoRA layer: each layer's row layout, and a
stacked copy of the adapters present (`lorafit.lora.routing.StackCache`). Redoing that every token
would cost a good part of a decode step, so the router stays entered while the batch's rows do
not change. The stacks live in the router's own `StackCache`, so they go when the engine says
so: `forget` after adapters are deleted frees their stacked copies.

Only the scheduler routes, and only under the engine's `model_lock`; adapter load and delete
close the routing (under the same lock) before they touch the model.
"""

from __future__ import annotations

import contextlib

from torch import nn

import lorafit as lf
from lorafit.lora.routing import StackCache


class Router:
    """`use(rows)` before each forward: row i runs on adapter rows[i] (None: the base alone)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.stacks = StackCache()
        self.key: tuple[str | None, ...] | None = None
        self.entered: contextlib.ExitStack | None = None

    def use(self, rows: list[str | None]) -> None:
        key = tuple(rows)
        if self.entered is not None and key == self.key:
            return
        self.close()
        entered = contextlib.ExitStack()
        entered.enter_context(lf.adapter_per_row(self.model, rows, stacks=self.stacks))
        self.entered, self.key = entered, key

    def close(self) -> None:
        """Detach the routing (before the model's adapters change)."""
        if self.entered is not None:
            self.entered.close()
        self.entered = self.key = None

    def forget(self) -> None:
        """Close, and drop every stacked copy (after adapters were deleted)."""
        self.close()
        self.stacks.clear()
