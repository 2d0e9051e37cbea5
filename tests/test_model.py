"""Loading bases: the bundled GGUF becomes a trainable, savable transformers model; bad paths fail clearly."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import lorafit as lf
from lorafit.model import is_default_name, load_model, public_name, resolve_model
from tests.conftest import MAKERS
from tests.serve.tiny import make_tokenizer


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


def test_public_name_is_what_an_adapter_records_as_its_base(tmp_path):
    assert public_name(None) == public_name("SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert public_name(tmp_path / "hub" / "models--Qwen--Qwen2.5-0.5B" / "snapshots" / "abc123") == "Qwen/Qwen2.5-0.5B"
    assert public_name("models/my-llama") == "models/my-llama"
    assert is_default_name("HuggingFaceTB/SmolLM2-135M-Instruct") and not is_default_name("other")


def test_a_small_model_loads_without_a_progress_bar_and_records_its_name(tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    folder = tmp_path / "models--org--tiny" / "snapshots" / "0123"  # as the Hugging Face hub's cache keeps it
    MAKERS["llama"]().save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    capfd.readouterr()
    assert hf_logging.is_progress_bar_enabled()
    model, _ = load_model(folder)
    assert "Loading weights" not in capfd.readouterr().err  # seconds at most: no bar
    assert hf_logging.is_progress_bar_enabled()  # and the setting is as it was
    lf.apply_lora(model, lf.LoraConfig(r=2))
    lf.save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/tiny"


def test_a_wrong_base_error_names_the_base_the_adapter_records(tmp_path):
    model = lf.apply_lora(MAKERS["llama"](), lf.LoraConfig(r=2))
    model.config._name_or_path = "org/the-right-base"
    lf.save_adapter(model, tmp_path / "adapter")
    with pytest.raises(lf.AdapterError) as err:
        lf.load_adapter(MAKERS["gpt2"](), tmp_path / "adapter")
    assert str(err.value).endswith("(it was trained on 'org/the-right-base': load that base, e.g. "
                                   "--model org/the-right-base)")
