"""Recurrent-state layers are recognised from what the config and its cache declare (tiny configs)."""

from __future__ import annotations

import pytest
import transformers as t

from lorafit.sequence_state import keeps_recurrent_state, recurrent_layers

LLAMA = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


@pytest.mark.parametrize("config, expected", [
    (t.LlamaConfig(**LLAMA), []),
    (t.Gemma3TextConfig(**LLAMA, head_dim=16, sliding_window=4), []),  # sliding windows are masks, not state
    (t.MambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=4), [0, 1]),
    (t.JambaConfig(**LLAMA, attn_layer_period=2, attn_layer_offset=1, num_experts=2), [0]),
    (t.Qwen3NextConfig(**{**LLAMA, "num_hidden_layers": 4}, num_key_value_heads=1), [0, 1, 2]),
    (t.GraniteMoeHybridConfig(**LLAMA, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8,
                              layer_types=["mamba", "attention"]), [0]),
], ids=["llama", "gemma3-sliding", "mamba", "jamba", "qwen3-next", "granite-hybrid"])
def test_recurrent_layers_are_those_the_config_declares(config, expected):
    assert recurrent_layers(config) == expected
    assert keeps_recurrent_state(config) == bool(expected)
