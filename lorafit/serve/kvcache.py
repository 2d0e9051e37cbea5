"""The serving cache: keys and values appended in place, and recurrent states kept per row.

transformers' `DynamicCache` grows by `torch.cat`, so every decode step copies every layer's whole
K and V (for a 32-row batch of SmolLM2-135M, about 90 MB a token, a sixth of a CPU decode step).
Here each attention layer keeps K and V in a buffer with spare columns at the end; `update` writes the
new columns into the spare room and hands the model views of the filled part. The buffer grows by
`GROW` columns (or more) when full, so a long generation copies the cache once per `GROW` tokens.

Layers that fold the sequence into a running state (linear attention as in Qwen3.5 / Qwen3-Next, Mamba-2
as in Granite 4, LFM2's short convolutions: `lorafit.sequence_state`) keep transformers' own
`LinearAttentionLayer`: a convolution state (B, channels, kernel) and a recurrent state (B, ...) per row,
updated in place each step. Rows are the first dim of every tensor, so a batch's rows split and join
alike in both kinds of layer (`select` and `join`): attention layers are left-padded to a common length
(masked), recurrent states need no padding (one state per row, whatever its length).

Only appending is supported (what a decoding engine does); a batch that changes shape (rows leave,
another batch joins) gets a new cache made of the old layers' rows.
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, LinearAttentionCacheLayerMixin

from lorafit.sequence_state import recurrent_layers

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


def left_pad(t: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """`t` with zeros prepended along `dim` up to `length`."""
    if t.shape[dim] == length:
        return t
    shape = list(t.shape)
    shape[dim] = length - t.shape[dim]
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _kv_layer(keys: torch.Tensor, values: torch.Tensor) -> AppendLayer:
    layer = AppendLayer()
    layer.update(keys, values)
    return layer


def _state_layer(like: LinearAttentionCacheLayerMixin, states) -> LinearAttentionCacheLayerMixin:
    """A copy of a recurrent layer (its flags, kernel sizes, count) holding `states(tensor)` of each state."""
    layer = copy.copy(like)
    for field in ("conv_states", "recurrent_states"):
        setattr(layer, field, {i: None if t is None else states(t) for i, t in getattr(like, field).items()})
    for field in ("is_conv_states_initialized", "is_recurrent_states_initialized", "has_previous_state",
                  "conv_kernel_size"):
        setattr(layer, field, dict(getattr(like, field)))
    layer.cumulative_length_linear = like.cumulative_length_linear.clone()
    return layer


class AppendCache(DynamicCache):
    """A `DynamicCache` whose attention layers are `AppendLayer`s (created as the model first writes them)
    and whose recurrent layers, for a model that has them, are transformers' own (made from its config)."""

    def __init__(self, config=None) -> None:
        recurrent = recurrent_layers(config) if config is not None else []
        if not recurrent:
            Cache.__init__(self, layer_class_to_replicate=AppendLayer)
            return
        layers = DynamicCache(config=config).layers  # the kinds transformers picks per layer
        Cache.__init__(self, layers=[layer if i in recurrent else AppendLayer() for i, layer in enumerate(layers)])

    @classmethod
    def from_layers(cls, layers: list) -> AppendCache:
        cache = cls()
        cache.layers = layers
        cache.layer_class_to_replicate = None if any(map(is_recurrent, layers)) else AppendLayer
        return cache

    @classmethod
    def from_kv(cls, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> AppendCache:
        """A cache holding the given per-layer (keys, values), each (B, heads, L, head_dim)."""
        return cls.from_layers([_kv_layer(k, v) for k, v in kv])

    def select(self, index: torch.Tensor, start: int = 0) -> AppendCache:
        """The cache of rows `index`, attention columns from `start` on."""
        def rows(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, index)

        layers = []
        for layer in self.layers:
            keys = rows(layer.keys)[:, :, start:] if has_kv(layer) else None
            values = rows(layer.values)[:, :, start:] if has_kv(layer) else None
            layers.append(_with_kv(_state_layer(layer, rows), keys, values) if is_recurrent(layer) else
                          _kv_layer(keys, values))
        return AppendCache.from_layers(layers)

    def join(self, other: AppendCache, length: int, index: torch.Tensor | None) -> AppendCache:
        """This cache's rows then `other`'s, attention left-padded to `length` columns, reordered by `index`."""
        def cat(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out = torch.cat([x, y])
            return out if index is None else out.index_select(0, index)

        layers = []
        for a, b in zip(self.layers, other.layers):
            keys = cat(left_pad(a.keys, length, 2), left_pad(b.keys, length, 2)) if has_kv(a) else None
            values = cat(left_pad(a.values, length, 2), left_pad(b.values, length, 2)) if has_kv(a) else None
            if is_recurrent(a):  # one state per row: no padding
                layer = _state_layer(a, lambda t: t)
                for field in ("conv_states", "recurrent_states"):
                    theirs = getattr(b, field)
                    setattr(layer, field, {i: None if t is None else cat(t, theirs[i])
                                           for i, t in getattr(a, field).items()})
                layer.cumulative_length_linear = torch.maximum(a.cumulative_length_linear, b.cumulative_length_linear)
                layers.append(_with_kv(layer, keys, values))
            else:
                layers.append(_kv_layer(keys, values))
        return AppendCache.from_layers(layers)

    def kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per attention layer (keys, values), each (B, heads, L, head_dim)."""
        return [(layer.keys, layer.values) for layer in self.layers if has_kv(layer)]


def is_recurrent(layer) -> bool:
    return isinstance(layer, LinearAttentionCacheLayerMixin)


def has_kv(layer) -> bool:
    """Whether a cache layer holds keys and values: an attention layer, or a layer that is both (Falcon-H1's
    "hybrid" layers: a Mamba state and attention side by side)."""
    return isinstance(layer, DynamicLayer) and getattr(layer, "is_initialized", False)


def _with_kv(layer, keys: torch.Tensor | None, values: torch.Tensor | None):
    """`layer` (a copied recurrent layer) holding `keys` / `values` too, where it is also an attention layer."""
    if keys is not None:
        layer.keys, layer.values = keys, values
    return layer
