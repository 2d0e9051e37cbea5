"""Loading bases: the bundled GGUF becomes a trainable, savable transformers model; bad paths fail clearly."""

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import lorafit as lf
from lorafit.model import load_model, resolve_model


def test_default_model_is_plain_and_trainable(smollm2_dir, tmp_path):
    model, tokenizer = load_model(smollm2_dir)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    assert tokenizer.chat_template and tokenizer.pad_token is not None
    assert resolve_model("SmolLM2-135M-Instruct") == smollm2_dir  # cached: no second conversion
    model.save_pretrained(tmp_path / "saved")  # transformers refuses this for a GGUF-marked model


def test_adapter_on_real_smollm2_loads_in_peft(smollm2_dir, tmp_path):
    """The real model, where it matters: our adapter file reproduces our logits inside PEFT."""
    model, tokenizer = load_model(smollm2_dir)
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    lf.apply_lora(model, lf.LoraConfig(r=8, alpha=16, init="random"))
    ours = model(ids).logits
    lf.save_adapter(model, tmp_path)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    theirs = PeftModel.from_pretrained(base, tmp_path)(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_bad_model_paths(tmp_path):
    with pytest.raises(lf.LorafitError, match="not found.*never downloaded"):
        resolve_model(tmp_path / "missing")
    with pytest.raises(lf.LorafitError, match="no config.json"):
        resolve_model(tmp_path)
