"""The paths `lorafit verify` asks another program for: a GGUF in llama.cpp, and a running server.

    llama.cpp   the merged model exported as GGUF (or a GGUF file given), run through llama-cpp-python with
                every position's logits kept and an f32 KV cache, so the file's weights are what differ
    server      an OpenAI-compatible endpoint (`lorafit serve`, vLLM, SGLang): /v1/completions with each
                probe prefix as token ids, one greedy token, `logprobs: k`, `return_tokens_as_token_ids`
                and `ignore_eos` (so a stop token is reported like any other)
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import torch
import torch.nn.functional as F

from lorafit.errors import LorafitError
from lorafit.fingerprint import Probe

LLAMA_CPP_MISSING = "llama-cpp-python is not installed (pip install llama-cpp-python)"


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def gguf_logprobs(path: str | Path, probes: list[Probe]) -> list[torch.Tensor]:
    """Per probe, llama.cpp's (positions, vocab) log-probs for the GGUF at `path`."""
    import llama_cpp

    n_ctx = max(len(p.ids) for p in probes) + 8
    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, verbose=False, seed=0, type_k=0, type_v=0)
    try:
        out = []
        for p in probes:
            llm.reset()
            llm.eval(p.ids)
            logits = torch.tensor(llm.scores[: len(p.ids)], dtype=torch.float32)  # (T, V)
            out.append(F.log_softmax(logits[p.positions], dim=-1))
        return out
    finally:
        llm.close()


def api_base(url: str) -> str:
    """The /v1 root of an OpenAI-compatible server from what a user types (with or without /v1)."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise LorafitError(f"--serve {url}: give the server's address, e.g. http://127.0.0.1:8000")
    return url if url.endswith("/v1") else url + "/v1"


def _post(url: str, body: dict, api_key: str | None, timeout: float) -> dict:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = e.reason
        raise LorafitError(f"--serve {url}: HTTP {e.code}: {message}") from None
    except (urllib.error.URLError, OSError) as e:
        raise LorafitError(f"--serve {url}: cannot reach the server ({getattr(e, 'reason', e)}); is it running?") from None


def server_top(url: str, model: str, probes: list[Probe], k: int, api_key: str | None = None,
               timeout: float = 120.0) -> list[list[list[tuple[int, float]]]]:
    """Per probe and position, the server's top-k (token, log-prob) of the next token."""
    endpoint = api_base(url) + "/completions"
    out = []
    for p in probes:
        tops = []
        for t in p.positions:
            body = {"model": model, "prompt": p.ids[: t + 1], "max_tokens": 1, "temperature": 0, "logprobs": k,
                    "return_tokens_as_token_ids": True, "ignore_eos": True}
            answer = _post(endpoint, body, api_key, timeout)
            try:
                top = answer["choices"][0]["logprobs"]["top_logprobs"][0]
                tops.append(sorted(((int(name.removeprefix("token_id:")), float(lp)) for name, lp in top.items()),
                                   key=lambda x: -x[1]))
            except (KeyError, IndexError, TypeError, ValueError):
                raise LorafitError(f"--serve {endpoint}: the answer has no token-id log-probs (the server must "
                                   "support `logprobs` and `return_tokens_as_token_ids`, as lorafit serve and "
                                   "vLLM do)") from None
        out.append(tops)
    return out
