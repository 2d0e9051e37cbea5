"""Which layers of a model carry a state along the sequence that attention masks cannot reset.

Attention layers see the sequence through a mask (causal, sliding, per-sample when packed), and their
cache is keys and values per position, so a batching engine can split, pad and merge rows. Recurrent
and convolutional layers (Mamba, linear attention as in Qwen3-Next / Qwen3.5, gated DeltaNet, short
convolutions as in LFM2) fold every earlier position into one running state instead: masks do not stop
it, and their cache holds that state, not one entry per position.

The answer comes from what the model declares, not from its class or a private mark: the layer kinds
of the cache transformers builds for its config (`DynamicCache(config=...)`: a linear-attention cache
layer holds recurrent or convolution states), else the config's `layer_types`. Ground floor: it imports
nothing of lorafit.
"""

from __future__ import annotations

# config.layer_types entries whose layers keep a recurrent or convolution state (transformers' names)
RECURRENT_LAYER_TYPES = frozenset({"linear_attention", "conv", "mamba", "hybrid", "hybrid_sliding"})


def recurrent_layers(config) -> list[int]:
    """Indexes of the decoder layers that keep a recurrent or convolution state (empty: attention only).

    `config` is a transformers config (a multimodal one is read through its text config)."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import LinearAttentionCacheLayerMixin

        layers = DynamicCache(config=text).layers  # no tensors yet: each layer allocates on first use
        return [i for i, layer in enumerate(layers) if isinstance(layer, LinearAttentionCacheLayerMixin)]
    except (ImportError, AttributeError, KeyError, TypeError, ValueError):
        layer_types = getattr(text, "layer_types", None) or []  # a transformers without per-layer cache kinds
        return [i for i, kind in enumerate(layer_types) if kind in RECURRENT_LAYER_TYPES]


def keeps_recurrent_state(config) -> bool:
    """True when any decoder layer keeps a recurrent or convolution state (see `recurrent_layers`)."""
    return bool(recurrent_layers(config))
