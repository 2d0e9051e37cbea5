"""token_logps with shared prompts: the G copies of a prompt run through the decoder once, and the
log-probs, statistics and LoRA gradients equal the plain forward's (fp32); where sharing cannot apply
(a sliding-window model, every prompt distinct) the plain forward runs and counts as such."""

from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

import lorafit as lf
from lorafit.lora.inject import adapter_parameters
from lorafit.train.loss import decoder
from lorafit.train.objectives.logps import shared_prompt_hidden, token_logps
from tests.train.objectives.test_preference_training import tiny_llama


def rows(prompts: list[list[int]], completions: list[list[int]], copies: int, pad: int = 0):
    """A GRPO-shaped batch: each prompt `copies` times, left-padded to the longest prompt, then its
    completion right-padded; positions counted from each row's first token; the completion scored."""
    width = max(map(len, prompts))
    length = width + max(map(len, completions))
    b = len(prompts) * copies
    ids = torch.full((b, length), pad)
    attention, scored = torch.zeros(b, length, dtype=torch.long), torch.zeros(b, length, dtype=torch.long)
    for i in range(b):
        p, c = prompts[i // copies], completions[i]
        ids[i, width - len(p):width], ids[i, width:width + len(c)] = torch.tensor(p), torch.tensor(c)
        attention[i, width - len(p):width + len(c)] = 1
        scored[i, width:width + len(c)] = 1
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": attention, "position_ids": positions}, scored, width


def adapted(model):
    model = lf.apply_lora(model, lf.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.copy_(0.3 * torch.randn(p.shape, generator=g))  # B != 0: the adapter changes every layer's output
    return model


def batch_of(seed: int, copies: int = 4):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(5, 49000, (n,), generator=g).tolist() for n in (7, 11, 9)]
    completions = [torch.randint(5, 49000, (int(n),), generator=g).tolist()
                   for n in torch.randint(1, 8, (3 * copies,), generator=g)]
    return rows(prompts, completions, copies)


def counting_calls(model) -> list[int]:
    """The number of rows each decoder forward runs, appended per call."""
    calls = []
    decoder(model).register_forward_pre_hook(lambda m, args, kw: calls.append(kw["input_ids"].shape[0]),
                                             with_kwargs=True)
    return calls


def test_shared_prompts_give_the_plain_forwards_log_probs_statistics_and_gradients():
    model = adapted(tiny_llama())
    inputs, scored, width = batch_of(0)
    calls = counting_calls(model)
    results = {}
    for shared in (False, True):
        model.zero_grad(set_to_none=True)
        out = token_logps(model, inputs, scored, stats=True, temperature=0.7, prompt_width=width if shared else None)
        (out.logp.sum() + 0.1 * (out.logp ** 2).sum()).backward()
        grads = [p.grad.clone() for p in adapter_parameters(model)]
        results[shared] = out, grads
    assert calls == [12, 3, 12]  # plain: 12 rows whole; shared: the 3 distinct prompts, then 12 completions
    (plain, g_plain), (shared, g_shared) = results[False], results[True]
    torch.testing.assert_close(shared.logp, plain.logp, rtol=0, atol=1e-5)
    assert bool((plain.logp != 0).sum() == scored[:, 1:].sum())  # every scored token has a value
    torch.testing.assert_close(shared.entropy, plain.entropy, rtol=0, atol=1e-5)
    torch.testing.assert_close(shared.mean_logit, plain.mean_logit, rtol=0, atol=1e-5)
    assert torch.equal(shared.top1, plain.top1)
    for a, b in zip(g_shared, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", ["distinct prompts", "sliding window", "a scored prompt token"])
def test_where_sharing_cannot_apply_the_plain_forward_runs(case):
    if case == "sliding window":
        torch.manual_seed(0)
        model = MistralForCausalLM(MistralConfig(vocab_size=49152, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 sliding_window=4, max_position_embeddings=128))
    else:
        model = tiny_llama()
    model = adapted(model)
    inputs, scored, width = batch_of(1, copies=1 if case == "distinct prompts" else 3)
    if case == "a scored prompt token":
        scored = scored.clone()
        scored[0, width - 1] = 1
    assert shared_prompt_hidden(model, inputs, scored, width) is None
    calls = counting_calls(model)
    with torch.no_grad():
        out = token_logps(model, inputs, scored, prompt_width=width)
    assert calls == [inputs["input_ids"].shape[0]] and torch.isfinite(out.logp).all()
