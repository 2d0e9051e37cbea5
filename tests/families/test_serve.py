"""The family matrix, serving side: per-row adapters in one batch give every request its solo tokens.

Each family's server runs two adapters and the base side by side: requests on different adapters share
every forward, some join a batch already decoding, and requests on one adapter that start alike share a
prefix. The reference is transformers' own greedy `generate`, one request at a time, its adapter set the
usual way. Prompts and completions run past the sliding window (8 tokens) of Mistral, Gemma 2, Gemma 3,
Gemma 4, gpt-oss and OLMo 3 and past Llama 4's attention chunks, so those layers attend over a KV cache
longer than the window. The hybrid families (Qwen3.5, Qwen3-Next, Granite 4, LFM2) keep a recurrent or
convolution state per row: prompts of different lengths are left-padded in front of it, rows join the
running batch and leave it, and every row still gets its solo tokens; their engine shares no prefix.
"""

from __future__ import annotations

import pytest

import lorafit as lf
from lorafit.model import load_model
from lorafit.serve.engine import Engine
from lorafit.serve.prefix import shared_prefixes
from lorafit.serve.requests import Request, SamplingParams
from tests.families.kit import FAMILIES, RECURRENT, WINDOW, randomize, save_model, tokenizer
from tests.serve.test_engine import run_mixed, solo

PROMPTS = ["the quick brown fox jumps over the lazy dog and then", "hello world", "a",
           "adapters share one base model in a batch, and a server answers many clients at once"]
SHARED = "a server answers many clients at once, tokens stream back as they come:"  # > 8 tokens in common
NEW = 14  # tokens per request: past the window after any prompt
SLIDING = ("mistral", "gemma2", "gemma3", "gemma4", "gpt_oss", "olmo3", "llama4")  # windows (llama4: chunks): no shared prefix


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


def _adapters(family, tok, folder):
    """Two adapters of different ranks and targets, saved from the model in `folder`."""
    paths = {}
    for i, (name, config) in enumerate({"one": lf.LoraConfig(r=4), "two": lf.LoraConfig(r=2, target_modules="all-linear")
                                         }.items()):
        model, _ = load_model(folder)
        lf.apply_lora(model, config)
        randomize(model, seed=10 + i, std=0.3)
        paths[name] = lf.save_adapter(model, folder.parent / name)
    return paths


@pytest.mark.parametrize("family", FAMILIES)
def test_per_row_adapters_equal_solo_runs(family, tok, tmp_path):
    folder = save_model(family, tok, tmp_path / "model")
    adapters = _adapters(family, tok, folder)
    ref, _ = load_model(folder)
    for name, path in adapters.items():
        lf.load_adapter(ref, path, adapter=name, activate=False)
    # two requests on "two" start alike (a shared prefix, where the window allows one), the rest mix
    # the base and "one"; the last three join the batch while it decodes
    jobs = [(tok(SHARED + " " + tail).input_ids, "two") for tail in ("hello world", "the lazy dog")]
    jobs += [(tok(p).input_ids, [None, "one"][(i + j) % 2]) for i, p in enumerate(PROMPTS) for j in range(2)]
    assert max(len(ids) for ids, _ in jobs) > WINDOW
    want = [solo(ref, tok, ids, adapter, NEW) for ids, adapter in jobs]
    assert want[2] != want[3]  # the adapter matters

    model, _ = load_model(folder)
    engine = Engine(model, tok, base_name=family, max_batch_size=16, max_wait_ms=50)
    for name, path in adapters.items():
        engine.load_adapter(name, path)
    early = [Request(ids, None, SamplingParams(max_tokens=NEW), print, internal=a) for ids, a in jobs[:-3]]
    groups, _ = shared_prefixes(early, engine.window) if engine.share_prefixes else ([], early)  # prefilled once
    assert len(groups) == (0 if family in SLIDING + RECURRENT else 1) and (engine.window == WINDOW) == (family in SLIDING)
    assert engine.recurrent == (family in RECURRENT)
    engine.start()
    try:
        assert run_mixed(engine, jobs, NEW, late=3) == want
    finally:
        engine.stop()
