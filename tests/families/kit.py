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

The 2025-26 families (NEW), each with what it adds:

    gemma4            per-layer input embeddings, sliding / global layers (the global ones with a wider head),
                      the last two layers reading the keys and values of earlier ones (KV sharing), logit
                      soft-capping
    qwen3_5           gated DeltaNet linear attention (a recurrent state and a short convolution) beside gated
                      full attention
    qwen3_5_moe       the same with a routed MoE (3-D experts) and a shared expert
    qwen3_next        linear attention + full attention, MoE on every layer
    gpt_oss           3-D experts stored (E, in, out), attention sinks, sliding / full layers, biases
    llama4            chunked attention (8 tokens), a layer without rope, MoE every other layer (3-D experts,
                      top-1, a shared expert), q/k L2 norm
    smollm3           a layer without rope (NoPE) every 4th
    olmo3             sliding / full layers with OLMo 2's norms
    granitemoehybrid  Mamba-2 layers beside attention, embedding / residual / attention / logit multipliers
    lfm2              short gated convolutions beside attention
    ministral3        YaRN rope with attention temperature scaling
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
OLD = list(CONFIGS)

_LINEAR_ATTENTION = {"linear_conv_kernel_dim": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
                     "linear_num_key_heads": 2, "linear_num_value_heads": 4}
_MOE = {"moe_intermediate_size": 32, "num_experts_per_tok": 2}
CONFIGS.update({
    "gemma4": lambda tok: t.Gemma4TextConfig(
        **{**_decoder(tok), "num_hidden_layers": 4}, head_dim=16, sliding_window=WINDOW, final_logit_softcapping=30.0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        num_kv_shared_layers=2, hidden_size_per_layer_input=16, vocab_size_per_layer_input=len(tok),
        per_layer_config={"01": {"head_dim": 32}, "03": {"head_dim": 32}}, attn_implementation="eager"),
    "qwen3_5": lambda tok: t.Qwen3_5TextConfig(
        **{**_decoder(tok), "num_hidden_layers": 3}, head_dim=16, **_LINEAR_ATTENTION,
        layer_types=["linear_attention", "full_attention", "linear_attention"]),
    "qwen3_5_moe": lambda tok: t.Qwen3_5MoeTextConfig(
        **{k: v for k, v in _decoder(tok).items() if k != "intermediate_size"}, head_dim=16, **_LINEAR_ATTENTION,
        **_MOE, shared_expert_intermediate_size=32, num_experts=4, layer_types=["linear_attention", "full_attention"]),
    "qwen3_next": lambda tok: t.Qwen3NextConfig(
        **_decoder(tok), head_dim=16, **_LINEAR_ATTENTION, **_MOE, shared_expert_intermediate_size=32, num_experts=4,
        layer_types=["linear_attention", "full_attention"]),
    "gpt_oss": lambda tok: t.GptOssConfig(
        **_decoder(tok), head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"], rope_parameters={"rope_type": "default", "rope_theta": 1e4},
        attn_implementation="eager"),
    "llama4": lambda tok: t.Llama4TextConfig(
        **{**_decoder(tok), "num_hidden_layers": 4}, intermediate_size_mlp=128, head_dim=16, num_local_experts=4,
        num_experts_per_tok=1, interleave_moe_layer_step=2, attention_chunk_size=WINDOW, no_rope_layer_interval=4,
        attn_implementation="eager"),
    "smollm3": lambda tok: t.SmolLM3Config(**{**_decoder(tok), "num_hidden_layers": 4}, no_rope_layer_interval=4),
    "olmo3": lambda tok: t.Olmo3Config(**{**_decoder(tok), "num_hidden_layers": 4}, sliding_window=WINDOW),
    "granitemoehybrid": lambda tok: t.GraniteMoeHybridConfig(
        **_decoder(tok), layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_n_groups=1, mamba_d_state=16,
        mamba_d_head=32, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=8, num_local_experts=0,
        shared_intermediate_size=128, embedding_multiplier=2.0, logits_scaling=2.0, residual_multiplier=0.5,
        attention_multiplier=0.25),
    "lfm2": lambda tok: t.Lfm2Config(**{**_decoder(tok), "num_hidden_layers": 3}, layer_types=["conv", "full_attention", "conv"],
                                     conv_L_cache=3, block_auto_adjust_ff_dim=False),
    "ministral3": lambda tok: t.Ministral3Config(**_decoder(tok), head_dim=16, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.1}),
})
NEW = [f for f in CONFIGS if f not in OLD]
FAMILIES = list(CONFIGS)
MOE = ("qwen3_5_moe", "qwen3_next", "gpt_oss", "llama4")  # 3-D expert weights (target_parameters)
RECURRENT = ("qwen3_5", "qwen3_5_moe", "qwen3_next", "granitemoehybrid", "lfm2")  # a state along the sequence

# What `target_modules=None` adapts in each family: every projection of attention and MLP.
DEFAULTS = {
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "olmo2"],
                    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
    "gpt2": {"c_attn", "c_proj", "c_fc"},
    "gpt_neox": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"},
    **dict.fromkeys(["gemma4", "smollm3", "olmo3", "ministral3", "llama4"],
                    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    # linear attention: its input and output projections, not the per-head decay / beta gates (a few outputs each)
    "qwen3_5": {"q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "out_proj", "gate_proj",
                "up_proj", "down_proj"},
    "qwen3_5_moe": {"q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "out_proj", "gate_proj",
                    "up_proj", "down_proj"},
    "qwen3_next": {"q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkvz", "out_proj"},
    "gpt_oss": {"q_proj", "k_proj", "v_proj", "o_proj"},  # its MLP is experts only: target_parameters
    "granitemoehybrid": {"q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "input_linear", "output_linear"},
    "lfm2": {"q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w2", "w3"},
}
EXPERTS = {"qwen3_5_moe": ["experts.gate_up_proj", "experts.down_proj"],
           "qwen3_next": ["experts.gate_up_proj", "experts.down_proj"],
           "gpt_oss": ["experts.gate_up_proj", "experts.down_proj"],
           "llama4": ["experts.gate_up_proj", "experts.down_proj"]}


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
