"""The next token of each row from its logits: greedy, or temperature + nucleus (top-p) sampling.

Greedy rows take the argmax. A sampling row draws from softmax(logits / T) restricted to the
nucleus: the most likely tokens whose probabilities, in descending order, first reach top_p (the
token that crosses top_p is kept, so the nucleus is never empty). Each row draws with its own
seeded generator, so a seed gives the same text whatever else shares the batch. Everything stays
on the logits' device.
"""

from __future__ import annotations

import os

import torch

from lorafit.serve.requests import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A generator on `device` seeded with params.seed (random when None); None for greedy."""
    if params.temperature <= 0:
        return None
    generator = torch.Generator(device=device)
    seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(7), "little")
    generator.manual_seed(seed)
    return generator


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> torch.Tensor:
    """(B,) token ids from logits (B, vocab), row i drawn with params[i] and generators[i]."""
    tokens = logits.argmax(-1)
    for i, (p, generator) in enumerate(zip(params, generators)):
        if p.temperature <= 0:
            continue
        probs = torch.softmax(logits[i] / p.temperature, dim=-1)  # (vocab,)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            drop = sorted_p.cumsum(0) - sorted_p >= p.top_p  # keep the smallest set reaching top_p
            sorted_p[drop] = 0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        tokens[i] = torch.multinomial(probs, 1, generator=generator)[0]
    return tokens


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[tuple[int, float, list[tuple[int, float]]]]:
    """The model's log-probability of each chosen token and its `top` likeliest alternatives, from
    logits (N, vocab) and tokens (N,): [(token, logprob, [(token, logprob), ...])] (the raw model's
    distribution, log_softmax in fp32, whatever temperature sampled the token)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (N, vocab)
    chosen = logp.gather(-1, tokens[:, None].to(logp.device))[:, 0].tolist()
    if top > 0:
        values, ids = logp.topk(top, dim=-1)  # (N, top)
        alts = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        alts = [[] for _ in chosen]
    return [(t, lp, a) for t, lp, a in zip(tokens.tolist(), chosen, alts)]
