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


def _ends_at_once(tokenizer):
    """A tiny Llama whose head always prefers EOS: every completion is empty."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)).eval()
    head = torch.nn.Linear(32, len(tokenizer), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = 1.0
    model.lm_head = head
    return model


def test_an_empty_completion_is_never_silent(smollm2, tmp_path, capsys):
    from lorafit import cli

    _, tokenizer = smollm2
    model = _ends_at_once(tokenizer)
    with pytest.warns(UserWarning, match="prompt 1: the model ended at once"):
        assert generate(model, tokenizer, [render_prompt(tokenizer, "Say hello")], max_new_tokens=3) == [""]
    # saved, the head loses its bias (Llama's has none): all logits 0, the argmax is token 0, <|endoftext|>
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert cli.main(["generate", "--model", str(tmp_path), "--device", "cpu", "--max-new-tokens", "3", "hi"]) == 0
    out, err = capsys.readouterr()
    assert out == "\n" and "lorafit generate: prompt 1: the model wrote only special or blank tokens (3 of them" in err
