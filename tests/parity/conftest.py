"""The TRL parity tests' tokenizer: SmolLM2's, from the bundled GGUF (pad = EOS where it has none)."""

import pytest
from transformers import AutoTokenizer

from lorafit.model import default_gguf


@pytest.fixture(scope="module")
def tok():
    gguf = default_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
