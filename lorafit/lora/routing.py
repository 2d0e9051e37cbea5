"""Per-row adapters for serving: each batch row uses its own adapter, in one forward pass.

`adapter_per_row(model, rows)` (lorafit.lora.inject) makes a `RowRouting` and attaches it to every
LoRA layer; a layer with a routing attached hands its forward to `RowRouting.forward`, which adds each
row's own low-rank update to the base output computed once for the whole batch (S-LoRA / Punica,
Sheng et al. 2023; Chen et al. 2023). The layer itself holds no serving state beyond that reference.

Two paths, chosen per layer:

* stacked (`lorafit.ops.multi_lora`): rows gathered into equal slots per adapter, two batched matmuls
  against the adapters' stacked A^T and B^T. A few ops per layer for any number of adapters: what a
  decode step wants. The stacks are detached copies kept in a `StackCache` between batches, rebuilt
  only when an adapter joins or its weights change.
* grouped (`lorafit.ops.reference.lora_rows`): one pair of thin matmuls per adapter present. Used for
  prefill (many tokens per row), for embeddings, when padding the slots would cost too much, and
  whenever gradients may flow to a routed adapter (the stacks are detached copies).

Weights and scalings are read when the routing is attached: a change made while routed applies from
the next `adapter_per_row`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.ops import multi_lora
from lorafit.ops import reference as ops

Group = tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]  # (rows, A, B, scaling)


class StackCache:
    """Per-layer stacks (A^T (n, in, r_max), B^T (n, r_max, out)) of adapters recently served together.

    Entries are keyed weakly by layer and carry the identity and version of every weight they copied,
    so a stale entry (an adapter deleted, re-added or trained in place) is never used."""

    def __init__(self) -> None:
        self._entries: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, torch.Tensor, torch.Tensor]] = \
            weakref.WeakKeyDictionary()

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _key(layer: nn.Module, names: list[str]) -> tuple:
        """Identifies the current weights of `names`: any in-place change bumps a version."""
        return tuple((n, layer.lora_A[n].data_ptr(), layer.lora_A[n]._version, layer.lora_B[n].data_ptr(),
                      layer.lora_B[n]._version) for n in names)

    def names(self, layer: nn.Module) -> list[str] | None:
        """The adapters of `layer`'s cached stack, if it still holds their current weights."""
        entry = self._entries.get(layer)
        if entry is None:
            return None
        names = [item[0] for item in entry[0]]
        if not all(n in layer.lora_A for n in names) or self._key(layer, names) != entry[0]:
            return None
        return names

    def stack(self, layer: nn.Module, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(At, Bt) of `names` in this order, restacked unless the cache holds exactly these weights."""
        key = self._key(layer, names)
        entry = self._entries.get(layer)
        if entry is None or entry[0] != key:
            # not an inference tensor even when routed under inference_mode: the cache outlives the call
            with torch.inference_mode(False), torch.no_grad():
                At, Bt = multi_lora.stack_adapters([layer.lora_A[n] for n in names], [layer.lora_B[n] for n in names])
            entry = self._entries[layer] = (key, At, Bt)
        return entry[1], entry[2]


_MODEL_STACKS: weakref.WeakKeyDictionary[nn.Module, StackCache] = weakref.WeakKeyDictionary()


def stacks_for(model: nn.Module) -> StackCache:
    """The stack cache `adapter_per_row` uses for `model` when the caller brings none."""
    cache = _MODEL_STACKS.get(model)
    if cache is None:
        cache = _MODEL_STACKS[model] = StackCache()
    return cache


@dataclass
class LayerRoute:
    """How one layer serves the current rows."""

    groups: list[tuple[str, torch.Tensor]]  # (adapter, its batch rows)
    plan: multi_lora.RowPlan | None  # the stacked layout, when it pays
    stacked: tuple[torch.Tensor, torch.Tensor] | None  # (At, Bt) the plan indexes into
    trainable: bool  # a routed adapter requires grad: gradients need the grouped reference path


class RowRouting:
    """Which adapter each batch row uses (None: the base alone), for every layer it is attached to."""

    def __init__(self, row_adapters: list[str | None], stacks: StackCache | None = None) -> None:
        self.row_adapters = list(row_adapters)
        self.stacks = stacks if stacks is not None else StackCache()
        self._plans: dict = {}  # layers with the same adapters and scalings share one row layout
        self._routes: dict[int, LayerRoute] = {}

    # -- attaching ------------------------------------------------------------------------------
    def check(self, layer: nn.Module) -> None:
        """Raise ValueError if `layer` cannot be routed (before anything is attached anywhere)."""
        names = self._names(layer)
        if any(n in layer.lora_magnitude for n in names):
            raise ValueError("per-row routing supports LoRA adapters, not DoRA")
        if any(n in layer.merged for n in names):
            raise ValueError("unmerge adapters before per-row routing")

    def attach(self, layer: nn.Module) -> None:
        names = self._names(layer)
        device = layer.lora_A[names[0]].device if names else torch.device("cpu")
        groups = [(n, torch.tensor([i for i, r in enumerate(self.row_adapters) if r == n], device=device))
                  for n in names]
        trainable = any(layer.lora_A[n].requires_grad or layer.lora_B[n].requires_grad for n in names)
        plan = stacked = None
        if names and not layer.is_embedding:
            plan, stacked = self._stacked_plan(layer, names)
        self._routes[id(layer)] = LayerRoute(groups, plan, stacked, trainable)
        layer.routing = self

    def detach(self, layer: nn.Module) -> None:
        self._routes.pop(id(layer), None)
        layer.routing = None

    def route(self, layer: nn.Module) -> LayerRoute:
        return self._routes[id(layer)]

    def _names(self, layer: nn.Module) -> list[str]:
        return sorted({n for n in self.row_adapters if n is not None and n in layer.lora_A})

    def _stacked_plan(self, layer: nn.Module, names: list[str]):
        """The stacked layout for this layer, or (None, None) to keep the grouped path.

        A cached stack that holds every adapter present is reused as it is, its absent adapters left
        as empty (padding) groups, so a batch whose adapters only leave never restacks; only when that
        padding costs too much, or an adapter joins, are `names` stacked anew."""
        cached = self.stacks.names(layer)
        if cached is not None and set(names) <= set(cached):
            plan = self._layout(layer, cached)
            if plan is not None:
                return plan, self.stacks.stack(layer, cached)
        plan = self._layout(layer, names)
        return (plan, self.stacks.stack(layer, names)) if plan is not None else (None, None)

    def _layout(self, layer: nn.Module, names: list[str]) -> multi_lora.RowPlan | None:
        scales = [layer.effective_scaling(n) for n in names]
        A0 = layer.lora_A[names[0]]
        key = (tuple(names), tuple(scales), A0.dtype, A0.device)
        if key not in self._plans:
            index = {n: g for g, n in enumerate(names)}
            self._plans[key] = multi_lora.plan_rows([index.get(r) for r in self.row_adapters], scales,
                                                    dtype=A0.dtype, device=A0.device,
                                                    max_padding=multi_lora.MAX_PADDING)
        return self._plans[key]

    # -- the forward ----------------------------------------------------------------------------
    def forward(self, layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (the base output for the whole batch) plus each row's own adapter update."""
        route = self.route(layer)
        if not route.groups:
            return y
        groups: list[Group] = [(rows, layer.lora_A[n], layer.lora_B[n], layer.effective_scaling(n))
                               for n, rows in route.groups]
        dtype = groups[0][1].dtype
        if layer.is_embedding:
            out = torch.zeros(*x.shape, layer.out_features, dtype=dtype, device=x.device)  # (B, T, dim)
            for rows, A, B, s in groups:
                out.index_copy_(0, rows, (F.embedding(x.index_select(0, rows), A.t()) @ B.t()) * s)
            return y + out.to(y.dtype)
        if torch.is_grad_enabled() and route.trainable:  # gradients for A and B: the reference
            return y + ops.lora_rows(x.to(dtype), groups).to(y.dtype)
        if route.plan is not None and x.shape[:-1].numel() <= multi_lora.MAX_STACKED_TOKENS:
            At, Bt = route.stacked  # decode: a few ops per layer for any number of adapters
            return multi_lora.add_lora_rows_stacked_(y, x.to(At.dtype), At, Bt, route.plan)
        # prefill: matmuls big enough to hide their call overhead, and no padding
        return multi_lora.add_lora_rows_grouped_(y, x.to(dtype), groups)
