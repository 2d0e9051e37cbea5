"""serve/sampling.py: the draw is exact for the truncated distribution, the truncations keep what
transformers' logits warpers keep, and a row's token depends on its own seed only."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from lorafit.serve.requests import SamplingParams
from lorafit.serve.sampling import make_generator, sample, truncated

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.2, -0.5, -3.0])


def expected(params: SamplingParams) -> torch.Tensor:
    probs = truncated(torch.softmax(LOGITS / params.temperature, dim=-1), params)
    return probs / probs.sum()


@pytest.mark.parametrize("settings", [{}, {"top_k": 3}, {"top_p": 0.7}, {"min_p": 0.2}, {"temperature": 0.5},
                                      {"top_k": 4, "top_p": 0.9, "min_p": 0.05, "temperature": 1.3}])
def test_the_draw_follows_the_truncated_distribution(settings):
    n = 20000
    params = [SamplingParams(max_tokens=1, **{"temperature": 1.0, **settings}, seed=s) for s in range(n)]
    tokens = sample(LOGITS.repeat(n, 1), params, [make_generator(p, torch.device("cpu")) for p in params])
    freq = torch.bincount(tokens, minlength=len(LOGITS)).double() / n
    want = expected(params[0]).double()
    assert torch.all(freq[want == 0] == 0)  # nothing outside what the truncations keep
    sigma = (want * (1 - want) / n).sqrt()
    assert torch.all((freq - want).abs() <= 5 * sigma + 1e-12), (freq, want)


@pytest.mark.parametrize("settings", [{"top_k": 3}, {"top_p": 0.8}, {"min_p": 0.1},
                                      {"top_k": 20, "top_p": 0.9, "min_p": 0.02}])
def test_the_truncations_keep_what_transformers_warpers_keep(settings):
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4, 1000, generator=g)
    p = SamplingParams(max_tokens=1, temperature=0.8, **settings)
    scores = logits / p.temperature
    warpers = ([TopKLogitsWarper(p.top_k)] if p.top_k else []) + ([TopPLogitsWarper(p.top_p)] if p.top_p < 1 else []) \
        + ([MinPLogitsWarper(p.min_p)] if p.min_p else [])
    for warper in warpers:  # transformers' order
        scores = warper(None, scores)
    for row in range(4):
        ours = truncated(torch.softmax(logits[row] / p.temperature, dim=-1), p) > 0
        assert torch.equal(ours, torch.isfinite(scores[row])), settings


def test_a_rows_token_depends_on_its_seed_not_on_the_batch():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 300, generator=g)
    params = [SamplingParams(max_tokens=1, temperature=1.0, top_p=0.95, seed=10 + i) for i in range(5)]
    params[2] = SamplingParams(max_tokens=1, temperature=0.0)  # a greedy row in the batch
    together = sample(logits, params, [make_generator(p, torch.device("cpu")) for p in params])
    for i, p in enumerate(params):
        alone = sample(logits[i:i + 1], [p], [make_generator(p, torch.device("cpu"))])
        assert alone.item() == together[i].item()
    assert together[2].item() == logits[2].argmax().item()
