"""A bounded load test on loopback: many concurrent clients over several adapters, two rounds.

Round 1 warms every allocator and cache; round 2 must then run without errors and without the
server's resident memory growing (a leak per request would show as growth proportional to the
requests served). Numbers are printed (`pytest -s`) for a feel of throughput, not asserted.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import httpx
import pytest

from tests.serve.live import API_KEY

CLIENTS, PER_ROUND, MAX_TOKENS, ROUND_BOUND_S = 64, 256, 8, 90  # 512 requests over the two rounds
MODELS = ["model", "alpha", "beta", "gamma", "load-delta"]


async def _round(base_url: str) -> tuple[list[float], list[str], int, float]:
    """(latencies, errors, completion tokens, seconds) for PER_ROUND requests from CLIENTS clients."""
    todo = list(range(PER_ROUND))
    latencies: list[float] = []
    errors: list[str] = []
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while todo:
            i = todo.pop()
            body = {"model": MODELS[i % len(MODELS)], "prompt": f"request {i}: the quick brown fox",
                    "max_tokens": MAX_TOKENS, "stream": i % 2 == 0, "stream_options": {"include_usage": True}}
            t = time.perf_counter()
            try:
                r = await http.post("/completions", json=body)
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                if body["stream"]:
                    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
                    assert events[-1] == "[DONE]"
                    tokens += json.loads(events[-2])["usage"]["completion_tokens"]
                else:
                    tokens += r.json()["usage"]["completion_tokens"]
            except (httpx.HTTPError, AssertionError, ValueError, KeyError) as e:
                errors.append(repr(e))
                continue
            latencies.append(time.perf_counter() - t)

    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"},
                                 timeout=60, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(client(http) for _ in range(CLIENTS))), ROUND_BOUND_S)
        return latencies, errors, tokens, time.perf_counter() - start


@pytest.mark.load
def test_load_two_rounds_no_errors_no_growth(server):
    r = httpx.post(server.base_url + "/adapters", json={"name": "load-delta", "path": "delta"},
                   headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert r.status_code == 200, r.text
    rss = []
    for n in (1, 2):
        latencies, errors, tokens, seconds = asyncio.run(_round(server.base_url))
        health = httpx.get(server.url + "/health", timeout=10).json()
        rss.append(health["rss_bytes"])
        q = statistics.quantiles(latencies, n=20)
        print(f"\nround {n}: {PER_ROUND} requests, {CLIENTS} clients, {len(MODELS)} models in {seconds:.1f}s: "
              f"{PER_ROUND / seconds:.1f} req/s, {tokens / seconds:.0f} tok/s, p50 {q[9] * 1000:.0f} ms, "
              f"p95 {q[18] * 1000:.0f} ms, rss {health['rss_bytes'] / 2**20:.0f} MiB")
        assert not errors and len(latencies) == PER_ROUND, (errors[:5], server.log.read_text()[-3000:])
        assert health["running"] == 0 and health["waiting"] == 0
    assert rss[1] - rss[0] < 32 * 2**20, rss  # round 2 runs in the memory round 1 left
