"""LoRA+ in the Trainer: B's parameter group at ratio x the learning rate, and the update that gives."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorafit as lf
from lorafit.errors import LorafitError
from lorafit.lora.inject import lora_layers
from lorafit.train.data import DataConfig, collate, load_data
from lorafit.train.demo_task import make_dataset, write_jsonl
from lorafit.train.trainer import TrainConfig, Trainer

RATIO, LR = 16.0, 1e-3


def _trainer(tokenizer, tmp_path, ratio):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
    path = write_jsonl(tmp_path / "dates.jsonl", make_dataset(8, seed=3))
    samples = load_data(tokenizer, DataConfig(path=str(path), val_fraction=0.0, seed=0))
    config = TrainConfig(output_dir=str(tmp_path / "run"), lora=lf.LoraConfig(r=4, alpha=8, init="random"),
                         batch_size=4, learning_rate=LR, max_steps=1, warmup_ratio=0.0, schedule="constant",
                         max_grad_norm=None, loraplus_lr_ratio=ratio, gradient_checkpointing=False)
    return Trainer(config, model, tokenizer, samples.train), samples.train


def test_b_matrices_get_their_own_group_and_ratio_times_the_update(tokenizer, tmp_path):
    trainer, train = _trainer(tokenizer, tmp_path, RATIO)
    model = trainer.model
    b_ids = {id(layer.lora_B["default"]) for _, layer in lora_layers(model)}
    a_ids = {id(layer.lora_A["default"]) for _, layer in lora_layers(model)}
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert {id(p) for p in groups["lora_B"]["params"]} == b_ids and groups["lora_B"]["lr_ratio"] == RATIO
    assert {id(p) for p in groups["rest"]["params"]} == a_ids and groups["rest"]["lr_ratio"] == 1.0

    trainer.accumulate([collate(train[:4], trainer.pad_id)])
    before = {id(p): p.detach().clone() for g in groups.values() for p in g["params"]}
    # the reference: plain AdamW steps at lr for A and at RATIO * lr for B, on copies with the same grads
    copies = {}
    for p_id, value in before.items():
        copies[p_id] = torch.nn.Parameter(value.clone())
    for g in groups.values():
        for p in g["params"]:
            assert p.grad is not None and p.grad.abs().sum() > 0
            copies[id(p)].grad = p.grad.clone()
    reference = torch.optim.AdamW([{"params": [copies[i] for i in a_ids], "lr": LR},
                                   {"params": [copies[i] for i in b_ids], "lr": RATIO * LR}], weight_decay=0.0)
    reference.step()
    trainer._optimizer_step()
    for g in groups.values():
        assert g["lr"] == LR * g["lr_ratio"]
        for p in g["params"]:
            torch.testing.assert_close(p.detach(), copies[id(p)].detach(), atol=1e-7, rtol=0)
    step_a = torch.stack([(p.detach() - before[id(p)]).abs().mean() for p in groups["rest"]["params"]]).mean()
    step_b = torch.stack([(p.detach() - before[id(p)]).abs().mean() for p in groups["lora_B"]["params"]]).mean()
    assert step_b > 8 * step_a  # Adam's first step moves each entry by about lr: B by about RATIO x more


def test_bad_ratio_is_refused():
    with pytest.raises(LorafitError, match="loraplus_lr_ratio"):
        TrainConfig(loraplus_lr_ratio=0)
