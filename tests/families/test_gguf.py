"""The family matrix, GGUF side: the merged model and the adapter alone, run by the real llama.cpp.

For every family lorafit's GGUF writer knows (lorafit/export/arch.py), `lorafit export --format gguf` of
base + adapter gives llama.cpp the merged model's logits, and `--format gguf-lora` gives llama.cpp (base GGUF
plus the LoRA GGUF) the adapted model's logits. Every other family is refused in one line before anything is
written, naming the llama.cpp architecture where llama.cpp has one and what lorafit does not lay out yet.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import transformers as t
from transformers import AutoTokenizer

import lorafit as lf
from lorafit.errors import LorafitError
from lorafit.export.arch import family_for
from lorafit.export.run import export_command
from tests.export.kit import LLAMA_CPP_REASON, hf_logits, llama_logits, rel_max_err
from tests.families import matrix
from tests.families.kit import CONFIGS, FAMILIES, randomize, tokenizer

BOUND = 1e-3  # f32 files, as tests/export bounds them (llama.cpp accumulates in its own order)
PROMPT = "the quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


def model_for(family: str, tok, vocab: int | None = None):
    """The family's tiny model (as kit.make_model: seeded, random norms); Gemma 3 with llama.cpp's layer pattern
    (every 6th layer global), which the matrix's 3-layer config does not have; `vocab` rows when the folder's
    tokenizer reloads with more tokens (transformers reads a qwen2 folder's tokenizer as Qwen2Tokenizer,
    which adds <|endoftext|>)."""
    config = CONFIGS[family](tok)
    if family == "gemma3":
        config.num_hidden_layers = 6
        config.layer_types = ["sliding_attention"] * 5 + ["full_attention"]
    config.vocab_size = vocab or config.vocab_size
    torch.manual_seed(0)
    model = t.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_model_and_adapter(family, tok, tmp_path):
    base = model_for(family, tok)
    try:
        family_for(base.config)
    except LorafitError as e:
        assert "\n" not in str(e) and "GGUF" in str(e)
        folder = tmp_path / "model"
        base.save_pretrained(folder)
        tok.save_pretrained(folder)
        with pytest.raises(LorafitError, match="GGUF"):  # the command refuses it before writing anything
            export_command(str(folder), None, "gguf", "f32", str(tmp_path / "out.gguf"))
        assert not (tmp_path / "out.gguf").exists()
        matrix.refused(family, "GGUF (model + adapter)", str(e).split("; it exports")[0].split("; supported:")[0])
        return
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip(LLAMA_CPP_REASON)
    folder = tmp_path / "model"
    base.config.save_pretrained(folder)  # the tokenizer class transformers picks depends on the config
    tok.save_pretrained(folder)
    vocab = len(AutoTokenizer.from_pretrained(folder))
    base = model_for(family, tok, vocab)
    base.save_pretrained(folder)
    adapted = lf.apply_lora(model_for(family, tok, vocab), lf.LoraConfig(r=4, alpha=8))
    randomize(adapted, std=0.1)
    lf.save_adapter(adapted, tmp_path / "adapter")
    ids = tok(PROMPT)["input_ids"]
    want = hf_logits(adapted, ids)
    assert rel_max_err(hf_logits(base, ids), want) > 0.01  # the adapter matters
    export_command(str(folder), str(tmp_path / "adapter"), "gguf", "f32", str(tmp_path / "merged.gguf"))
    assert rel_max_err(llama_logits(tmp_path / "merged.gguf", ids), want) <= BOUND
    export_command(str(folder), None, "gguf", "f32", str(tmp_path / "base.gguf"))
    export_command(str(folder), str(tmp_path / "adapter"), "gguf-lora", "f32", str(tmp_path / "lora.gguf"))
    assert rel_max_err(llama_logits(tmp_path / "base.gguf", ids, lora=tmp_path / "lora.gguf"), want) <= BOUND
