"""The HTTP front: OpenAI-compatible routes over an `Engine`, plus adapter management.

    POST   /v1/completions        prompt -> text; `model` picks the adapter (the base name: none)
    POST   /v1/chat/completions   messages in the adapter's prompt format (lorafit.prompt: the chat
                                  template, or the instruction format it was trained with)
    GET    /v1/models             the base model and every loaded adapter
    POST   /v1/adapters           {"name", "path"}: load a folder under --adapter-root (a loaded name: hot-swap)
    DELETE /v1/adapters/{name}    unload (requests already running finish on it first)
    GET    /health                liveness, queue depth and resident memory
    POST   /tokenize, /detokenize   vLLM's shapes: text <-> token ids (lm-eval's tokenizer_backend=remote)
    GET    /tokenizer_info        vLLM's shape: special tokens, chat template, context length

`/v1/completions` honours `logprobs` (top-k) and `echo` as OpenAI's legacy API has them (tokens,
token_logprobs, top_logprobs, text_offset; with echo the prompt's tokens too, the first null), and
`/v1/chat/completions` honours `logprobs` / `top_logprobs`: the raw model's log-probs, from the same
batched forward that generates (lorafit.serve.engine).

Every error is OpenAI's shape (api.py), so clients show the message; nothing a client sends can
take the server down. At log level info, `RequestLog` writes one line per request when its answer
has been sent (a stream's too): method, path, adapter, status, prompt + completion tokens,
milliseconds. `stream: true` answers with server-sent events (responses.py). The routes are plain
functions; what they share (engine, tokenizer, key, adapter root) is one `Server` kept
on the app's state.
"""

from __future__ import annotations

import hmac
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorafit.errors import LorafitError
from lorafit.prompt import conversation_ids, text_ids
from lorafit.serve.api import (
    AdapterBody,
    ApiError,
    ChatBody,
    CompletionBody,
    DetokenizeBody,
    Job,
    TokenizeBody,
    prompt_error,
)
from lorafit.serve.engine import Engine
from lorafit.serve.requests import AdapterExists, BadAdapterName, PromptTooLong, UnknownAdapter
from lorafit.serve.responses import Answer, respond

log = logging.getLogger("lorafit.serve")
CHARS_PER_TOKEN = 32  # a text longer than this many characters per context token surely does not fit


@dataclass
class Server:
    """What every route needs: the engine, its tokenizer, the API key and the adapter root."""

    engine: Engine
    api_key: str | None = None
    root: Path | None = None

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def adapter_for(self, model: str) -> str | None:
        try:
            return self.engine.resolve(model)
        except UnknownAdapter as e:
            raise ApiError(404, str(e), param="model", code="model_not_found") from None

    def prompt_ids(self, text: str, param: str) -> list[int]:
        """A raw prompt's ids (BOS once, as the tokenizer does), checked to fit the context (`check_prompt`)."""
        self.check_prompt(param, chars=len(text))  # don't spend time tokenizing a text that cannot fit
        ids = text_ids(self.tokenizer, text)
        self.check_prompt(param, tokens=len(ids))
        return ids

    def chat_ids(self, messages: list[dict], adapter: str | None) -> list[int]:
        """Messages rendered in the prompt format of `adapter` (the one it was trained with; the
        tokenizer's default for the base): the ids its training samples start with."""
        self.check_prompt("messages", chars=sum(len(m["content"] or "") for m in messages))
        try:
            ids = conversation_ids(self.tokenizer, self.engine.prompt_format(adapter), messages, True, "messages")
        except LorafitError as e:  # a template that rejects the turns, a role the format has no place for
            raise ApiError(400, str(e), param="messages") from None
        self.check_prompt("messages", tokens=len(ids))
        return ids

    def check_prompt(self, param: str, *, chars: int | None = None, tokens: int | None = None) -> None:
        """The one prompt-length check: a 400 on `param` unless the prompt leaves room to answer."""
        context = self.engine.context_length
        if chars == 0:
            raise ApiError(400, f"the {param} is empty", param=param)
        if chars is not None and chars > CHARS_PER_TOKEN * context:
            raise ApiError(400, f"the {param} ({chars} characters) cannot fit this model's context of "
                           f"{context} tokens", param=param, code="context_length_exceeded")
        if tokens == 0:
            raise ApiError(400, f"the {param} is empty", param=param)
        if tokens is not None:
            try:
                self.engine.check_prompt(tokens)
            except PromptTooLong as e:
                raise prompt_error(e, param) from None

    def checked_ids(self, ids: list[int]) -> list[int]:
        """Token ids sent as the prompt, each a token of this tokenizer."""
        if any(i < 0 or i >= len(self.tokenizer) for i in ids):
            raise ApiError(400, f"prompt token ids must lie in [0, {len(self.tokenizer)})", param="prompt")
        self.check_prompt("prompt", tokens=len(ids))
        return ids

    def adapter_folder(self, path: str) -> Path:
        """`path` (relative to the root, or absolute) resolved with symlinks followed; 403 outside it."""
        if self.root is None:
            raise ApiError(403, "loading adapters at run time is off; start the server with --adapter-root",
                           "permission_error", "path")
        root = self.root.resolve()
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


