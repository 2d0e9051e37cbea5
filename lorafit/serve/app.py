"""The HTTP front: OpenAI-compatible routes over an `Engine`, plus adapter management.

    POST   /v1/completions        prompt -> text; `model` picks the adapter (the base name: none)
    POST   /v1/chat/completions   messages through the tokenizer's chat template
    GET    /v1/models             the base model and every loaded adapter
    POST   /v1/adapters           {"name", "path"}: load a folder under --adapter-root
    DELETE /v1/adapters/{name}    unload (requests already running finish on it first)
    GET    /health                liveness, queue depth and resident memory

Every error is OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, so clients
show the message; nothing a client sends can take the server down. `stream: true` answers with
server-sent events in OpenAI's chunk format, ending with `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorafit.errors import AdapterError, LorafitError
from lorafit.serve.engine import (
    AdapterExists,
    Engine,
    Event,
    PromptTooLong,
    SamplingParams,
    ServerBusy,
    UnknownAdapter,
)

log = logging.getLogger("lorafit.serve")
_NAME = re.compile(r"[A-Za-z0-9_\-]{1,64}")
_POLL_S = 0.1  # how often a non-streaming request checks that its client is still there


class ApiError(Exception):
    """An error answered as OpenAI's JSON error object with this HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# -- request bodies ---------------------------------------------------------------------------
class _Sampling(BaseModel):
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


class CompletionBody(_Sampling):
    prompt: str | list[str] | list[int] = Field(min_length=1)


class TextPart(BaseModel):
    type: str = "text"
    text: str


class ChatMessage(BaseModel):
    role: str
    content: str | list[TextPart] | None = None


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class AdapterBody(BaseModel):
    name: str
    path: str


# -- helpers ----------------------------------------------------------------------------------
def resolve_under(root: Path | None, path: str) -> Path:
    """`path` (relative to `root`, or absolute) resolved with symlinks followed; 403 outside root."""
    if root is None:
        raise ApiError(403, "loading adapters at run time is off; start the server with --adapter-root",
                       "permission_error", "path")
    root = root.resolve()
    try:
        target = (root / path).resolve()
    except (OSError, RuntimeError, ValueError):  # symlink loops, NUL bytes
        raise ApiError(403, f"adapter path {path!r} cannot be resolved", "permission_error", "path") from None
    if not target.is_relative_to(root):
        raise ApiError(403, f"adapter path {path!r} is outside the adapter root", "permission_error", "path")
    if not target.is_dir():
        raise ApiError(404, f"adapter folder {path!r} not found under the adapter root", param="path",
                       code="adapter_not_found")
    return target


def _params(body: _Sampling, max_tokens: int | None, default_max: int) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise ApiError(400, "at most 4 stop sequences", param="stop")
    return SamplingParams(max_tokens=max_tokens or default_max, temperature=body.temperature or 0.0,
                          top_p=body.top_p if body.top_p is not None else 1.0, stop=tuple(s for s in stop if s),
                          seed=body.seed, ignore_eos=body.ignore_eos)


class _Job:
    """The engine requests of one HTTP call and the asyncio queue their events arrive on."""

    def __init__(self, engine: Engine, prompts: list[list[int]], adapter: str | None, params: SamplingParams,
                 param: str) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.requests = []
        try:
            for i, ids in enumerate(prompts):
                self.requests.append(engine.submit(ids, adapter, params, self._sink(i)))
        except PromptTooLong as e:
            self.cancel()
            raise ApiError(400, str(e), param=param, code="context_length_exceeded") from None
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

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt_ids) for r in self.requests)

    @property
    def completion_tokens(self) -> int:
        return sum(len(r.output_ids) for r in self.requests)

    async def events(self, http: Request | None = None) -> AsyncIterator[tuple[int, Event]]:
        """Events until every request has finished. With `http`, a client that hangs up cancels
        the requests (streams are cancelled by the server closing the generator instead)."""
        left = len(self.requests)
        checked = time.monotonic()
        try:
            while left:
                try:
                    index, event = await asyncio.wait_for(self.queue.get(), timeout=_POLL_S)
                except TimeoutError:
                    event = None
                if http is not None and time.monotonic() - checked >= _POLL_S:
                    checked = time.monotonic()
                    if await http.is_disconnected():
                        return
                if event is not None:
                    left -= event.finish_reason is not None
                    yield index, event
        finally:
            self.cancel()  # no-op for finished requests; frees the slots of abandoned ones


def _sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


