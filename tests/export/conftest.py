"""Session fixtures of the export tests: the merged model of the demo adapter (tests/conftest.py),
and its GGUF exports (made once, shared by the parity, chat and round-trip tests); tiny model folders
and adapters for the command tests."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lorafit.config import IA3Config
from lorafit.io import save_adapter
from lorafit.lora.inject import apply_lora
from lorafit.model import load_model
from lorafit.quant.load import load_quantized, save_bnb_checkpoint
from tests.export.kit import FAMILIES, bpe_tokenizer, random_adapter, tiny_model


@pytest.fixture(scope="session")
def smollm2_merged(demo_adapter):
    """(SmolLM2 + the demo adapter merged exactly in fp32 into the NF4 base it trained on, dequantized; its
    tokenizer): what `lorafit export` writes for it."""
    from lorafit.io import load_adapter
    from lorafit.merge import merge_to_dense
    from lorafit.model import load_model

    model, tokenizer = load_model(None, quantize="nf4")
    load_adapter(model, demo_adapter[0])
    return merge_to_dense(model, torch.float32).eval(), tokenizer


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2_merged, tmp_path_factory):
    """outtype -> path of the merged SmolLM2 exported at that outtype (each written once)."""
    from lorafit.export import export_gguf

    folder, made = tmp_path_factory.mktemp("smollm2-gguf"), {}

    def get(outtype: str):
        if outtype not in made:
            made[outtype] = export_gguf(*smollm2_merged, folder / f"smollm2-demo-{outtype}.gguf", outtype).path
        return made[outtype]

    return get


@pytest.fixture(scope="session")
def files(tmp_path_factory):
    """Model folders and adapters for the commands: a tiny Llama (and its NF4 bitsandbytes checkpoint),
    a GPT-2 (no GGUF export), and adapters for the Llama, for a different Llama, with modules_to_save."""
    root = tmp_path_factory.mktemp("files")
    tok = FAMILIES["llama"][1]()
    tiny_model("llama", len(tok)).save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    save_bnb_checkpoint(load_quantized(root / "llama", "nf4"), root / "llama-nf4")
    tok.save_pretrained(root / "llama-nf4")
    save_adapter(random_adapter(load_model(root / "llama")[0]), root / "adapter")
    save_adapter(random_adapter(load_model(root / "llama")[0], target_modules=["q_proj"], modules_to_save=["lm_head"]),
                 root / "adapter-mts")
    save_adapter(apply_lora(load_model(root / "llama")[0], IA3Config()), root / "adapter-ia3")
    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    save_adapter(random_adapter(other), root / "adapter-other")
    gpt2_tok = bpe_tokenizer("gpt-2", vocab_size=300)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(gpt2_tok), n_embd=32, n_layer=1, n_head=2, bos_token_id=0,
                                      eos_token_id=0)).save_pretrained(root / "gpt2")
    gpt2_tok.save_pretrained(root / "gpt2")
    return root
