"""GRPO's rollouts: completions of prompts sampled by lorafit.serve's engine, in process, on the training model.

The engine (`lorafit.serve.engine.Engine`, live) runs the very model object the trainer trains: every
forward reads the adapter's current tensors, so an optimizer step is seen by the next rollout with no
merge, no copy and no weight sync, and there is one base in memory (NF4 included): the engine adds only
its KV cache. It batches the rows (continuous batching up to `max_batch_size`), prefills each prompt once
for all of its G completions (shared prefixes: the copies differ only in the last prompt token), keeps
the KV cache and samples on the model's device, and returns each sampled token's log-prob under
softmax(logits / T), which the trainer compares with its own recomputation.

Each completion draws with its own seeded generator, so what a completion samples depends on its seed
and the weights, not on the rows it shares a batch with (or the number of processes).
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from lorafit.serve.engine import Engine
from lorafit.serve.requests import SamplingParams
from lorafit.train.grpo_config import GRPOConfig


class Completion(NamedTuple):
    ids: list[int]  # the sampled tokens, with the end-of-sequence token that ended it (as TRL keeps it)
    logps: list[float]  # the engine's log-prob of each, under softmax(logits / temperature)
    truncated: bool  # it reached max_completion_length (or the context) without an end token


class Rollouts:
    """`rollouts(prompts, seeds)`: one completion per (prompt ids, seed), sampled with `config`'s settings."""

    def __init__(self, model: nn.Module, tokenizer, config: GRPOConfig, max_batch_size: int = 64) -> None:
        self.engine = Engine(model, tokenizer, live=True, max_batch_size=max_batch_size, share_prefixes=True)
        self.config = config

    def params(self, seed: int) -> SamplingParams:
        cfg = self.config
        return SamplingParams(max_tokens=cfg.max_completion_length, temperature=cfg.temperature, top_p=cfg.top_p,
                              top_k=cfg.top_k, min_p=cfg.min_p or 0.0, seed=seed, sample_logprobs=True)

    def __call__(self, prompts: list[list[int]], seeds: list[int]) -> list[Completion]:
        done = self.engine.generate(prompts, [self.params(s) for s in seeds])
        return [Completion(r.output_ids + ([r.stop_token] if r.stop_token is not None else []),
                           list(r.sampled_logprobs), r.stop_token is None) for r in done]
