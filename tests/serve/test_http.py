"""The server over real loopback HTTP, driven by the official `openai` client."""

from __future__ import annotations

import contextlib
import json
import os
import re
import time

import httpx
import openai
import pytest

from tests.serve.live import API_KEY
from tests.serve.tiny import save_adapter

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def health(server) -> dict:
    return httpx.get(server.url + "/health", timeout=10).json()


def wait_idle(server, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while (h := health(server))["running"] or h["waiting"]:
        assert time.monotonic() < deadline, h
        time.sleep(0.05)
    return h


def still_serves(server) -> None:
    """After every bad request: the server answers a normal one."""
    out = server.client().completions.create(model="alpha", prompt="hello world", max_tokens=3)
    assert out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens >= 1


def test_models_completions_chat_and_streams(server):
    client = server.client()
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == "model" and {"alpha", "beta", "gamma"} <= set(ids)

    plain = client.completions.create(model="beta", prompt="the quick brown fox", max_tokens=8, extra_body={
        "ignore_eos": True})
    assert plain.object == "text_completion" and plain.usage.completion_tokens == 8
    streamed = list(client.completions.create(model="beta", prompt="the quick brown fox", max_tokens=8, stream=True,
                                              extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "length"
    base = client.completions.create(model="model", prompt="the quick brown fox", max_tokens=8,
                                     extra_body={"ignore_eos": True})
    assert base.choices[0].text != plain.choices[0].text  # the model field picks the adapter
    assert client.completions.create(model="base", prompt="the quick brown fox", max_tokens=8,
                                     extra_body={"ignore_eos": True}).choices[0].text == base.choices[0].text

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    chat = client.chat.completions.create(model="gamma", messages=messages, max_tokens=6)
    assert chat.choices[0].message.role == "assistant" and chat.object == "chat.completion"
    chunks = list(client.chat.completions.create(model="gamma", messages=messages, max_tokens=6, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_each_request_is_one_log_line_and_no_warning_reaches_the_log(server):
    """--log-level info: method, path, adapter, status, prompt + completion tokens, ms; a stream's line
    once it ended. transformers' `past_key_values` FutureWarning stays out of the log."""
    client = server.client()
    start = len(server.log.read_text())  # this test's lines come after
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt="x", max_tokens=1)
    client.completions.create(model="beta", prompt="the quick brown fox", max_tokens=5, extra_body={"ignore_eos": True})
    list(client.completions.create(model="model", prompt="hello world", max_tokens=3, stream=True,
                                   extra_body={"ignore_eos": True}))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        log = server.log.read_text()
        lines = log[start:].splitlines()
        if len([line for line in lines if "POST /v1/completions" in line]) >= 3:
            break
        time.sleep(0.05)
    ours = [line for line in lines if "POST /v1/completions" in line][:3]
    assert re.fullmatch(r"INFO:     POST /v1/completions adapter=- 404 tokens=- \d+ ms", ours[0]), ours
    assert re.fullmatch(r"INFO:     POST /v1/completions adapter=beta 200 tokens=\d+\+5 \d+ ms", ours[1]), ours
    assert re.fullmatch(r"INFO:     POST /v1/completions adapter=- 200 tokens=\d+\+3 \d+ ms", ours[2]), ours
    assert "FutureWarning" not in log and "past_key_values" not in log


def test_raw_stream_ends_with_done(server):
    body = {"model": "alpha", "prompt": "hello", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.base_url + "/completions", json=body, headers=AUTH, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(json.loads(line[6:])["object"] == "text_completion" for line in lines[:-1])


def test_adapters_load_and_unload_while_requests_run(server):
    client = server.client()
    long = {"max_tokens": 300, "extra_body": {"ignore_eos": True}}
    r = httpx.post(server.base_url + "/adapters", json={"name": "hot", "path": "delta"}, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    expected = client.completions.create(model="hot", prompt="hello world", **long).choices[0].text

    # a long stream on "hot" is running; unload it, load another adapter, serve that one meanwhile
    stream = client.completions.create(model="hot", prompt="hello world", stream=True, **long)
    parts = [next(stream).choices[0].text]
    r = httpx.delete(server.base_url + "/adapters/hot", headers=AUTH, timeout=30)
    assert r.status_code == 200 and r.json()["running_requests"] == 1, r.text  # deferred: still in use
    assert "hot" not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="hot", prompt="x", max_tokens=2)
    r = httpx.post(server.base_url + "/adapters", json={"name": "hot", "path": "beta"}, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    other = client.completions.create(model="hot", prompt="hello world", **long).choices[0].text
    parts += [c.choices[0].text for c in stream]
    assert "".join(parts) == expected  # finished on the adapter it started with
    assert other != expected
    assert httpx.delete(server.base_url + "/adapters/hot", headers=AUTH, timeout=30).json()["running_requests"] == 0
    still_serves(server)


def test_post_with_a_loaded_name_hot_swaps(server, tiny):
    client = server.client()

    def text(model: str) -> str:
        return client.completions.create(model=model, prompt="hello world", max_tokens=8,
                                         extra_body={"ignore_eos": True}).choices[0].text

    def post(path: str) -> httpx.Response:
        return httpx.post(server.base_url + "/adapters", json={"name": "swap", "path": path}, headers=AUTH,
                          timeout=30)

    assert post("alpha").status_code == 200
    on_alpha = text("swap")
    assert on_alpha == text("alpha")
    for path, same_as in (("delta", None), ("beta", "beta")):  # delta: the same rank (in place); beta: rank 8
        r = post(path)
        assert r.status_code == 200, r.text
        swapped = text("swap")
        assert swapped != on_alpha
        if same_as:
            assert swapped == text(same_as)  # equal to the adapter loaded fresh from that folder
    models = {m.id: m for m in client.models.list().data}
    assert models["swap"].root.endswith("beta")
    save_adapter(tiny[0], server.adapter_root / "swap-dora", rank=2, seed=1, use_dora=True)
    r = post("swap-dora")
    assert r.status_code == 400 and r.json()["error"]["message"].count("\n") == 0, r.text
    assert text("swap") == text("beta")  # a refused swap changes nothing
    assert httpx.delete(server.base_url + "/adapters/swap", headers=AUTH, timeout=30).status_code == 200
    still_serves(server)


def test_unknown_adapter_404(server):
    with pytest.raises(openai.NotFoundError) as e:
        server.client().completions.create(model="no-such-adapter", prompt="hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and "no-such-adapter" in e.value.body["message"]
    still_serves(server)


@pytest.mark.parametrize(("body", "field"), [
    (b'{"model": "alpha", "prompt": "x", ', None),  # not JSON
    (b'[1, 2]', None),
    (b'{"model": "alpha", "prompt": "x", "max_tokens": "many"}', "max_tokens"),
    (b'{"model": "alpha", "prompt": "x", "temperature": -1}', "temperature"),
    (b'{"model": "alpha", "prompt": 5}', "prompt"),
    (b'{"prompt": "x"}', "model"),
    (b'{"model": "alpha", "prompt": [999999]}', "prompt"),
    (b'{"model": "alpha", "prompt": ""}', "prompt"),
    (b'{"model": "alpha", "prompt": "x", "n": 2}', "n"),
])
def test_malformed_requests_400(server, body, field):
    r = httpx.post(server.base_url + "/completions", content=body, timeout=30,
                   headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code in (400, 422), r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if field:
        assert error["param"] == field or error["param"].startswith(field), error
    still_serves(server)


def test_chat_wrong_types_400(server):
    r = httpx.post(server.base_url + "/chat/completions", headers=AUTH, timeout=30,
                   json={"model": "alpha", "messages": [{"role": "user", "content": 3}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages"), r.text
    still_serves(server)


def test_prompt_longer_than_context_400(server):
    with pytest.raises(openai.BadRequestError) as e:
        server.client().completions.create(model="alpha", prompt="hello world " * 400, max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model="alpha", max_tokens=2,
                                                messages=[{"role": "user", "content": "hello world " * 400}])
    still_serves(server)


def test_adapter_paths_outside_root_403(server, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    link = server.adapter_root / "sneaky"
    if not link.exists():
        os.symlink(outside, link)
    for path in ["../model", "alpha/../../model", str(outside), "/etc", "sneaky"]:
        r = httpx.post(server.base_url + "/adapters", json={"name": "x", "path": path}, headers=AUTH, timeout=30)
        assert r.status_code == 403, (path, r.text)
        assert r.json()["error"]["type"] == "permission_error"
    r = httpx.post(server.base_url + "/adapters", json={"name": "x", "path": "missing"}, headers=AUTH, timeout=30)
    assert r.status_code == 404
    r = httpx.post(server.base_url + "/adapters", json={"name": "../x", "path": "alpha"}, headers=AUTH, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "name"
    r = httpx.post(server.base_url + "/adapters", json={"name": "base", "path": "alpha"}, headers=AUTH, timeout=30)
    assert r.status_code == 409  # the base model's name
    still_serves(server)


@pytest.mark.parametrize("config", [{"use_dora": True}, {"modules_to_save": ["lm_head"]}])
def test_adapters_that_cannot_share_a_batch_400(server, tiny, config):
    folder = server.adapter_root / f"unservable-{next(iter(config))}"
    save_adapter(tiny[0], folder, rank=2, seed=1, **config)
    r = httpx.post(server.base_url + "/adapters", json={"name": folder.name, "path": folder.name}, headers=AUTH,
                   timeout=30)
    assert r.status_code == 400 and "cannot be served alongside" in r.json()["error"]["message"], r.text
    assert folder.name not in [m.id for m in server.client().models.list().data]
    still_serves(server)


def test_api_key_401(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        r = httpx.post(server.base_url + "/completions", json={"model": "alpha", "prompt": "hi"}, headers=headers,
                       timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"  # health needs no key
    still_serves(server)


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_frees_its_slot(server, stream):
    before = wait_idle(server)
    body = {"model": "gamma", "prompt": "hello", "max_tokens": 500, "stream": stream, "ignore_eos": True}
    if stream:
        with httpx.stream("POST", server.base_url + "/completions", json=body, headers=AUTH, timeout=30) as r:
            next(r.iter_lines())  # one chunk, then hang up
    else:
        with contextlib.suppress(httpx.TimeoutException):  # the client gives up after a fifth of a second
            httpx.post(server.base_url + "/completions", json=body, headers=AUTH, timeout=0.2)
    after = wait_idle(server)
    assert after["completed"] == before["completed"]  # dropped, not run to the end
    still_serves(server)
