"""The adapter alone as a GGUF LoRA: llama.cpp applying it on the exported base computes what the
merged export computes (acceptance 2), and what a GGUF LoRA cannot carry is refused."""

import copy

import pytest
import torch
from gguf import GGUFReader

import lorafit as lf
from lorafit.errors import LorafitError
from lorafit.export import export_gguf, export_gguf_lora
from lorafit.io import read_adapter, save_adapter
from lorafit.merge import merge_to_dense
from tests.export.kit import FAMILIES, hf_logits, llama_logits, needs_llama_cpp, rel_max_err, tiny_model

PROMPT = "the third of March, nineteen ninety-eight -> 1998-03-03, and then some more words"


def random_adapter(model, config: lf.LoraConfig, std: float = 0.05, seed: int = 1):
    lf.apply_lora(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


# per-layer ranks and alphas and rsLoRA: scalings a single adapter.lora.alpha cannot say by itself
PATTERNED = lf.LoraConfig(r=4, alpha=8, target_modules="all-linear", rank_pattern={"q_proj": 2, "down_proj": 6},
                          alpha_pattern={"v_proj": 3.0}, use_rslora=True)


@needs_llama_cpp
@pytest.mark.parametrize("family", list(FAMILIES))
def test_llama_cpp_applies_the_lora_like_the_merged_file(family, tmp_path):
    tok = FAMILIES[family][1]()
    base = tiny_model(family, len(tok))
    export_gguf(base, tok, tmp_path / "base.gguf", "f32")
    model = random_adapter(copy.deepcopy(base), PATTERNED)
    save_adapter(model, tmp_path / "adapter")
    config, state = read_adapter(tmp_path / "adapter")
    export_gguf_lora(config, state, base.config, tmp_path / "lora.gguf")
    ids = tok(PROMPT)["input_ids"]
    exact = hf_logits(model, ids)
    export_gguf(merge_to_dense(model, torch.float32), tok, tmp_path / "merged.gguf", "f32")

    merged = llama_logits(tmp_path / "merged.gguf", ids)
    with_lora = llama_logits(tmp_path / "base.gguf", ids, lora=tmp_path / "lora.gguf")
    assert rel_max_err(with_lora, merged) <= 1e-3
    assert rel_max_err(merged, exact) <= 1e-3
    assert rel_max_err(llama_logits(tmp_path / "base.gguf", ids), merged) > 0.05  # the LoRA does something


def test_file_layout(tmp_path):
    tok = FAMILIES["llama"][1]()
    model = random_adapter(tiny_model("llama", len(tok)), lf.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "adapter")
    config, state = read_adapter(tmp_path / "adapter")
    export_gguf_lora(config, state, model.config, tmp_path / "lora.gguf", outtype="f16")
    reader = GGUFReader(tmp_path / "lora.gguf")
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 8.0 and fields["general.architecture"] == "llama"
    shapes = {t.name: list(t.shape) for t in reader.tensors}  # ggml order: ne[0] first
    assert shapes["blk.0.attn_q.weight.lora_a"] == [64, 4] and shapes["blk.0.attn_q.weight.lora_b"] == [4, 64]
    assert len(shapes) == 4


@pytest.mark.parametrize("case, reason", [
    ("modules_to_save", "modules_to_save"),
    ("embedding", "embedding adapter"),
    ("dora", "DoRA"),
    ("bias", "trains biases"),
])
def test_what_a_gguf_lora_cannot_hold_is_refused(case, reason, tmp_path):
    tok = FAMILIES["qwen2"][1]()
    options = {"modules_to_save": {"modules_to_save": ["lm_head"]}, "embedding": {"target_modules": ["embed_tokens", "q_proj"]},
               "dora": {"use_dora": True}, "bias": {"bias": "lora_only"}}[case]
    model = random_adapter(tiny_model("qwen2", len(tok)), lf.LoraConfig(r=4, **{"target_modules": ["q_proj"], **options}))
    save_adapter(model, tmp_path / "adapter")
    config, state = read_adapter(tmp_path / "adapter")
    with pytest.raises(LorafitError, match=reason) as err:
        export_gguf_lora(config, state, model.config, tmp_path / "lora.gguf", source="adapter")
    assert "\n" not in str(err.value) and "--format gguf" in str(err.value)
    assert not any(tmp_path.glob("*.gguf*"))
