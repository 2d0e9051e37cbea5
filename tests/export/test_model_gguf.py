"""A merged model exported to GGUF computes, in llama.cpp, what transformers computes (acceptance 1),
and reads back through transformers' own GGUF reader (acceptance 4).

Errors are relative max errors, max |llama.cpp - transformers| / max |transformers|, over every
position's logits of a fixed prompt. At f32 the KV cache is f32 too, so the file is compared at f32
end to end; what remains is llama.cpp's arithmetic: its GELU (Gemma) reads a float16 table, which
alone accounts for Gemma 3's ~5e-4 (the Llama-type families match to ~1e-6).
"""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import lorafit as lf
from lorafit.export import export_gguf
from lorafit.merge import merge_to_dense
from tests.export.kit import (
    EXTRA_TEXT,
    FAMILIES,
    hf_logits,
    llama,
    llama_logits,
    needs_llama_cpp,
    rel_max_err,
    tiny_model,
)

PROMPT = "Convert the date to ISO format (YYYY-MM-DD). the third of March, nineteen ninety-eight -> 1998-03-03"
BOUND = {"f32": 1e-3, "f16": 1e-2, "bf16": 3e-2}  # bf16 (beyond the acceptance): 8 significant bits, not 11


def adapted(model, seed: int = 1, std: float = 0.05):
    """`model` with an all-linear rank-4 adapter whose B is not zero (the merge must show)."""
    lf.apply_lora(model, lf.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def text_ids(tokenizer, n: int = 64) -> list[int]:
    ids = tokenizer(" ".join([PROMPT, *EXTRA_TEXT, PROMPT.upper()]))["input_ids"][:n]
    assert len(ids) == n
    return ids


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory):
    """family -> (base model, merged model, tokenizer, {outtype: gguf path})."""
    folder, made = tmp_path_factory.mktemp("tiny-gguf"), {}
    for family, (_, make_tokenizer) in FAMILIES.items():
        tok = make_tokenizer()
        base = tiny_model(family, len(tok) + (5 if family == "qwen2" else 0))  # Qwen pads its embedding rows
        merged = merge_to_dense(adapted(tiny_model(family, base.config.vocab_size)), torch.float32)
        paths = {t: export_gguf(merged, tok, folder / f"{family}-{t}.gguf", t).path for t in ("f32", "f16", "bf16", "q8_0", "q4_0")}
        made[family] = (base, merged, tok, paths)
    return made


@needs_llama_cpp
@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_llama_cpp_logits_match_the_merged_model(family, outtype, tiny_exports):
    base, merged, tok, paths = tiny_exports[family]
    ids = tok(PROMPT)["input_ids"]
    want = hf_logits(merged, ids)
    got = llama_logits(paths[outtype], ids, f32_cache=outtype == "f32")
    assert rel_max_err(got, want) <= BOUND[outtype]
    assert rel_max_err(hf_logits(base, ids), want) > 0.1  # the adapter is in there, well above the bounds


@needs_llama_cpp
@pytest.mark.parametrize("family", list(FAMILIES))
def test_q8_0_greedy_tokens_agree(family, tiny_exports):
    _, merged, tok, paths = tiny_exports[family]
    ids = text_ids(tok)
    agree = (llama_logits(paths["q8_0"], ids, f32_cache=False).argmax(-1) == hf_logits(merged, ids).argmax(-1)).mean()
    assert agree >= 0.95


@needs_llama_cpp
@pytest.mark.parametrize("family", list(FAMILIES))
def test_q4_0_runs_and_mostly_agrees(family, tiny_exports):
    """q4_0 (beyond the acceptance): 4-bit weights move tiny random models more; a loose check."""
    _, merged, tok, paths = tiny_exports[family]
    ids = text_ids(tok)
    agree = (llama_logits(paths["q4_0"], ids, f32_cache=False).argmax(-1) == hf_logits(merged, ids).argmax(-1)).mean()
    print(f"{family} q4_0 greedy agreement {agree:.2f}")
    assert agree >= 0.6


@needs_llama_cpp
def test_metadata_says_what_it_holds(tiny_exports):
    _, merged, _, paths = tiny_exports["gemma3"]
    meta = llama(paths["q8_0"]).metadata
    assert meta["general.architecture"] == "gemma3" and meta["general.file_type"] == "7"  # MOSTLY_Q8_0
    assert meta["gemma3.attention.sliding_window"] == "4" and meta["gemma3.block_count"] == "6"
    assert "<start_of_turn>" in meta["tokenizer.chat_template"]


@needs_llama_cpp
@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_smollm2_with_the_demo_adapter(outtype, smollm2_merged, smollm2_gguf):
    model, tok = smollm2_merged
    ids = tok(PROMPT)["input_ids"]
    got = llama_logits(smollm2_gguf(outtype), ids, f32_cache=outtype == "f32")
    assert rel_max_err(got, hf_logits(model, ids)) <= BOUND[outtype]


@needs_llama_cpp
def test_smollm2_q8_0_greedy_tokens_agree(smollm2_merged, smollm2_gguf):
    model, tok = smollm2_merged
    ids = text_ids(tok)
    agree = (llama_logits(smollm2_gguf("q8_0"), ids, f32_cache=False).argmax(-1) == hf_logits(model, ids).argmax(-1))
    assert agree.mean() >= 0.95


# -- acceptance 4: transformers' GGUF reader ------------------------------------------------------
def _reader_compatible(family: str, vocab: int):
    """Tiny configs within what transformers' GGUF reader rebuilds from the metadata: it ignores
    rope_freqs, attention biases of Llama, Qwen3's head_dim and Gemma 3's query scale and rope
    scaling, and falls back to its defaults for them (head_dim 128 / 256, scale 256)."""
    import transformers as t

    torch.manual_seed(0)
    small = {"vocab_size": vocab, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "max_position_embeddings": 256}
    model = {
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(**small, num_attention_heads=4, num_key_value_heads=2)),
        "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**small, num_attention_heads=4, num_key_value_heads=2)),
        "qwen3": lambda: t.Qwen3ForCausalLM(t.Qwen3Config(**small, num_attention_heads=2, num_key_value_heads=1,
                                                          head_dim=128)),
        "gemma3": lambda: t.Gemma3ForCausalLM(t.Gemma3TextConfig(
            **{**small, "num_hidden_layers": 6}, num_attention_heads=2, num_key_value_heads=1, head_dim=256,
            query_pre_attn_scalar=256, sliding_window=4, attn_implementation="eager")),
    }[family]().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformers_reads_the_file_back(family, tmp_path):
    tok = FAMILIES[family][1]()
    merged = merge_to_dense(adapted(_reader_compatible(family, len(tok))), torch.float32)
    export_gguf(merged, tok, tmp_path / "m.gguf", "f32")
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = tok(PROMPT)["input_ids"]
    assert rel_max_err(hf_logits(back, ids), hf_logits(merged, ids)) <= 1e-5


def test_transformers_reads_the_smollm2_export_back(smollm2_merged, smollm2_gguf):
    from transformers import AutoTokenizer

    path = smollm2_gguf("f32")
    model, tok = smollm2_merged
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = tok(PROMPT)["input_ids"]
    assert rel_max_err(hf_logits(back, ids), hf_logits(model, ids)) <= 1e-5
    back_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert back_tok(PROMPT)["input_ids"] == ids and np.isclose(len(back_tok), len(tok))
