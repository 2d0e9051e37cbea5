"""The next token of each row from its logits: greedy, or temperature sampling with top-k, top-p, min-p.

Greedy rows take the argmax. A sampling row draws from p = softmax(logits / T), restricted in this order
(transformers' order of its logits warpers):

    top_k   the k likeliest tokens (0: all)
    top_p   the nucleus: the likeliest tokens whose probabilities, in descending order, first reach top_p
            (the token that crosses top_p is kept, so the nucleus is never empty)
    min_p   the tokens at least min_p times as likely as the likeliest one

each step renormalising what is kept. Each row draws with its own seeded generator, so a seed gives the
same text whatever else shares the batch. Everything stays on the logits' device.

`sampled_logprobs` gives the log-probability of the sampled token under softmax(logits / T), before the
truncations (greedy rows: T = 1): the quantity a trainer recomputes from its own forward (TRL's
`selective_log_softmax(logits / temperature)`), so the two can be compared token for token.
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


def truncated(probs: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """`probs` (vocab,) with what top_k, top_p and min_p drop set to 0 (not renormalised: the draw
    does not need it); unchanged when none of them is set."""
    if p.top_k > 0 and p.top_k < probs.shape[0]:
        kth = probs.topk(p.top_k).values[-1]
        probs = torch.where(probs >= kth, probs, 0.0)
    if p.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        mass = p.top_p * (sorted_p.sum() if p.top_k > 0 else 1.0)  # (top_k left an unnormalised distribution)
        cut = sorted_p.cumsum(0) - sorted_p >= mass  # keep the smallest set reaching top_p
        sorted_p[cut] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    if p.min_p > 0:
        probs = torch.where(probs >= p.min_p * probs.max(), probs, 0.0)
    return probs


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> torch.Tensor:
    """(B,) token ids from logits (B, vocab), row i drawn with params[i] and generators[i].

    The sampling rows draw by inverting their cumulative distribution: one uniform u_i from the row's own
    generator, and the first token whose cumulative (unnormalised, fp64) probability exceeds u_i times the
    row's total. That is an exact draw from the truncated distribution, the rows' softmax and cumulative sums
    run as one batch, and a row's token depends only on its logits, settings and generator."""
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if len(rows) < len(params):
        tokens = logits.argmax(-1)  # (B,) the greedy rows' tokens
    else:
        tokens = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    if not rows:
        return tokens
    temperature = torch.tensor([params[i].temperature for i in rows], dtype=logits.dtype, device=logits.device)
    probs = torch.softmax(logits[rows] / temperature[:, None], dim=-1)  # (S, vocab)
    for k, i in enumerate(rows):
        if params[i].top_k > 0 or params[i].top_p < 1.0 or params[i].min_p > 0:
            probs[k] = truncated(probs[k], params[i])
    u = torch.cat([torch.rand(1, generator=generators[i], device=logits.device, dtype=torch.float64)
                   for i in rows])  # (S,) in [0, 1)
    cdf = probs.double().cumsum(-1)  # (S, vocab)
    drawn = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True)[:, 0]  # first cdf > u * total
    tokens[rows] = drawn.clamp(max=logits.shape[-1] - 1).to(tokens.dtype)
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


def sampled_logprobs(logits: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """(B,) fp32: log softmax(logits / T)[token] of each row (T = 1 for a greedy row), from logits (B, vocab)."""
    temperature = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params],
                               dtype=torch.float32, device=logits.device)
    logp = torch.log_softmax(logits.float() / temperature[:, None], dim=-1)  # (B, vocab)
    return logp.gather(-1, tokens[:, None])[:, 0]
