"""The engine's adapter registry: files read once, names checked once, stacked copies freed on delete."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

import lorafit.io
from lorafit.lora.inject import adapter_configs
from lorafit.model import load_model
from lorafit.serve.engine import Engine
from lorafit.serve.requests import AdapterExists, BadAdapterName, SamplingParams

OPENED: list[Counter] = []  # the audit hook below counts into the last Counter here while a test runs one


def _audit(event: str, args: tuple) -> None:
    if event == "open" and OPENED and isinstance(args[0], (str, Path)):
        OPENED[-1][str(args[0])] += 1


sys.addaudithook(_audit)  # audit hooks cannot be removed; this one counts only while OPENED is not empty


@pytest.fixture
def engine(tiny):
    model, tokenizer = load_model(tiny[0])
    return Engine(model, tokenizer, base_name="tiny")


def test_each_adapter_file_is_opened_once_per_load(tiny, engine, monkeypatch):
    folder = tiny[1]["alpha"]
    loads: Counter = Counter()
    real_load_file = lorafit.io.load_file

    def counting_load_file(path, *args, **kwargs):  # safetensors opens the file in Rust, out of the audit's sight
        loads[str(path)] += 1
        return real_load_file(path, *args, **kwargs)

    monkeypatch.setattr(lorafit.io, "load_file", counting_load_file)
    OPENED.append(Counter())
    try:
        engine.load_adapter("alpha", folder)
    finally:
        opened = OPENED.pop()
    weights, config = folder / lorafit.io.WEIGHTS_NAME, folder / lorafit.io.CONFIG_NAME
    assert loads == {str(weights): 1}
    assert {p: n for p, n in opened.items() if p.startswith(str(folder))} == {str(config): 1}
    assert engine.adapters() == {"alpha": str(folder)}


def test_names_are_checked_once_with_the_library_rule(tiny, engine):
    with pytest.raises(BadAdapterName, match="1-64 letters"):
        engine.load_adapter("../x", tiny[1]["alpha"])
    with pytest.raises(AdapterExists):
        engine.load_adapter("tiny", tiny[1]["alpha"])  # the base model's name
    longest = "a" * 64  # valid for the library, so valid here (the internal name is derived, not checked)
    engine.load_adapter(longest, tiny[1]["alpha"])
    assert engine.resolve(longest) == longest


def test_router_keeps_its_own_stacks_and_frees_them_with_the_adapters(tiny, engine):
    from tests.serve.test_engine import Sink

    for name in ("alpha", "beta"):
        engine.load_adapter(name, tiny[1][name])
    engine.start()
    try:
        sinks = [Sink(), Sink()]
        ids = engine.tokenizer("hello world").input_ids
        for name, sink in zip(("alpha", "beta"), sinks):
            engine.submit(ids, name, SamplingParams(max_tokens=4), sink)
        for sink in sinks:
            sink.result()
        assert len(engine.router.stacks) > 0  # the decode steps stacked alpha and beta, in the engine's cache
        engine.unload_adapter("alpha")  # nobody holds it: deleted now, and the stacked copies with it
        assert len(engine.router.stacks) == 0
        assert len(adapter_configs(engine.model)) == 1
    finally:
        engine.stop()