# -- the app ----------------------------------------------------------------------------------
def create_app(engine: Engine, *, api_key: str | None = None, adapter_root: str | Path | None = None) -> FastAPI:
    """The ASGI app. The engine's scheduler starts with the app and stops with it."""
    root = Path(adapter_root) if adapter_root else None
    tokenizer = engine.tokenizer

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        yield
        await run_in_threadpool(engine.stop)

    async def authorize(request: Request) -> None:
        if api_key is None or request.url.path == "/health":
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                           "authentication_error", code="invalid_api_key")

    app = FastAPI(title="lorafit serve", lifespan=lifespan, dependencies=[Depends(authorize)])

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return ApiError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip(),
                            code="invalid_json").response()
        field = ".".join(loc) or "body"
        message = f"{field}: {first.get('msg', 'invalid value')}"
        return ApiError(400, message, param=field, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return ApiError(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else
                        "server_error").response()

    @app.exception_handler(Exception)
    async def _crash(_: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return ApiError(500, f"internal error: {type(e).__name__}", "server_error").response()

    def adapter_for(model: str) -> str | None:
        try:
            return engine.resolve(model)
        except UnknownAdapter as e:
            raise ApiError(404, str(e), param="model", code="model_not_found") from None

    def encode(text: str, param: str = "prompt") -> list[int]:
        if len(text) > 32 * engine.context_length:  # surely too long: don't spend time tokenizing it
            raise ApiError(400, f"the prompt ({len(text)} characters) cannot fit this model's context of "
                           f"{engine.context_length} tokens", param=param, code="context_length_exceeded")
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if not ids:
            raise ApiError(400, "the prompt is empty", param=param)
        return ids

    def check_ids(ids: list[int]) -> list[int]:
        if any(i < 0 or i >= len(tokenizer) for i in ids):
            raise ApiError(400, f"prompt token ids must lie in [0, {len(tokenizer)})", param="prompt")
        return ids

    async def respond(job: _Job, http: Request, stream: bool, model: str, chat: bool, include_usage: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": model}

        def usage() -> dict[str, int]:
            p, c = job.prompt_tokens, job.completion_tokens
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

        def choice(index: int, text: str | None, finish: str | None) -> dict:
            if not chat:
                return {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            return {"index": index, "delta": {} if text is None else {"content": text}, "logprobs": None,
                    "finish_reason": finish}

        if stream:
            async def chunks() -> AsyncIterator[bytes]:
                if chat:
                    for i in range(len(job.requests)):
                        yield _sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                         "logprobs": None, "finish_reason": None}]})
                async for index, event in job.events():
                    if event.error:
                        yield _sse({"error": {"message": f"generation failed: {event.error}", "type": "server_error",
                                              "param": None, "code": None}})
                        break
                    if event.text:
                        yield _sse({**head, "choices": [choice(index, event.text, None)]})
                    if event.finish_reason:
                        yield _sse({**head, "choices": [choice(index, None if chat else "", event.finish_reason)]})
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": usage()})
                yield _sse("[DONE]")

            return StreamingResponse(chunks(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        texts = [""] * len(job.requests)
        finish: list[str | None] = [None] * len(job.requests)
        async for index, event in job.events(http):
            if event.error:
                raise ApiError(500, f"generation failed: {event.error}", "server_error")
            texts[index] += event.text
            finish[index] = event.finish_reason or finish[index]
        if any(f is None for f in finish):  # the client went away; nobody reads this
            return JSONResponse({}, status_code=499)
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": f} for i, (t, f) in enumerate(zip(texts, finish))]
        else:
            choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": f}
                       for i, (t, f) in enumerate(zip(texts, finish))]
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model, "choices": choices, "usage": usage()}

    def include_usage(body: _Sampling) -> bool:
        return bool((body.stream_options or {}).get("include_usage"))

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: Request):
        adapter = adapter_for(body.model)
        if isinstance(body.prompt, str):
            prompts = [encode(body.prompt)]
        elif all(isinstance(p, int) for p in body.prompt):
            prompts = [check_ids(list(body.prompt))]
        else:
            prompts = [encode(p) for p in body.prompt]
        job = _Job(engine, prompts, adapter, _params(body, body.max_tokens, 16), "prompt")
        return await respond(job, http, body.stream, body.model, chat=False, include_usage=include_usage(body))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: Request):
        adapter = adapter_for(body.model)
        if not tokenizer.chat_template:
            raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions", param="messages")
        messages = [{"role": m.role, "content": m.content if isinstance(m.content, str) or m.content is None
                     else "".join(p.text for p in m.content)} for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # template errors (e.g. a role the template rejects) are the client's
            raise ApiError(400, f"the chat template rejected the messages: {e}", param="messages") from None
        if len(text) > 32 * engine.context_length:
            raise ApiError(400, f"the messages ({len(text)} characters) cannot fit this model's context of "
                           f"{engine.context_length} tokens", param="messages", code="context_length_exceeded")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        params = _params(body, body.max_completion_tokens or body.max_tokens, 256)
        job = _Job(engine, [ids], adapter, params, "messages")
        return await respond(job, http, body.stream, body.model, chat=True, include_usage=include_usage(body))

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        data = [{"id": engine.base_name, "object": "model", "created": created, "owned_by": "lorafit",
                 "root": engine.base_name, "parent": None}]
        data += [{"id": name, "object": "model", "created": created, "owned_by": "lorafit", "root": path,
                  "parent": engine.base_name} for name, path in sorted(engine.adapters().items())]
        return {"object": "list", "data": data}

    @app.post("/v1/adapters")
    async def load_adapter(body: AdapterBody):
        if not _NAME.fullmatch(body.name):
            raise ApiError(400, "adapter name must be 1-64 letters, digits, '_' or '-'", param="name")
        folder = resolve_under(root, body.path)
        try:
            await run_in_threadpool(engine.load_adapter, body.name, folder)
        except AdapterExists as e:
            raise ApiError(409, str(e), param="name", code="adapter_exists") from None
        except (AdapterError, LorafitError) as e:
            raise ApiError(400, str(e), param="path", code="adapter_invalid") from None
        return {"id": body.name, "object": "model", "owned_by": "lorafit", "parent": engine.base_name}

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        try:
            holders = await run_in_threadpool(engine.unload_adapter, name)
        except UnknownAdapter as e:
            raise ApiError(404, str(e), param="name", code="model_not_found") from None
        return {"id": name, "object": "model", "deleted": True, "running_requests": holders}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.base_name, **engine.stats()}

    return app
