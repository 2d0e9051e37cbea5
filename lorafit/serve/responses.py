"""A job's events as OpenAI's answers: one JSON object, or a stream of server-sent chunks.

Completions and chat share everything but the shape of a choice: a completion choice carries
`text`, a chat choice a `message` (whole answer) or a `delta` (stream chunk). A stream starts,
for chat, with one chunk per choice announcing the assistant role, sends each piece of text as
it comes, then each choice's finish reason, optionally the usage, and ends with `data: [DONE]`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from lorafit.serve.api import ApiError, Job, sse


@dataclass
class Answer:
    """What a response is about: its id, when, which model, chat or completion."""

    model: str
    chat: bool
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        self.id = self.id or ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = self.created or int(time.time())

    def head(self, object_: str) -> dict:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}

    def chunk(self, choices: list[dict], **extra) -> bytes:
        return sse({**self.head("chat.completion.chunk" if self.chat else "text_completion"),
                    "choices": choices, **extra})

    def delta(self, index: int, text: str | None, finish: str | None) -> dict:
        """A stream choice: new text (None: no text, e.g. on the final chunk) and the finish reason."""
        if not self.chat:
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {"index": index, "delta": {} if text is None else {"content": text}, "logprobs": None,
                "finish_reason": finish}

    def choice(self, index: int, text: str, finish: str | None) -> dict:
        """A whole-answer choice."""
        if not self.chat:
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}


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
    async for index, event in job.events():
        if event.error:
            yield sse({"error": {"message": f"generation failed: {event.error}", "type": "server_error",
                                 "param": None, "code": None}})
            break
        if event.text:
            yield answer.chunk([answer.delta(index, event.text, None)])
        if event.finish_reason:
            yield answer.chunk([answer.delta(index, None if answer.chat else "", event.finish_reason)])
    if include_usage:
        yield answer.chunk([], usage=job.usage())
    yield sse("[DONE]")


async def collected(job: Job, http: Request, answer: Answer):
    """The whole answer as one JSON object (499 when the client left before it was done)."""
    parts: list[list[str]] = [[] for _ in job.requests]
    finish: list[str | None] = [None] * len(job.requests)
    async for index, event in job.events(http):
        if event.error:
            raise ApiError(500, f"generation failed: {event.error}", "server_error")
        parts[index].append(event.text)
        finish[index] = event.finish_reason or finish[index]
    if any(f is None for f in finish):  # the client went away; nobody reads this
        return JSONResponse({}, status_code=499)
    return {**answer.head("chat.completion" if answer.chat else "text_completion"),
            "choices": [answer.choice(i, "".join(p), f) for i, (p, f) in enumerate(zip(parts, finish))],
            "usage": job.usage()}
