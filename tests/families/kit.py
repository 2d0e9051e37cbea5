"""The family matrix's models: one tiny random transformers config per family users bring (no downloads).

Every family gets a 64-wide, two- or three-block model over the tiny byte-level BPE of the serving tests
(320 tokens), so a training step, a save, an NF4 load or a short generation takes well under a second.
What each family brings that the others do not:

    llama      the reference shape (SmolLM2, Llama 2/3)
    mistral    a sliding window on every layer (8 tokens, shorter than the test prompts)
    qwen2      q/k/v biases
    qwen3      per-head q/k RMSNorm, head_dim (32) != hidden / heads
    gemma2     alternating sliding / global layers, attention and final logit soft-capping, tied head
    gemma3     sliding / global layers with their own rope, final logit soft-capping, embeddings
               scaled by sqrt(hidden), tied head
    phi3       fused qkv_proj and gate_up_proj
    gpt2       Conv1D layers (transposed weights), learned positions, biases everywhere
    gpt_neox   fused query_key_value, partial rotary, parallel residual
    olmo2      q/k RMSNorm over the whole projection, norms after the blocks
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as t

from lorafit.lora.inject import lora_layers
from tests.serve.tiny import make_tokenizer

WINDOW = 8  # sliding-window width of mistral, gemma2 and gemma3: the serving prompts run past it


def _common(tok) -> dict:
    return {"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
            "bos_token_id": None, "max_position_embeddings": 256}


def _decoder(tok) -> dict:
    return {**_common(tok), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2}


CONFIGS = {
    "llama": lambda tok: t.LlamaConfig(**_decoder(tok), tie_word_embeddings=False),
    "mistral": lambda tok: t.MistralConfig(**_decoder(tok), sliding_window=WINDOW),
    "qwen2": lambda tok: t.Qwen2Config(**_decoder(tok)),
    "qwen3": lambda tok: t.Qwen3Config(**_decoder(tok), head_dim=32),
    "gemma2": lambda tok: t.Gemma2Config(**_decoder(tok), head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
                                         attn_implementation="eager"),
    "gemma3": lambda tok: t.Gemma3TextConfig(
        **{**_decoder(tok), "num_hidden_layers": 3}, head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], final_logit_softcapping=30.0,
        attn_implementation="eager"),
    "phi3": lambda tok: t.Phi3Config(**_decoder(tok)),
    "gpt2": lambda tok: t.GPT2Config(**_common(tok), n_embd=64, n_layer=2, n_head=4),
    "gpt_neox": lambda tok: t.GPTNeoXConfig(**_decoder(tok)),
    "olmo2": lambda tok: t.Olmo2Config(**_decoder(tok)),
}
FAMILIES = list(CONFIGS)

# What `target_modules=None` adapts in each family: every projection of attention and MLP.
DEFAULTS = {
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "olmo2"],
                    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
    "gpt2": {"c_attn", "c_proj", "c_fc"},
    "gpt_neox": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"},
}


def tokenizer():
    return make_tokenizer()


def make_model(family: str, tok, seed: int = 0):
    """A tiny random model of `family`; 1-D weights (norms, biases) random too, so none hides as 1 or 0."""
    torch.manual_seed(seed)
    model = t.AutoModelForCausalLM.from_config(CONFIGS[family](tok)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_model(family: str, tok, folder: Path) -> Path:
    """`make_model(family)` and the tokenizer as an HF folder (what load_model and the server read)."""
    make_model(family, tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def randomize(model, adapter: str = "default", seed: int = 1, std: float = 0.2) -> None:
    """Random A and B for `adapter`: a zero B would make every comparison pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for p in (layer.lora_A[adapter], layer.lora_B[adapter]):
                p.copy_(torch.randn(p.shape, generator=g) * std)
