"""Ollama's TEMPLATE from an adapter's prompt format: the Go template renders every conversation exactly as the
chat template does (BOS aside, which llama.cpp adds), and a template it cannot express is refused in one line."""

from __future__ import annotations

import pytest

from lorafit.errors import LorafitError
from lorafit.prompt import ALPACA, CHAT, TEXT, PromptFormat, conversation_ids
from lorafit.verify.modelfile import chat_pieces, go_template, modelfile, template_and_stops
from tests.export.kit import GEMMA_CHAT, spm_tokenizer
from tests.train.data.test_tokenize import THINKING
from tests.verify.gotemplate import parse_modelfile, render

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello {{ name }}"}],
    [{"role": "user", "content": "a\n\nb"}, {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}],
]


def _jinja(tok, messages) -> str:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text.removeprefix(tok.bos_token) if tok.bos_token and tok("a")["input_ids"][:1] == [tok.bos_token_id] \
        else text


@pytest.mark.parametrize("which", ["smollm2", "gemma"])
def test_the_go_template_renders_what_the_chat_template_renders(which, tokenizer):
    tok = tokenizer if which == "smollm2" else spm_tokenizer()
    if which == "gemma":
        assert tok.chat_template == GEMMA_CHAT  # writes {{ bos_token }} itself; the tokenizer adds BOS too
    template, stops = template_and_stops(tok, PromptFormat(CHAT))
    for messages in CONVERSATIONS:
        assert render(template, messages) == _jinja(tok, messages)
    assert (tok.eos_token if which == "smollm2" else "<end_of_turn>") in stops


def test_smollm2s_default_system_prompt_is_kept(tokenizer):
    """SmolLM2's template writes a default system message when there is none: so does the Go template."""
    pieces = chat_pieces(tokenizer)
    assert "SmolLM" in pieces.header
    assert "SmolLM" not in render(go_template(pieces), CONVERSATIONS[1])


def test_alpaca_and_text_formats(tokenizer):
    template, stops = template_and_stops(tokenizer, PromptFormat(ALPACA))
    messages = [{"role": "user", "content": "Say hi."}]
    ids = conversation_ids(tokenizer, PromptFormat(ALPACA), messages, True)
    assert render(template, messages) == tokenizer.decode(ids)
    assert template_and_stops(tokenizer, PromptFormat(TEXT))[0] == "{{ .Prompt }}"


def test_a_template_that_rewrites_earlier_turns_is_refused_in_one_line(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", THINKING)
    with pytest.raises(LorafitError, match="write the Modelfile's TEMPLATE by hand") as e:
        chat_pieces(tokenizer)
    assert "\n" not in str(e.value)


def test_the_modelfile_follows_the_documented_syntax(tokenizer, tmp_path):
    (tmp_path / "base.gguf").write_bytes(b"GGUF")
    (tmp_path / "adapter.gguf").write_bytes(b"GGUF")
    template, stops = template_and_stops(tokenizer, PromptFormat(CHAT))
    text = modelfile(str(tmp_path / "base.gguf"), "./adapter.gguf", template, stops, "two\nlines")
    parsed = parse_modelfile(text, tmp_path)
    assert [w for w, _ in parsed] == ["FROM", "ADAPTER", "TEMPLATE", *["PARAMETER"] * len(stops)]
    assert dict(parsed)["TEMPLATE"] == template
    with pytest.raises(AssertionError, match="not a documented parameter"):
        parse_modelfile(text + "PARAMETER stops \"x\"\n", tmp_path)
    with pytest.raises(LorafitError, match='contains """'):
        modelfile("base", "./a.gguf", 'say """', stops)