def server(http: Request) -> Server:
    return http.app.state.lorafit


# -- routes -----------------------------------------------------------------------------------
async def completions(body: CompletionBody, http: Request):
    srv = server(http)
    adapter = srv.adapter_for(body.model)
    if isinstance(body.prompt, str):
        texts: list[str | None] = [body.prompt]
        prompts = [srv.prompt_ids(body.prompt, "prompt")]
    elif all(isinstance(p, int) for p in body.prompt):
        texts, prompts = [None], [srv.checked_ids(list(body.prompt))]
    else:  # a batch: texts, or token id lists
        texts = [p if isinstance(p, str) else None for p in body.prompt]
        prompts = [srv.prompt_ids(p, "prompt") if isinstance(p, str) else srv.checked_ids(list(p)) for p in body.prompt]
    if body.echo and body.stream:
        raise ApiError(400, "echo is answered whole: send it without stream", param="echo")
    echo_logprobs = body.logprobs if body.echo else None
    job = Job(srv.engine, prompts, adapter, body.params(body.max_tokens, 16, body.logprobs, echo_logprobs), "prompt")
    job.echo = body.echo  # the prompt as sent (token ids: decoded), then the completion
    job.prompt_texts = [t if t is not None else srv.tokenizer.decode(ids) for t, ids in zip(texts, prompts)]
    http.state.lorafit_log = (body.model if adapter else None, job)
    answer = Answer(body.model, chat=False, token_ids=body.return_tokens_as_token_ids)
    return await respond(job, http, answer, body.stream, body.include_usage)


async def chat_completions(body: ChatBody, http: Request):
    srv = server(http)
    adapter = srv.adapter_for(body.model)
    ids = srv.chat_ids([{"role": m.role, "content": m.text()} for m in body.messages], adapter)
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    job = Job(srv.engine, [ids], adapter, body.params(body.max_completion_tokens or body.max_tokens, 256, logprobs),
              "messages")
    http.state.lorafit_log = (body.model if adapter else None, job)
    answer = Answer(body.model, chat=True, token_ids=body.return_tokens_as_token_ids)
    return await respond(job, http, answer, body.stream, body.include_usage)


async def tokenize(body: TokenizeBody, http: Request):
    """vLLM's /tokenize: a prompt's token ids (with the tokenizer's special tokens unless
    add_special_tokens is false), or chat messages' as the base model's chat route renders them."""
    srv = server(http)
    tok = srv.tokenizer
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(400, "give either prompt or messages", param="prompt")
    if body.prompt is not None:
        ids = tok.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    else:
        adapter = srv.adapter_for(body.model) if body.model else None
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            ids = conversation_ids(tok, srv.engine.prompt_format(adapter), messages, body.add_generation_prompt,
                                   "messages")
        except LorafitError as e:
            raise ApiError(400, str(e), param="messages") from None
    return {"count": len(ids), "max_model_len": srv.engine.context_length, "tokens": ids,
            "token_strs": tok.convert_ids_to_tokens(ids) if body.return_token_strs else None}


async def detokenize(body: DetokenizeBody, http: Request):
    """vLLM's /detokenize: token ids back to text (special tokens kept, as vLLM does)."""
    tok = server(http).tokenizer
    if any(t < 0 or t >= len(tok) for t in body.tokens):
        raise ApiError(400, f"token ids must lie in [0, {len(tok)})", param="tokens")
    return {"prompt": tok.decode(body.tokens)}


async def tokenizer_info(http: Request):
    """vLLM's /tokenizer_info: the tokenizer's class, special tokens, chat template and context, so a
    client (lm-evaluation-harness' tokenizer_backend=remote) tokenizes as the server does."""
    srv = server(http)
    tok = srv.tokenizer
    return {"tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token, "bos_token": tok.bos_token,
            "pad_token": tok.pad_token, "unk_token": tok.unk_token, "chat_template": tok.chat_template,
            "model_max_length": srv.engine.context_length, "vocab_size": len(tok)}


