"""Model cards: save_adapter writes a README.md that huggingface_hub.ModelCard parses, PEFT still loads the folder,
base_model only for Hub ids, an existing README keeps its text; GGUF cards say library_name: gguf."""

import pytest
import torch
from huggingface_hub import ModelCard

import lorafit as lf
from lorafit.card import gguf_card, is_hub_id, split_card, write_card
from tests.conftest import make_llama

HISTORY = [{"step": 1, "loss": 2.5, "lr": 1e-3}, {"step": 2, "loss": 2.0, "lr": 1e-3, "val_loss": 2.1, "val_ppl": 8.2},
           {"step": 3, "loss": 1.5, "lr": 5e-4, "val_loss": 1.9, "rewards/accuracies": 0.75}]
TRAINING = {"quantize": "nf4", "total_steps": 3, "learning_rate": 1e-3, "batch_size": 4, "seed": 0,
            "history": HISTORY}


def _adapted(name_or_path: str, use_dora: bool = False):
    model = make_llama()
    model.config._name_or_path = name_or_path
    lf.apply_lora(model, lf.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], use_dora=use_dora))
    with torch.no_grad():
        for p in lf.adapter_parameters(model):  # B starts at zero: make the adapter change the outputs
            p.normal_(0, 0.02)
    return model


def test_card_parses_with_hub_id_and_peft_loads_the_folder(tmp_path):
    from peft import PeftModel

    model = _adapted("HuggingFaceTB/SmolLM2-135M-Instruct")
    folder = lf.save_adapter(model, tmp_path / "adapter", training=TRAINING)
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "peft" and card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.tags == ["qlora", "lorafit", "sft"] and card.data.pipeline_tag == "text-generation"
    text = card.text
    for expected in ("| r | 4 |", "| alpha | 8 |", "q_proj", "| quantization | nf4 |", "| steps | 3 |",
                     "| learning rate | 0.001 |", "| step | train loss | validation loss | rewards/accuracies |",
                     "| 3 | 1.5 | 1.9 | 0.75 |", "torch ", "transformers "):
        assert expected in text, expected
    base = make_llama()
    peft_model = PeftModel.from_pretrained(base, folder)
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        assert torch.allclose(peft_model(ids).logits, model(ids).logits, atol=1e-5)


def test_base_model_absent_for_a_local_path(tmp_path):
    local = tmp_path / "my-base"
    local.mkdir()
    model = _adapted(str(local), use_dora=True)
    folder = lf.save_adapter(model, tmp_path / "adapter")
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model is None and "base_model" not in card.content.split("---")[1]
    assert card.data.tags == ["dora", "lorafit"]
    assert not is_hub_id(str(local)) and not is_hub_id("./org/name") and not is_hub_id("../a/b")
    assert is_hub_id("meta-llama/Llama-3.1-8B") and not is_hub_id("gpt2")


def test_an_existing_readme_keeps_its_text_and_fields(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: apache-2.0\ntags:\n- dates\n---\n# My adapter\n\nIt writes ISO dates.\n")
    model = _adapted("org/base")
    lf.save_adapter(model, folder, training=TRAINING)
    lf.save_adapter(model, folder, training={**TRAINING, "total_steps": 9})  # a second save replaces our section only
    text = (folder / "README.md").read_text()
    meta, body = split_card(text)
    assert meta["license"] == "apache-2.0" and meta["tags"] == ["qlora", "lorafit", "sft", "dates"]
    assert meta["library_name"] == "peft" and meta["base_model"] == "org/base"
    assert body.startswith("# My adapter\n\nIt writes ISO dates.\n")
    assert body.count("<!-- lorafit:begin -->") == 1 and "| steps | 9 |" in body and "| steps | 3 |" not in body
    assert ModelCard.load(folder / "README.md").data.license == "apache-2.0"


def test_gguf_card(tmp_path):
    path = write_card(tmp_path, *gguf_card(tmp_path / "model-q8_0.gguf", "org/base", "merged model", "q8_0"),
                      title="model")
    card = ModelCard.load(path)
    assert card.data.library_name == "gguf" and card.data.base_model == "org/base" and "gguf" in card.data.tags
    assert "model-q8_0.gguf" in card.text


@pytest.mark.parametrize("broken", ["---\n: [\n---\nbody\n", "no front matter at all\n"])
def test_unreadable_front_matter_is_kept_as_text(tmp_path, broken):
    (tmp_path / "README.md").write_text(broken)
    write_card(tmp_path, {"library_name": "peft", "tags": ["lora"]}, "ours", title="t")
    meta, body = split_card((tmp_path / "README.md").read_text())
    assert meta["library_name"] == "peft" and broken in body
