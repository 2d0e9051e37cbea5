"""A job's events as OpenAI's answers: one JSON object, or a stream of server-sent chunks.

Completions and chat share everything but the shape of a choice: a completion choice carries
`text`, a chat choice a `message` (whole answer) or a `delta` (stream chunk). A stream starts,
for chat, with one chunk per choice announcing the assistant role, sends each piece of text as
it comes, then each choice's finish reason, optionally the usage, and ends with `data: [DONE]`.

Log-probs name a token by its text, or "token_id:<id>" with vLLM's `return_tokens_as_token_ids` (exact
where several ids decode to the same text; `lorafit verify --serve` asks for it).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from lorafit.serve.api import ApiError, Job, sse
from lorafit.serve.requests import TokenLogprob


@dataclass
class Answer:
    """What a response is about: its id, when, which model, chat or completion."""

    model: str
    chat: bool
    id: str = ""
    created: int = 0
    token_ids: bool = False  # log-probs name tokens "token_id:<id>" (vLLM's return_tokens_as_token_ids)

    def __post_init__(self) -> None:
        self.id = self.id or ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = self.created or int(time.time())

    def head(self, object_: str) -> dict:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}

    def chunk(self, choices: list[dict], **extra) -> bytes:
        return sse({**self.head("chat.completion.chunk" if self.chat else "text_completion"),
                    "choices": choices, **extra})

    def delta(self, index: int, text: str | None, finish: str | None, logprobs: dict | None = None) -> dict:
        """A stream choice: new text (None: no text, e.g. on the final chunk) and the finish reason."""
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        return {"index": index, "delta": {} if text is None else {"content": text}, "logprobs": logprobs,
                "finish_reason": finish}

    def choice(self, index: int, text: str, finish: str | None, logprobs: dict | None = None) -> dict:
        """A whole-answer choice."""
        if not self.chat:
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish}


def _token(tokenizer, token_id: int, as_id: bool = False) -> str:
    return f"token_id:{token_id}" if as_id else tokenizer.decode([token_id])


def legacy_logprobs(tokenizer, entries: list[TokenLogprob | None], ids: list[int], offset: int,
                    as_ids: bool = False) -> dict:
    """OpenAI's legacy completion `logprobs`: tokens, token_logprobs, top_logprobs ({token: logprob}) and
    text_offset (each token's start in the choice's text, counted from `offset`). An entry of None (the
    prompt's first token, which nothing predicts) gives null log-probs."""
    tokens, logps, tops, offsets = [], [], [], []
    for token_id, entry in zip(ids, entries):
        text = _token(tokenizer, token_id)
        tokens.append(_token(tokenizer, token_id, as_ids))
        offsets.append(offset)
        offset += len(text)
        logps.append(None if entry is None else entry[1])
        tops.append(None if entry is None else {_token(tokenizer, t, as_ids): lp for t, lp in entry[2]})
    return {"tokens": tokens, "token_logprobs": logps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tokenizer, entries: list[TokenLogprob], as_ids: bool = False) -> dict:
    """Chat completions' `logprobs`: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    def one(token_id: int, logprob: float) -> dict:
        text = _token(tokenizer, token_id, as_ids)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
    return {"content": [{**one(t, lp), "top_logprobs": [one(a, alp) for a, alp in alts]} for t, lp, alts in entries]}


def _logprobs(job: Job, answer: Answer, entries: list[TokenLogprob], offset: int) -> dict:
    """An event's (or a whole answer's) generated tokens' log-probs in the answer's shape."""
    if answer.chat:
        return chat_logprobs(job.tokenizer, entries, answer.token_ids)
    return legacy_logprobs(job.tokenizer, entries, [e[0] for e in entries], offset, answer.token_ids)


async def respond(job: Job, http: Request, answer: Answer, stream: bool, include_usage: bool):
    if stream:
        return StreamingResponse(chunks(job, answer, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await collected(job, http, answer)


async def chunks(job: Job, answer: Answer, include_usage: bool) -> AsyncIterator[bytes]:
    """The server-sent events of a streamed answer."""
    if answer.chat:
        for i in range(len(job.requests)):
            yield answer.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}])
    offsets = [len(t) for t in job.prompt_texts or [""] * len(job.requests)]  # legacy text_offset of the next token
    async for index, event in job.events():
        if event.error:
            yield sse({"error": {"message": f"generation failed: {event.error}", "type": "server_error",
                                 "param": None, "code": None}})
            break
        logprobs = _logprobs(job, answer, event.logprobs, offsets[index]) if event.logprobs else None
        offsets[index] += len(event.text)
        if event.text or logprobs:
            yield answer.chunk([answer.delta(index, event.text, None, logprobs)])
        if event.finish_reason:
            yield answer.chunk([answer.delta(index, None if answer.chat else "", event.finish_reason)])
    if include_usage:
        yield answer.chunk([], usage=job.usage())
    yield sse("[DONE]")


async def collected(job: Job, http: Request, answer: Answer):
    """The whole answer as one JSON object (499 when the client left before it was done)."""
    parts: list[list[str]] = [[] for _ in job.requests]
    finish: list[str | None] = [None] * len(job.requests)
    entries: list[list[TokenLogprob]] = [[] for _ in job.requests]
    async for index, event in job.events(http):
        if event.error:
            raise ApiError(500, f"generation failed: {event.error}", "server_error")
        parts[index].append(event.text)
        entries[index] += event.logprobs or []
        finish[index] = event.finish_reason or finish[index]
    if any(f is None for f in finish):  # the client went away; nobody reads this
        return JSONResponse({}, status_code=499)
    choices = []
    for i, (request, p, f) in enumerate(zip(job.requests, parts, finish)):
        prompt_text = job.prompt_texts[i] if job.prompt_texts is not None else ""
        echo = prompt_text if job.echo else ""
        logprobs = None
        if request.params.logprobs is not None:  # text_offset counts from the prompt's start, as OpenAI's
            logprobs = _logprobs(job, answer, entries[i], len(prompt_text))
            if request.prompt_logprobs is not None:  # echo: the prompt's tokens first
                prompt = legacy_logprobs(job.tokenizer, request.prompt_logprobs, request.prompt_ids, 0,
                                         answer.token_ids)
                logprobs = {k: prompt[k] + logprobs[k] for k in logprobs}
        choices.append(answer.choice(i, echo + "".join(p), f, logprobs))
    return {**answer.head("chat.completion" if answer.chat else "text_completion"), "choices": choices,
            "usage": job.usage()}
