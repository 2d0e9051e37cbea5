"""Log-probs from the server: echo + logprobs equal a direct forward of the model with its adapter (a base
request and an adapter request prefilled in one batch), in OpenAI's legacy and chat shapes; vLLM's
/tokenize, /detokenize and /tokenizer_info."""

from __future__ import annotations

import httpx
import pytest
import torch

import lorafit as lf
from lorafit.model import load_model
from lorafit.serve.engine import Engine
from lorafit.serve.requests import SamplingParams
from tests.serve.live import API_KEY
from tests.serve.test_engine import Sink

AUTH = {"Authorization": f"Bearer {API_KEY}"}
TEXTS = ["the quick brown fox jumps over the lazy dog", "a server answers many clients"]


def direct(model, ids: list[int], adapter: str | None) -> torch.Tensor:
    """log p(token t | tokens < t) for t >= 1 from one plain forward, the adapter set the usual way."""
    x = torch.tensor([ids])
    with torch.no_grad():
        if adapter is None:
            with lf.disable_adapters(model):
                logits = model(x).logits[0]
        else:
            lf.set_adapter(model, adapter)
            logits = model(x).logits[0]
    logp = torch.log_softmax(logits.float(), -1)  # (T, vocab)
    return logp[:-1].gather(-1, x[0, 1:, None])[:, 0]


def test_prompt_logprobs_of_a_mixed_batch_equal_a_direct_forward(tiny):
    model_dir, adapters = tiny
    model, tokenizer = load_model(model_dir)
    engine = Engine(model, tokenizer, base_name="tiny", max_batch_size=8, max_wait_ms=500)
    engine.load_adapter("alpha", adapters["alpha"])
    batches = []
    model.register_forward_hook(lambda m, args, kwargs, out: batches.append(kwargs["input_ids"].shape),
                                with_kwargs=True)
    jobs = [(tokenizer(TEXTS[0]).input_ids, None), (tokenizer(TEXTS[1]).input_ids, "alpha")]
    sinks = [Sink() for _ in jobs]
    requests = [engine.submit(ids, adapter, SamplingParams(max_tokens=1, logprobs=3, prompt_logprobs=3), sink)
                for (ids, adapter), sink in zip(jobs, sinks)]  # both waiting before the scheduler starts
    engine.start()
    try:
        for sink in sinks:
            sink.result()
    finally:
        engine.stop()
    assert batches[0][0] == 2  # one prefill forward held the base row and the adapter row

    ref, _ = load_model(model_dir)
    lf.load_adapter(ref, adapters["alpha"], adapter="alpha", activate=False)
    for (ids, adapter), request in zip(jobs, requests):
        entries = request.prompt_logprobs
        assert entries[0] is None and len(entries) == len(ids)
        assert [e[0] for e in entries[1:]] == ids[1:]
        got = torch.tensor([e[1] for e in entries[1:]])
        torch.testing.assert_close(got, direct(ref, ids, adapter), atol=1e-4, rtol=0)
        for _, logprob, top in entries[1:]:  # top-3, best first, the chosen token's rank consistent
            assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1] and logprob <= top[0][1] + 1e-6
    # the two prompts score differently on the base and on alpha: the rows did not share an adapter
    base_on_alpha = direct(ref, jobs[1][0], None)
    assert not torch.allclose(torch.tensor([e[1] for e in requests[1].prompt_logprobs[1:]]), base_on_alpha, atol=1e-3)


def _post(server, path: str, body: dict) -> dict:
    r = httpx.post(server.url + path, json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_completions_echo_logprobs_in_openais_legacy_shape(server, tiny):
    model_dir, adapters = tiny
    ids = _post(server, "/tokenize", {"prompt": TEXTS[0], "add_special_tokens": False})["tokens"]
    body = {"model": "alpha", "prompt": [ids, ids], "max_tokens": 1, "logprobs": 2, "echo": True, "temperature": 0}
    out = _post(server, "/v1/completions", body)
    ref, tokenizer = load_model(model_dir)
    lf.load_adapter(ref, adapters["alpha"], adapter="alpha")
    want = direct(ref, ids, "alpha")
    for choice in out["choices"]:
        lp = choice["logprobs"]
        n = len(ids) + 1  # the prompt's tokens, then the one generated (or stop) token
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:len(ids)]), want, atol=1e-4, rtol=0)
        assert all(len(top) <= 2 for top in lp["top_logprobs"][1:])
        assert choice["text"].startswith(TEXTS[0]) and lp["text_offset"][0] == 0
        assert lp["text_offset"] == sorted(lp["text_offset"]) and "".join(lp["tokens"][:len(ids)]) == TEXTS[0]
    plain = _post(server, "/v1/completions", {"model": "alpha", "prompt": TEXTS[0], "max_tokens": 3, "logprobs": 0,
                                              "ignore_eos": True})["choices"][0]
    assert len(plain["logprobs"]["token_logprobs"]) == 3 and all(t == {} for t in plain["logprobs"]["top_logprobs"])
    assert plain["logprobs"]["text_offset"][0] == len(TEXTS[0]) and not plain["text"].startswith(TEXTS[0])


