"""Supported families, and model options llama.cpp could not compute refused before anything is written."""

import pytest
from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig, Qwen2Config, Qwen3Config

from lorafit.errors import LorafitError
from lorafit.export.arch import family_for


def test_supported_families():
    assert family_for(LlamaConfig()).arch_name == "llama"
    assert family_for(Qwen2Config()).arch_name == "qwen2"
    assert family_for(Qwen3Config()).arch_name == "qwen3"
    assert family_for(Gemma3TextConfig()).arch_name == "gemma3"
    assert family_for(LlamaConfig(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 8192})).permute_qk


def test_unsupported_architecture_names_itself_and_the_supported_ones():
    with pytest.raises(LorafitError) as err:
        family_for(GPT2Config(architectures=["GPT2LMHeadModel"]))
    assert str(err.value) == ("model_type 'gpt2' (GPT2LMHeadModel) cannot be exported to GGUF; supported: Llama (llama), "
                              "Qwen2 (qwen2), Qwen3 (qwen3), Gemma 3 (text) (gemma3_text), SmolLM3 (smollm3)")


@pytest.mark.parametrize("config, words", [
    (LlamaConfig(mlp_bias=True), "mlp_bias=True"),
    (LlamaConfig(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "rope_type='yarn'"),
    (Qwen2Config(use_sliding_window=True), "use_sliding_window"),
    (Qwen3Config(attention_bias=True), "attention_bias"),
    (Gemma3TextConfig(num_hidden_layers=6, head_dim=16, query_pre_attn_scalar=256), "query_pre_attn_scalar=256"),
    (Gemma3TextConfig(num_hidden_layers=6, layer_types=["full_attention"] * 6), "sliding-window layer pattern"),
    (Gemma3TextConfig(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                       "sliding_attention": {"rope_type": "default", "rope_theta": 5e4}}), "theta 10000"),
])
def test_options_llama_cpp_cannot_compute_are_refused(config, words):
    with pytest.raises(LorafitError, match="cannot compute that") as err:
        family_for(config)
    assert words in str(err.value)
