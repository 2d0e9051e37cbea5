"""The family matrix, QLoRA side: every family loads with its linear layers in NF4 and takes a QLoRA step.

The folder is read layer by layer (`load_model(quantize="nf4")`): every linear of every block becomes an
`NF4Linear` (GPT-2's Conv1D layers too, transposed as bitsandbytes does), the head and embeddings stay in
full precision (and so do the layers a fused training kernel reads by weight: Granite 4's Mamba out_proj), the NF4 model computes what its dequantized weights say, and one Trainer step on the
default adapter moves it.
"""

from __future__ import annotations

import pytest
import torch

import lorafit as lf
from lorafit.lora.base import is_linear
from lorafit.model import load_model
from lorafit.modules import path_matches, read_by_weight
from lorafit.quant.linear import NF4Linear
from lorafit.train.data import Record, tokenize_record
from lorafit.train.trainer import TrainConfig, Trainer
from tests.families.kit import FAMILIES, make_model, save_model, tokenizer
from tests.families.test_adapters import RECORDS


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.mark.parametrize("family", FAMILIES)
def test_nf4_load_and_qlora_step(family, tok, tmp_path):
    folder = save_model(family, tok, tmp_path / "model")
    model, _ = load_model(folder, quantize="nf4")
    dense = make_model(family, tok)
    linears = {n for n, m in dense.named_modules() if is_linear(m) and m is not dense.get_output_embeddings()
               and not path_matches(n, read_by_weight(dense))}
    assert {n for n, m in model.named_modules() if isinstance(m, NF4Linear)} == linears
    ids = torch.tensor([tok("the quick brown fox jumps over the lazy dog")["input_ids"]])
    with torch.no_grad():  # the quantized model is the dense one with its weights rounded to NF4
        for name in linears:
            layer = model.get_submodule(name)
            weight = layer.dequantize().float()
            target = dense.get_submodule(name)
            if type(target).__name__ == "Conv1D":
                target.weight.copy_(weight.T)
            else:
                target.weight.copy_(weight)
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, atol=1e-4, rtol=1e-4)
    samples = [tokenize_record(tok, Record("alpaca", r, f"mem:{i}")) for i, r in enumerate(RECORDS)]
    lf.apply_lora(model, lf.LoraConfig(r=4, init="random"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    history = Trainer(TrainConfig(output_dir=str(tmp_path / "run"), lora=lf.LoraConfig(r=4), max_steps=1, batch_size=3,
                                  learning_rate=1e-2), model, tok, samples).train()
    assert torch.isfinite(torch.tensor(history[0]["loss"]))
    assert before and all(not torch.equal(p, dict(model.named_parameters())[n]) for n, p in before.items()
                          if "lora_A" in n)