def test_chat_logprobs_and_streamed_logprobs(server):
    client = server.client()
    messages = [{"role": "user", "content": "hello world"}]
    chat = client.chat.completions.create(model="beta", messages=messages, max_tokens=4, logprobs=True,
                                          top_logprobs=2, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and "".join(c.token for c in content) == chat.choices[0].message.content
    for c in content:
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.logprob - 1e-6 and c.logprob <= 0
    streamed = list(client.chat.completions.create(model="beta", messages=messages, max_tokens=4, logprobs=True,
                                                   top_logprobs=2, stream=True, extra_body={"ignore_eos": True}))
    tokens = [c for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
              for c in chunk.choices[0].logprobs.content]
    assert [t.logprob for t in tokens] == pytest.approx([c.logprob for c in content], abs=1e-6)
    no = client.chat.completions.create(model="beta", messages=messages, max_tokens=2)
    assert no.choices[0].logprobs is None


def test_tokenizer_routes_in_vllms_shapes(server):
    info = httpx.get(server.url + "/tokenizer_info", headers=AUTH, timeout=10).json()
    assert info["eos_token"] == "<eos>" and info["model_max_length"] > 0 and "chat_template" in info
    tok = _post(server, "/tokenize", {"prompt": "hello world", "add_special_tokens": False})
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] == info["model_max_length"]
    assert _post(server, "/detokenize", {"tokens": tok["tokens"]})["prompt"] == "hello world"
    chat = _post(server, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]})
    assert _post(server, "/detokenize", {"tokens": chat["tokens"]})["prompt"] == "<|user|>hi\n<|assistant|>"
    for path, body, field in (("/tokenize", {}, "prompt"), ("/detokenize", {"tokens": [10**6]}, "tokens")):
        r = httpx.post(server.url + path, json=body, headers=AUTH, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == field
    r = httpx.post(server.url + "/v1/completions", json={"model": "alpha", "prompt": "hi", "echo": True,
                                                          "stream": True}, headers=AUTH, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"


def test_return_tokens_as_token_ids_names_every_token_by_its_id(server, tiny):
    """vLLM's `return_tokens_as_token_ids`: "token_id:<id>" for the tokens and their alternatives (exact
    where two ids decode alike; `lorafit verify --serve` reads them), the same log-probs as by text."""
    model_dir, adapters = tiny
    ids = _post(server, "/tokenize", {"prompt": TEXTS[1], "add_special_tokens": False})["tokens"]
    body = {"model": "alpha", "prompt": ids, "max_tokens": 2, "logprobs": 3, "echo": True, "ignore_eos": True}
    by_text = _post(server, "/v1/completions", body)["choices"][0]["logprobs"]
    by_id = _post(server, "/v1/completions", {**body, "return_tokens_as_token_ids": True})["choices"][0]["logprobs"]
    assert by_id["tokens"][:len(ids)] == [f"token_id:{t}" for t in ids]
    assert by_id["token_logprobs"] == by_text["token_logprobs"] and by_id["text_offset"] == by_text["text_offset"]
    ref, tokenizer = load_model(model_dir)
    for named, texts in zip(by_id["top_logprobs"][1:], by_text["top_logprobs"][1:]):  # by text, alike ones merge
        assert len(named) == 3 and {tokenizer.decode([int(n.removeprefix("token_id:"))]): lp
                                    for n, lp in named.items()} == texts
    chat = _post(server, "/v1/chat/completions", {"model": "beta", "messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 2, "logprobs": True, "top_logprobs": 2,
                                                  "ignore_eos": True, "return_tokens_as_token_ids": True})
    content = chat["choices"][0]["logprobs"]["content"]
    assert all(c["token"].startswith("token_id:") and len(c["top_logprobs"]) == 2 for c in content)
    assert all(a["token"].startswith("token_id:") for c in content for a in c["top_logprobs"])
