"""Per-row adapters for serving: each batch row uses its own adapter, in one forward pass.

`adapter_per_row(model, rows)` (lorafit.lora.inject) makes a `RowRouting` and attaches it to every
LoRA layer; a layer with a routing attached hands its forward to `RowRouting.forward`, which adds each
row's own low-rank update to the base output computed once for the whole batch (S-LoRA / Punica,
Sheng et al. 2023; Chen et al. 2023). The layer itself holds no serving state beyond that reference.

Two paths, chosen per layer:

* stacked (`lorafit.ops.multi_lora`): rows gathered into equal slots per adapter, two batched matmuls
  against the adapters' stacked A^T (scaling folded in) and B^T. Two to five ops per layer for any
  number of adapters: what a decode step wants. The stacks are detached copies kept in a
  `StackCache` between batches, rebuilt only when an adapter joins or its weights or scaling change;
  adapters are stacked in the order the rows first use them, so a batch whose rows are grouped by
  adapter (the engine's usually are) needs no gather at all.
* grouped (`lorafit.ops.reference.lora_rows`): one pair of thin matmuls per adapter present. Used for
  prefill (many tokens per row) unless the rows need no gather, for embeddings, when padding the
  slots would cost too much, and whenever gradients may flow to a routed adapter (the stacks are
  detached copies).

Everything a layer's forward needs (the groups, the plan, the stacks) is worked out when the routing
is attached, so a routed forward is a dictionary lookup and the ops.

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
    """Per-layer stacks (s·A^T (n, in, r_max), B^T (n, r_max, out)) of adapters recently served together.

    Entries are keyed weakly by layer and carry the identity and version of every weight they copied
    and the scaling folded in, so a stale entry (an adapter deleted, re-added, trained in place or
    rescaled) is never used."""

    def __init__(self) -> None:
        self._entries: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, torch.Tensor, torch.Tensor]] = \
            weakref.WeakKeyDictionary()

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _key(layer: nn.Module, names: list[str]) -> tuple:
        """Identifies the current weights and scalings of `names`: any in-place change bumps a version."""
        key = []
        for n in names:
            A, B = layer.lora_A[n], layer.lora_B[n]
            key.append((n, A.data_ptr(), A._version, B.data_ptr(), B._version, layer.effective_scaling(n)))
        return tuple(key)

    def cached(self, layer: nn.Module) -> tuple[list[str], torch.Tensor, torch.Tensor] | None:
        """(adapters, s·At, Bt) of `layer`'s cached stack, if it still holds their current weights."""
        entry = self._entries.get(layer)
        if entry is None:
            return None
        key, At, Bt = entry
        names = [item[0] for item in key]
        if not all(n in layer.lora_A for n in names) or self._key(layer, names) != key:
            return None
        return names, At, Bt

    def stack(self, layer: nn.Module, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(s·At, Bt) of `names` in this order, stacked anew (and cached)."""
        # not an inference tensor even when routed under inference_mode: the cache outlives the call
        with torch.inference_mode(False), torch.no_grad():
            At, Bt = multi_lora.stack_adapters([layer.lora_A[n] for n in names], [layer.lora_B[n] for n in names],
                                               [layer.effective_scaling(n) for n in names])
        self._entries[layer] = (self._key(layer, names), At, Bt)
        return At, Bt


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

    groups: list[Group]  # (its batch rows, A, B, scaling) per adapter present
    plan: multi_lora.RowPlan | None  # the stacked layout, when it pays
    stacked: tuple[torch.Tensor, torch.Tensor] | None  # (s·At, Bt) the plan indexes into
    trainable: bool  # a routed adapter requires grad: gradients need the grouped reference path
    max_stacked_tokens: float  # above this many tokens the grouped path runs (inf: the plan needs no gather)


class RowRouting:
    """Which adapter each batch row uses (None: the base alone), for every layer it is attached to."""

    def __init__(self, row_adapters: list[str | None], stacks: StackCache | None = None) -> None:
        self.row_adapters = list(row_adapters)
        self._order = [n for n in dict.fromkeys(row_adapters) if n is not None]  # adapters by first row
        self.stacks = stacks if stacks is not None else StackCache()
        self._plans: dict = {}  # layers with the same adapters share one row layout
        self._rows: dict = {}  # (adapter, device) -> its batch rows, the same in every layer
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
        weights = [(layer.lora_A[n], layer.lora_B[n]) for n in names]
        groups = [(self._rows_of(n, A.device), A, B, layer.effective_scaling(n)) for n, (A, B) in zip(names, weights)]
        trainable = any(A.requires_grad or B.requires_grad for A, B in weights)
        plan = stacked = None
        if names and not layer.is_embedding:
            plan, stacked = self._stacked_plan(layer, names)
        tokens = float("inf") if plan is not None and plan.identity else multi_lora.MAX_STACKED_TOKENS
        self._routes[id(layer)] = LayerRoute(groups, plan, stacked, trainable, tokens)
        layer.routing = self

    def detach(self, layer: nn.Module) -> None:
        self._routes.pop(id(layer), None)
        layer.routing = None

    def route(self, layer: nn.Module) -> LayerRoute:
        return self._routes[id(layer)]

    def _rows_of(self, name: str, device: torch.device) -> torch.Tensor:
        key = (name, device)
        if key not in self._rows:
            self._rows[key] = torch.tensor([i for i, r in enumerate(self.row_adapters) if r == name], device=device)
        return self._rows[key]

    def _names(self, layer: nn.Module) -> list[str]:
        """The adapters present, in the order the rows first use them (rows grouped by adapter then
        sit in stack order: no gather needed)."""
        return [n for n in self._order if n in layer.lora_A]

    def _stacked_plan(self, layer: nn.Module, names: list[str]):
        """The stacked layout for this layer, or (None, None) to keep the grouped path.

        A cached stack that holds every adapter present is reused as it is, its absent adapters left
        as empty (padding) groups, so a batch whose adapters only leave never restacks; only when that
        padding costs too much, or an adapter joins, are `names` stacked anew."""
        cached = self.stacks.cached(layer)
        if cached is not None and set(names) <= set(cached[0]):
            plan = self._layout(layer, cached[0])
            if plan is not None:
                return plan, cached[1:]
        plan = self._layout(layer, names)
        return (plan, self.stacks.stack(layer, names)) if plan is not None else (None, None)

    def _layout(self, layer: nn.Module, names: list[str]) -> multi_lora.RowPlan | None:
        A0 = layer.lora_A[names[0]]
        key = (tuple(names), A0.device)
        if key not in self._plans:  # (scalings are folded into the stacks: the layout is the same for all)
            index = {n: g for g, n in enumerate(names)}
            self._plans[key] = multi_lora.plan_rows([index.get(r) for r in self.row_adapters], n=len(names),
                                                    device=A0.device, max_padding=multi_lora.MAX_PADDING,
                                                    zero_slot=False)
        return self._plans[key]

    # -- the forward ----------------------------------------------------------------------------
    def forward(self, layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y (the base output for the whole batch) plus each row's own adapter update.

        Rows are x's first dim; a layer inside an MoE block (Llama 4's, Qwen3.5-MoE's and Qwen3-Next's
        shared expert) sees the batch flattened to (B·T, in), row after row, and is served as (B, T, in)."""
        rows = len(self.row_adapters)
        if x.shape[0] != rows and not layer.is_embedding:
            if x.dim() != 2 or x.shape[0] % rows:
                raise ValueError(f"per-row routing of {rows} rows got an input of shape {tuple(x.shape)}")
            return self.forward(layer, x.reshape(rows, -1, x.shape[-1]), y.reshape(rows, -1, y.shape[-1])).reshape(y.shape)
        route = self._routes[id(layer)]
        if route.plan is not None and x.shape[:-1].numel() <= route.max_stacked_tokens and \
                not (route.trainable and torch.is_grad_enabled()):
            At, Bt = route.stacked  # decode: a few ops per layer for any number of adapters
            return multi_lora.add_lora_rows_stacked_(y, x, At, Bt, route.plan)
        if not route.groups:
            return y
        dtype = route.groups[0][1].dtype
        if layer.is_embedding:
            out = torch.zeros(*x.shape, layer.out_features, dtype=dtype, device=x.device)  # (B, T, dim)
            for rows, A, B, s in route.groups:
                out.index_copy_(0, rows, (F.embedding(x.index_select(0, rows), A.t()) @ B.t()) * s)
            return y + out.to(y.dtype)
        if torch.is_grad_enabled() and route.trainable:  # gradients for A and B: the reference
            return y + ops.lora_rows(x.to(dtype), route.groups).to(y.dtype)
        # prefill: matmuls big enough to hide their call overhead, and no padding
        return multi_lora.add_lora_rows_grouped_(y, x.to(dtype), route.groups)
