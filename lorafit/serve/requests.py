"""What a request is: its sampling settings, the events its sink receives, and the errors a submit raises.

Plain data, no torch model and no scheduling: the engine (engine.py) fills a `Request` as it
decodes, the HTTP front (app.py) reads `Event`s and maps the error types to HTTP statuses.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lorafit.errors import LorafitError
from lorafit.serve.detok import TextStream


class UnknownAdapter(LorafitError):
    """The request names an adapter that is not loaded (HTTP 404)."""


class PromptTooLong(LorafitError):
    """The prompt does not fit the model's context (HTTP 400)."""


class ServerBusy(LorafitError):
    """Too many requests are waiting (HTTP 429)."""


class AdapterExists(LorafitError):
    """A load under a name that is already taken (HTTP 409)."""


class BadAdapterName(LorafitError):
    """A load under a name that is not a valid adapter name (HTTP 400 on `name`)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks, load tests)
    top_k: int = 0  # sample among the k likeliest tokens only (0: no limit)
    min_p: float = 0.0  # drop tokens less likely than min_p times the likeliest one (0: none)
    sample_logprobs: bool = False  # record each sampled token's log-prob under the distribution it came from
    logprobs: int | None = None  # log-prob of each new token and of its top-k alternatives (0: the token's only)
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (OpenAI's `echo` with `logprobs`)


# (token id, log-prob, [(alternative id, log-prob), ...] the top-k), as `sampling.token_logprobs` gives them
TokenLogprob = tuple[int, float, list[tuple[int, float]]]


@dataclass
class Event:
    """What a request's sink receives: new text, and on the last event why it ended."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "error" on the last event
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # asked for: one per token of `token_ids`, plus the stop token


@dataclass(eq=False)
class Request:
    prompt_ids: list[int]
    adapter: str | None  # the public name asked for (None: the base model)
    params: SamplingParams
    sink: Callable[[Event], None]
    internal: str | None = None  # the adapter's name inside the model, pinned at submit
    output_ids: list[int] = field(default_factory=list)
    stream: TextStream | None = None  # output ids -> text, cut at stop strings (set by the engine)
    finish_reason: str | None = None
    cancelled: bool = False
    settled: bool = False  # counted out of the running set
    generator: torch.Generator | None = None
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    t_done: float | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # asked for: one per prompt token (None first), set at prefill
    # with `sample_logprobs`: log softmax(logits / temperature) of each sampled token, the stop token's included
    sampled_logprobs: list[float] = field(default_factory=list)
    stop_token: int | None = None  # the end-of-sequence token that finished the request, if one did

    def cancel(self) -> None:
        """Drop the row at the next step (a client that went away); a no-op once finished."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self.finish_reason is not None
