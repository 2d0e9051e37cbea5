"""Generation: batched, through the chat template, on whatever device the model is on.

Device-agnostic is checked with PyTorch's default device set to `meta` while the model runs on the CPU:
every tensor lorafit creates must take its device from the model, so a tensor made on the *default*
device (what `torch.tensor(ids)` without `device=` would quietly make on the CPU next to a GPU model)
has no data and the run fails. It cannot pass by accident: the last test plants one such tensor and
shows the run then fails.
"""

import pytest
import torch

from lorafit.generate import generate, render_prompt
from lorafit.model import load_model


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_model(smollm2_dir)


def _prompts(tokenizer):
    return [render_prompt(tokenizer, "Say hello"), render_prompt(tokenizer, "Name a colour in one word")]


def test_generation_creates_nothing_on_an_implicit_device(smollm2):
    model, tokenizer = smollm2
    expected = generate(model, tokenizer, _prompts(tokenizer), max_new_tokens=5)
    with torch.device("meta"):
        got = generate(model, tokenizer, _prompts(tokenizer), max_new_tokens=5)
    assert got == expected and all(got)


def test_an_implicit_device_tensor_is_caught(smollm2):
    model, tokenizer = smollm2
    planted = model.model.norm.register_forward_hook(lambda module, args, out: out + torch.zeros(1))
    try:
        with torch.device("meta"), pytest.raises((RuntimeError, NotImplementedError)):
            generate(model, tokenizer, _prompts(tokenizer), max_new_tokens=2)
    finally:
        planted.remove()
