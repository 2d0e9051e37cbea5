"""The family matrix, adapter side: targets, a training step, PEFT both ways, merge (see kit.py for the families).

For every family: the default targets are every attention and MLP projection and `all-linear` is every
linear but the head; the loss the Trainer takes (the chunked loss from hidden states, or the logits
fallback where a soft-capped head rules the chunks out) equals the model's own; one Trainer step moves
the adapter; our saved adapter gives PEFT our logits and PEFT's gives us theirs; a merged adapter gives
the unmerged logits.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

import lorafit as lf
from lorafit.lora.base import is_linear
from lorafit.lora.inject import lora_layers
from lorafit.train.data import Record, collate, pad_id_for, tokenize_record
from lorafit.train.trainer import TrainConfig, Trainer, loss_sum, n_targets
from tests.families.kit import DEFAULTS, FAMILIES, make_model, randomize, tokenizer

TOL = 1e-5
MERGE_TOL = 5e-5  # a merged weight rounds differently; linear attention and convolutions carry it to 2e-5 in fp32
RECORDS = [{"instruction": "the quick brown fox", "output": "jumps over the lazy dog"},
           {"instruction": "hello world", "input": "tokens stream back", "output": "as they come"},
           {"instruction": "a server answers", "output": "many clients at once"}]


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


def _batch(tok):
    samples = [tokenize_record(tok, Record("alpaca", r, f"mem:{i}")) for i, r in enumerate(RECORDS)]
    return samples, collate(samples, pad_id_for(tok))


@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets_and_all_linear(family, tok):
    model = lf.apply_lora(make_model(family, tok), lf.LoraConfig(r=4))
    assert {p.rsplit(".", 1)[-1] for p, _ in lora_layers(model)} == DEFAULTS[family]
    every = lf.apply_lora(make_model(family, tok), lf.LoraConfig(r=4, target_modules="all-linear"))
    head = every.get_output_embeddings()
    linears = {n for n, m in make_model(family, tok).named_modules() if is_linear(m)} - {"lm_head", "embed_out"}
    assert {p for p, _ in lora_layers(every)} == linears and head not in dict(lora_layers(every)).values()


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step(family, tok, tmp_path):
    model = lf.apply_lora(make_model(family, tok), lf.LoraConfig(r=4, init="random"))
    samples, batch = _batch(tok)
    with torch.no_grad():  # the Trainer's loss (chunked, or from the logits) is the model's own loss
        theirs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], labels=batch["labels"]).loss * n_targets(batch)
        torch.testing.assert_close(loss_sum(model, batch), theirs, atol=1e-4, rtol=1e-5)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    history = Trainer(TrainConfig(output_dir=str(tmp_path), lora=lf.LoraConfig(r=4), max_steps=1, batch_size=3,
                                  learning_rate=1e-2), model, tok, samples).train()
    assert torch.isfinite(torch.tensor(history[0]["loss"]))
    after = dict(model.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in before if "lora_A" in n)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_loads_ours_and_we_load_peft(family, tok, tmp_path):
    ids = torch.tensor([tok("the quick brown fox jumps over the lazy dog")["input_ids"]])
    model = lf.apply_lora(make_model(family, tok), lf.LoraConfig(r=4, alpha=8))
    randomize(model)
    ours = model(ids).logits
    lf.save_adapter(model, tmp_path / "ours")
    peft = PeftModel.from_pretrained(make_model(family, tok), tmp_path / "ours").eval()
    torch.testing.assert_close(peft(ids).logits, ours, atol=TOL, rtol=0)

    theirs = get_peft_model(make_model(family, tok), PeftLoraConfig(
        r=4, lora_alpha=8, target_modules=sorted(DEFAULTS[family]), fan_in_fan_out=family == "gpt2")).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    expected = theirs(ids).logits
    theirs.save_pretrained(tmp_path / "theirs")
    back = lf.load_adapter(make_model(family, tok), tmp_path / "theirs")
    torch.testing.assert_close(back(ids).logits, expected, atol=TOL, rtol=0)
    assert not torch.allclose(expected, make_model(family, tok)(ids).logits, atol=1e-3)  # the adapter matters


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_equals_unmerged(family, tok):
    ids = torch.tensor([tok("adapters share one base model in a batch")["input_ids"]])
    model = lf.apply_lora(make_model(family, tok), lf.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize(model)
    with torch.no_grad():
        unmerged = model(ids).logits
        lf.merge_adapter(model)
        torch.testing.assert_close(model(ids).logits, unmerged, atol=MERGE_TOL, rtol=0)
        lf.unmerge_adapter(model)
        torch.testing.assert_close(model(ids).logits, unmerged, atol=MERGE_TOL, rtol=0)
        plain = lf.merge_and_unload(model)
        assert not list(lora_layers(plain))
        torch.testing.assert_close(plain(ids).logits, unmerged, atol=MERGE_TOL, rtol=0)
