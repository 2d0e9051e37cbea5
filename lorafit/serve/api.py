"""OpenAI's wire format: request bodies, the error object, and an HTTP call's engine requests.

Every error is OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, so clients show
the message. `Job` submits the requests of one HTTP call and carries their events from the
scheduler thread to the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from lorafit.serve.engine import Engine
from lorafit.serve.requests import Event, PromptTooLong, SamplingParams, ServerBusy

POLL_S = 0.1  # how often a non-streaming request checks that its client is still there
MAX_STOP = 4  # stop sequences per request, as OpenAI allows
MAX_LOGPROBS = 20  # alternatives per token, as OpenAI allows


class ApiError(Exception):
    """An error answered as OpenAI's JSON error object with this HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def prompt_error(e: PromptTooLong, param: str) -> ApiError:
    """A PromptTooLong from the engine as the 400 a client sees."""
    return ApiError(400, str(e), param=param, code="context_length_exceeded")


# -- request bodies ---------------------------------------------------------------------------
class SamplingBody(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI fields (user, logit_bias, ...) are ignored

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1)
    ignore_eos: bool = False  # extension (as in vLLM): generate exactly max_tokens tokens
    return_tokens_as_token_ids: bool = False  # extension (as in vLLM): logprobs name tokens "token_id:<id>"

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def params(self, max_tokens: int | None, default_max: int, logprobs: int | None = None,
               prompt_logprobs: int | None = None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > MAX_STOP:
            raise ApiError(400, f"at most {MAX_STOP} stop sequences", param="stop")
        return SamplingParams(max_tokens=max_tokens or default_max, temperature=self.temperature or 0.0,
                              top_p=self.top_p if self.top_p is not None else 1.0, stop=tuple(s for s in stop if s),
                              seed=self.seed, ignore_eos=self.ignore_eos, logprobs=logprobs,
                              prompt_logprobs=prompt_logprobs)


class CompletionBody(SamplingBody):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    """OpenAI's legacy field: the log-prob of each token and of the `logprobs` likeliest alternatives."""
    echo: bool = False
    """The prompt comes back before the completion (with `logprobs`: its tokens' log-probs too)."""


class TextPart(BaseModel):
    type: str = "text"
    text: str


class ChatMessage(BaseModel):
    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str | None:
        return self.content if isinstance(self.content, str) or self.content is None else \
            "".join(p.text for p in self.content)


class ChatBody(SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class TokenizeBody(BaseModel):
    """vLLM's /tokenize: a prompt, or chat messages rendered as /v1/chat/completions renders them."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]


class AdapterBody(BaseModel):
    name: str
    path: str


# -- one HTTP call's requests -----------------------------------------------------------------
class Job:
    """The engine requests of one HTTP call and the asyncio queue their events arrive on."""

    def __init__(self, engine: Engine, prompts: list[list[int]], adapter: str | None, params: SamplingParams,
                 param: str) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.requests = []
        self.tokenizer = engine.tokenizer
        self.prompt_texts: list[str] | None = None  # completions: the prompts as text (log-probs' text_offset)
        self.echo = False  # the answers start with the prompts' texts
        try:
            for i, ids in enumerate(prompts):
                self.requests.append(engine.submit(ids, adapter, params, self._sink(i)))
        except PromptTooLong as e:
            self.cancel()
            raise prompt_error(e, param) from None
        except ServerBusy as e:
            self.cancel()
            raise ApiError(429, str(e), "rate_limit_error", code="server_busy") from None
        except BaseException:
            self.cancel()
            raise

    def _sink(self, index: int):
        def put(event: Event) -> None:  # called on the scheduler thread
            with contextlib.suppress(RuntimeError):  # RuntimeError: the event loop is gone (shutdown)
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
        return put

    def cancel(self) -> None:
        for r in self.requests:
            r.cancel()

    def usage(self) -> dict[str, int]:
        p = sum(len(r.prompt_ids) for r in self.requests)
        c = sum(len(r.output_ids) for r in self.requests)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def events(self, http: Request | None = None) -> AsyncIterator[tuple[int, Event]]:
        """Events until every request has finished. With `http`, a client that hangs up cancels
        the requests (streams are cancelled by the server closing the generator instead)."""
        left = len(self.requests)
        checked = time.monotonic()
        try:
            while left:
                try:
                    index, event = await asyncio.wait_for(self.queue.get(), timeout=POLL_S)
                except TimeoutError:
                    event = None
                if http is not None and time.monotonic() - checked >= POLL_S:
                    checked = time.monotonic()
                    if await http.is_disconnected():
                        return
                if event is not None:
                    left -= event.finish_reason is not None
                    yield index, event
        finally:
            self.cancel()  # no-op for finished requests; frees the slots of abandoned ones


def sse(data: dict | str) -> bytes:
    """One server-sent event: `data: <json>` (or a bare string such as [DONE])."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()