async def models(http: Request):
    engine = server(http).engine
    created = int(time.time())
    data = [{"id": engine.base_name, "object": "model", "created": created, "owned_by": "lorafit",
             "root": engine.base_name, "parent": None}]
    data += [{"id": name, "object": "model", "created": created, "owned_by": "lorafit", "root": path,
              "parent": engine.base_name} for name, path in sorted(engine.adapters().items())]
    return {"object": "list", "data": data}


async def load_adapter(body: AdapterBody, http: Request):
    srv = server(http)
    folder = srv.adapter_folder(body.path)
    try:
        await run_in_threadpool(srv.engine.load_adapter, body.name, folder)
    except BadAdapterName as e:
        raise ApiError(400, str(e), param="name") from None
    except AdapterExists as e:
        raise ApiError(409, str(e), param="name", code="adapter_exists") from None
    except LorafitError as e:
        raise ApiError(400, str(e), param="path", code="adapter_invalid") from None
    return {"id": body.name, "object": "model", "owned_by": "lorafit", "parent": srv.engine.base_name}


async def unload_adapter(name: str, http: Request):
    try:
        holders = await run_in_threadpool(server(http).engine.unload_adapter, name)
    except UnknownAdapter as e:
        raise ApiError(404, str(e), param="name", code="model_not_found") from None
    return {"id": name, "object": "model", "deleted": True, "running_requests": holders}


async def health(http: Request):
    engine = server(http).engine
    return {"status": "ok", "model": engine.base_name, **engine.stats()}


async def authorize(http: Request) -> None:
    api_key = server(http).api_key
    if api_key is None or http.url.path == "/health":
        return
    scheme, _, token = http.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                       "authentication_error", code="invalid_api_key")


# -- errors -----------------------------------------------------------------------------------
async def api_error(_: Request, e: ApiError) -> JSONResponse:
    return e.response()


async def invalid_body(_: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0] if e.errors() else {}
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip(),
                        code="invalid_json").response()
    field = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    return ApiError(400, f"{field}: {first.get('msg', 'invalid value')}", param=field, code="invalid_value").response()


async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    return ApiError(e.status_code, str(e.detail), "invalid_request_error" if e.status_code < 500 else
                    "server_error").response()


async def crash(_: Request, e: Exception) -> JSONResponse:
    log.exception("unhandled error")
    return ApiError(500, f"internal error: {type(e).__name__}", "server_error").response()


# -- the request log --------------------------------------------------------------------------
class RequestLog:
    """ASGI middleware: one INFO line per HTTP request once its last byte is sent (streams included),
    `POST /v1/completions adapter=sql 200 tokens=12+30 412 ms`; the adapter and the tokens come from
    the route (`request.state.lorafit_log`), "-" where there are none."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not log.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        start, status, done = time.perf_counter(), [500], [False]

        def line() -> None:
            done[0] = True
            adapter, job = scope.get("state", {}).get("lorafit_log", (None, None))
            tokens = "-" if job is None else "{prompt_tokens}+{completion_tokens}".format(**job.usage())
            log.info("%s %s adapter=%s %d tokens=%s %.0f ms", scope["method"], scope["path"], adapter or "-",
                     status[0], tokens, 1000 * (time.perf_counter() - start))

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                line()

        try:
            await self.app(scope, receive, sending)
        finally:
            if not done[0]:  # the client went away before the answer was complete
                line()


# -- the app ----------------------------------------------------------------------------------
def create_app(engine: Engine, *, api_key: str | None = None, adapter_root: str | Path | None = None) -> FastAPI:
    """The ASGI app. The engine's scheduler starts with the app and stops with it."""

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        yield
        await run_in_threadpool(engine.stop)

    app = FastAPI(title="lorafit serve", lifespan=lifespan, dependencies=[Depends(authorize)])
    app.state.lorafit = Server(engine, api_key, Path(adapter_root) if adapter_root else None)
    for error, handler in ((ApiError, api_error), (RequestValidationError, invalid_body),
                           (StarletteHTTPException, http_error), (Exception, crash)):
        app.add_exception_handler(error, handler)
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/adapters", load_adapter, methods=["POST"])
    app.add_api_route("/v1/adapters/{name}", unload_adapter, methods=["DELETE"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/tokenize", tokenize, methods=["POST"])
    app.add_api_route("/detokenize", detokenize, methods=["POST"])
    app.add_api_route("/tokenizer_info", tokenizer_info, methods=["GET"])
    app.add_middleware(RequestLog)
    return app
