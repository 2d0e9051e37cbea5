"""Tensor names and layouts: the Q/K permutation is exactly the change between HF's half-split rotary
embedding and llama.cpp's interleaved one, and names follow gguf-py's map."""

import pytest
import torch
from transformers import LlamaConfig

from lorafit.errors import LorafitError
from lorafit.export.arch import FAMILIES
from lorafit.export.layout import NameMap, rotary_permute, unpermute


def rope_half_split(x: torch.Tensor, pos: int, theta: float = 10000.0) -> torch.Tensor:
    """HF's rotary embedding on one head (d,): pairs (i, i + d/2)."""
    d = x.shape[0]
    angle = pos * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
    a, b = x[: d // 2], x[d // 2:]
    return torch.cat([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()])


def rope_interleaved(x: torch.Tensor, pos: int, theta: float = 10000.0) -> torch.Tensor:
    """llama.cpp's normal rope on one head (d,): pairs (2i, 2i + 1)."""
    d = x.shape[0]
    angle = pos * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    a, b = x[0::2], x[1::2]
    out = torch.empty_like(x)
    out[0::2], out[1::2] = a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()
    return out


def test_permuted_weights_under_interleaved_rope_give_the_same_attention_scores():
    heads, d, hidden = 3, 8, 12
    g = torch.Generator().manual_seed(0)
    Wq, Wk = torch.randn(heads * d, hidden, generator=g, dtype=torch.float64), torch.randn(heads * d, hidden, generator=g,
                                                                                          dtype=torch.float64)
    x1, x2 = torch.randn(hidden, generator=g, dtype=torch.float64), torch.randn(hidden, generator=g, dtype=torch.float64)
    Pq, Pk = rotary_permute(Wq, heads), rotary_permute(Wk, heads)
    for h in range(heads):
        rows = slice(h * d, (h + 1) * d)
        hf = rope_half_split(Wq[rows] @ x1, 5) @ rope_half_split(Wk[rows] @ x2, 2)
        cpp_q, cpp_k = rope_interleaved(Pq[rows] @ x1, 5), rope_interleaved(Pk[rows] @ x2, 2)
        assert torch.allclose(cpp_q @ cpp_k, hf)
        assert torch.allclose(cpp_q, rotary_permute(rope_half_split(Wq[rows] @ x1, 5)[None].t(), 1).t()[0])


def test_permutation_inverts_and_works_on_biases_and_lora_b():
    t = torch.arange(4 * 6 * 3, dtype=torch.float32).reshape(24, 3)  # (out, r): a LoRA B
    assert torch.equal(unpermute(rotary_permute(t, 4), 4), t)
    bias = torch.arange(24.0)
    assert torch.equal(rotary_permute(bias, 4), rotary_permute(bias[:, None], 4)[:, 0])
    assert rotary_permute(torch.arange(4.0), 1).tolist() == [0.0, 2.0, 1.0, 3.0]


def test_names_and_which_rows_are_permuted():
    names = NameMap(FAMILIES["llama"], LlamaConfig(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2))
    assert names.gguf_name("model.layers.1.self_attn.q_proj.weight") == "blk.1.attn_q.weight"
    assert names.gguf_name("model.layers.0.mlp.down_proj.weight") == "blk.0.ffn_down.weight"
    assert names.gguf_name("lm_head.weight") == "output.weight"
    assert names.heads_to_permute("blk.1.attn_q.weight") == 8 and names.heads_to_permute("blk.1.attn_k.bias") == 2
    assert names.heads_to_permute("blk.1.attn_v.weight") is None
    qwen = NameMap(FAMILIES["qwen2"], LlamaConfig(num_hidden_layers=2))
    assert qwen.heads_to_permute("blk.1.attn_q.weight") is None  # NEOX rope in llama.cpp: nothing to permute
    with pytest.raises(LorafitError, match="model.layers.0.mlp.experts.weight: llama.cpp's llama model has no tensor"):
        names.gguf_name("model.layers.0.mlp.experts.weight")
