"""A KV cache that appends in place: decode steps write one column instead of copying the cache.

transformers' `DynamicCache` grows by `torch.cat`, so every decode step copies every layer's whole
K and V (for a 32-row batch of SmolLM2-135M, about 90 MB a token, a sixth of a CPU decode step).
Here each layer keeps K and V in a buffer with spare columns at the end; `update` writes the new
columns into the spare room and hands the model views of the filled part. The buffer grows by
`GROW` columns (or more) when full, so a long generation copies the cache once per `GROW` tokens.

Only appending is supported (what a decoding engine does); a batch that changes shape (rows
leave, another batch joins) is rebuilt from its tensors with `from_kv`.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

GROW = 64  # spare columns added when a buffer is full


class AppendLayer(DynamicLayer):
    """One layer's K and V: `keys`/`values` are views of the first `length` columns of a buffer."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        new = key_states.shape[-2]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.length = 0
            self._k = self._v = None
        if self._k is None or self.length + new > self._k.shape[-2]:
            self._k = self._grown(self._k, key_states, self.length + new)
            self._v = self._grown(self._v, value_states, self.length + new)
        self._k[..., self.length: self.length + new, :] = key_states
        self._v[..., self.length: self.length + new, :] = value_states
        self.length += new
        self.keys, self.values = self._k[..., : self.length, :], self._v[..., : self.length, :]
        return self.keys, self.values

    def _grown(self, buf: torch.Tensor | None, like: torch.Tensor, needed: int) -> torch.Tensor:
        """A buffer of at least `needed` + GROW columns holding the filled part of `buf`."""
        shape = list(like.shape)
        shape[-2] = needed + GROW
        out = like.new_empty(shape)
        if self.length:
            out[..., : self.length, :] = buf[..., : self.length, :]
        return out


class AppendCache(DynamicCache):
    """A `DynamicCache` whose layers are `AppendLayer`s (created as the model first writes them)."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=AppendLayer)

    @classmethod
    def from_kv(cls, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> AppendCache:
        """A cache holding the given per-layer (keys, values), each (B, heads, L, head_dim)."""
        cache = cls()
        for k, v in kv:
            layer = AppendLayer()
            layer.update(k, v)
            cache.layers.append(layer)
        return cache
