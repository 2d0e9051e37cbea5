"""method: full on a tiny Llama with the real SmolLM2 tokenizer: every weight trains, the run writes a
model folder transformers loads, a checkpoint resumes exactly, a quantized base is refused untouched."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorafit.errors import LorafitError
from lorafit.lora.inject import trainable_parameters
from lorafit.quant.apply import quantize_model
from lorafit.train.data import DataConfig, load_data
from lorafit.train.demo_task import make_dataset, write_jsonl
from lorafit.train.full import MODEL_DIR
from lorafit.train.trainer import TrainConfig, Trainer


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))


@pytest.fixture(scope="module")
def samples(tokenizer, tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("data") / "dates.jsonl", make_dataset(16, seed=3))
    return load_data(tokenizer, DataConfig(path=str(path), val_fraction=0.25, seed=0))


def _config(out, **kw):
    return TrainConfig(**{"output_dir": str(out), "method": "full", "batch_size": 4, "learning_rate": 1e-3,
                          "max_steps": 3, "save_steps": 2, "warmup_ratio": 0.0, **kw})


def test_full_fine_tune_trains_every_weight_writes_a_model_and_resumes(tokenizer, samples, tmp_path):
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(_config(tmp_path / "a"), model, tokenizer, samples.train)
    trainable, total = trainable_parameters(model)
    assert trainable == total == sum(p.numel() for p in model.parameters())
    history = trainer.train()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)  # every weight moved (AdamW's first step moves all of them)

    saved = LlamaForCausalLM.from_pretrained(tmp_path / "a" / MODEL_DIR)
    for name, p in model.named_parameters():
        torch.testing.assert_close(saved.get_parameter(name), p, atol=0, rtol=0)
    assert (tmp_path / "a" / MODEL_DIR / "tokenizer.json").is_file()
    assert not (tmp_path / "a" / "adapter").exists()

    # a second run in a copy of the folder resumes from the step-2 checkpoint: step 3 as before
    resumed_out = tmp_path / "b"
    (resumed_out / "checkpoints").mkdir(parents=True)
    ckpt = next((tmp_path / "a" / "checkpoints").glob("step-00000002"))
    (resumed_out / "checkpoints" / ckpt.name).symlink_to(ckpt)
    resumed = Trainer(_config(resumed_out), tiny_llama(seed=1), tokenizer, samples.train).train(resume=True)
    assert resumed[-1]["step"] == 3
    assert resumed[-1]["loss"] == pytest.approx(history[-1]["loss"], rel=1e-5)


def test_full_on_a_quantized_base_is_refused_before_anything_changes(tokenizer, samples, tmp_path):
    model = quantize_model(tiny_llama(), "nf4")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(LorafitError, match="quantize: null"):
        Trainer(_config(tmp_path), model, tokenizer, samples.train)
    assert not any(p.requires_grad for p in model.parameters())


def test_method_is_checked():
    with pytest.raises(LorafitError, match="TrainConfig.method"):
        TrainConfig(method="fulll")
