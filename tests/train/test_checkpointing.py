"""A tiny Llama trained with QLoRA + checkpointing (offload on) + the fused path + the chunked loss gives
the same loss and adapter gradients as the plain module path without checkpointing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

import lorafit as lf
from lorafit.lora.inject import set_fused
from lorafit.ops.chunked_loss import causal_lm_loss
from lorafit.quant.apply import quantize_model
from lorafit.train.checkpointing import enable_checkpointing

CFG = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _model(dora: bool, dropout: float, fused: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(CFG)
    quantize_model(model)  # NF4 base, head kept dense
    lf.apply_lora(model, lf.LoraConfig(r=4, alpha=8, dropout=dropout, use_dora=dora,
                                       target_modules="all-linear", init="random"))
    set_fused(model, fused)
    return model.train()


def _batch():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (2, 16), generator=gen)
    labels = ids.clone()
    labels[0, :5] = -100
    return ids, labels


def _plain_step(model) -> tuple[float, dict]:
    ids, labels = _batch()
    logits = model(input_ids=ids).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), reduction="sum")
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _fast_step(model) -> tuple[float, dict]:
    ids, labels = _batch()
    hidden = model.model(input_ids=ids).last_hidden_state  # (B, T, H)
    loss = causal_lm_loss(hidden, model.lm_head.weight, labels, reduction="sum", chunk_size=8)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _compare(a, b, tol=1e-5):
    (la, ga), (lb, gb) = a, b
    assert abs(la - lb) <= tol * abs(lb)
    assert ga.keys() == gb.keys() and len(ga) > 0
    for n in ga:
        err = (ga[n] - gb[n]).abs().max().item() / max(gb[n].abs().max().item(), 1e-8)
        assert err <= 1e-4, f"{n}: {err:.2e}"


@pytest.mark.parametrize("dora", [False, True])
def test_checkpointed_fused_chunked_matches_plain(dora):
    ref = _plain_step(_model(dora, 0.0, fused=False))
    model = _model(dora, 0.0)
    assert enable_checkpointing(model, offload=True) == CFG.num_hidden_layers
    _compare(_fast_step(model), ref)


def test_checkpoint_replays_dropout():
    """With dropout, the recomputation restores the RNG state: the same masks as without checkpointing."""
    ref = _fast_step(_model(False, 0.2))  # _model seeds, so both steps draw the same masks in forward
    model = _model(False, 0.2)
    enable_checkpointing(model, offload=True)
    _compare(_fast_step(model), ref)
