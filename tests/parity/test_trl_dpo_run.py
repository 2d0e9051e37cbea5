"""A 3-step `lorafit train` DPO run equals TRL 1.16's DPOTrainer run, step by step, on a tiny model.

Both start from the same PEFT adapter (B != 0, so both references are that adapter), with the same
pairs (one batch = the whole set), AdamW at a constant learning rate, no warmup, clipping 1.0, no dropout,
fp32 on the CPU. The per-step losses (and reward accuracies) agree to 1e-4.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from peft import LoraConfig as PeftLoraConfig  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402

from lorafit.cli import main  # noqa: E402
from lorafit.model import default_gguf  # noqa: E402
from tests.parity.test_trl_preference import CHAT_PAIRS  # noqa: E402

STEPS, LR = 3, 2e-3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama with SmolLM2's tokenizer, and a PEFT adapter on it with random A and B."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=128)).save_pretrained(root / "model")
    gguf = default_gguf()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(root / "model")
    peft = get_peft_model(LlamaForCausalLM.from_pretrained(root / "model"),
                          PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    peft.save_pretrained(root / "adapter")
    return root


def trl_run(root, records, tmp_path) -> list[dict]:
    tok = AutoTokenizer.from_pretrained(root / "model")
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(root / "model"), root / "adapter",
                                      is_trainable=True)
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(records), max_steps=STEPS,
                         learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                         optim="adamw_torch", weight_decay=0.0, logging_steps=1, use_cpu=True, bf16=False,
                         gradient_checkpointing=False, save_strategy="no", report_to=[], disable_tqdm=True,
                         max_length=128, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tok)
        trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def test_three_lorafit_train_steps_equal_trl_dpo_trainer(model_dir, tmp_path, capsys):
    records = CHAT_PAIRS  # chat pairs; plain-text tokenization is compared with TRL's in test_trl_preference.py
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "lorafit"
    status = main(["train", "--model", str(model_dir / "model"), "--data", str(data), "--method", "dpo",
                   "--adapter", str(model_dir / "adapter"), "--batch-size", str(len(records)), "--max-steps", str(STEPS),
                   "--learning-rate", str(LR), "--schedule", "constant", "--warmup-ratio", "0", "--max-grad-norm", "1.0",
                   "--data.max-seq-length", "128", "--device", "cpu", "--dtype", "float32", "--output-dir", str(out)])
    assert status == 0, capsys.readouterr().err[-2000:]
    ours = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    theirs = trl_run(model_dir, records, tmp_path)
    assert len(ours) == len(theirs) == STEPS
    for a, b in zip(ours, theirs):
        assert abs(a["loss"] - float(b["loss"])) <= 1e-4, (a["loss"], b["loss"])
        assert a["rewards/accuracies"] == pytest.approx(float(b["rewards/accuracies"]), abs=1e-6)
        assert a["rewards/margins"] == pytest.approx(float(b["rewards/margins"]), abs=1e-4)
    assert ours[-1]["loss"] < ours[0]["loss"] - 1e-3  # it trained
