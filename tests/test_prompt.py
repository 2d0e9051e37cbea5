"""One prompt format from training to generation to serving (lorafit.prompt).

The acceptance tests train a real (tiny) adapter with the Trainer, then run `lorafit generate` (the CLI's
function, in this process) and `lorafit serve`'s chat route (the real app and engine) with it, and read
the token ids each feeds the model from a forward hook on every module: they must be the masked prompt
part of the training sample of the same instruction. Once for a tokenizer without a chat template (the
instruction format, recorded next to the adapter) and once for one with a template that writes its own
BOS while the tokenizer adds one too (BOS must still come once).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lorafit import cli
from lorafit.config import LoraConfig
from lorafit.errors import LorafitError
from lorafit.io import PROMPT_NAME, read_prompt_format
from lorafit.model import load_model
from lorafit.prompt import (
    ALPACA,
    CHAT,
    TEXT,
    PromptFormat,
    conversation_ids,
    default_format,
    prompt_ids,
    stop_ids,
    text_ids,
)
from lorafit.serve.app import create_app
from lorafit.serve.engine import Engine
from lorafit.train.data import IGNORE, DataConfig, load_data
from lorafit.train.trainer import TrainConfig, Trainer
from tests.export.kit import spm_tokenizer

RECORDS = [{"instruction": "Write the date in ISO form.", "output": "1998-03-03"},
           {"instruction": "Name a colour.", "output": "blue"},
           {"instruction": "Count to three.", "output": "one two three"}]


@pytest.fixture(scope="module")
def spm():
    """A Gemma-shaped SentencePiece BPE: adds <bos> to every encoding; its template writes {{ bos_token }}."""
    return spm_tokenizer()


def _plain(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token="<bos>", eos_token="<eos>",
                                  unk_token="<unk>", pad_token="<pad>")
    tok.chat_template = None
    return tok


# -- the renderer ---------------------------------------------------------------------------------
def test_bos_exactly_once_whether_or_not_the_template_writes_it(spm):
    bos = spm.bos_token_id
    assert spm("hi")["input_ids"][0] == bos and "{{ bos_token }}" in spm.chat_template
    ids = conversation_ids(spm, PromptFormat(CHAT), [{"role": "user", "content": "hi"}], True)
    assert ids[0] == bos and ids.count(bos) == 1
    silent = spm_tokenizer()  # a template that does not write BOS: the renderer puts the tokenizer's one in
    silent.chat_template = spm.chat_template.replace("{{ bos_token }}", "")
    assert conversation_ids(silent, PromptFormat(CHAT), [{"role": "user", "content": "hi"}], True) == ids
    assert text_ids(spm, "<bos>hi").count(bos) == 1 and text_ids(spm, "hi")[0] == bos
    plain = _plain(spm)
    assert prompt_ids(plain, PromptFormat(ALPACA), "hi").count(bos) == 1


def test_alpaca_conversations_start_with_their_prompt(spm):
    tok, fmt = _plain(spm), PromptFormat(ALPACA)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."},
                {"role": "assistant", "content": "hi"}, {"role": "user", "content": "Again."}]
    for i in range(1, len(messages) + 1):
        head = conversation_ids(tok, fmt, messages[:i], True)
        whole = conversation_ids(tok, fmt, messages[:i] + [{"role": "assistant", "content": "ok"}], False)
        assert whole[:len(head)] == head and whole[-1] == tok.eos_token_id
    text = tok.decode(conversation_ids(tok, fmt, messages, True))
    assert text == "<bos>Be brief.\n\n### Instruction:\nSay hi.\n\n### Response:\nhi<eos>### Instruction:\nAgain." \
                   "\n\n### Response:\n"
    assert conversation_ids(tok, fmt, messages[1:2], True) == prompt_ids(tok, fmt, "Say hi.")
    with pytest.raises(LorafitError, match="role 'tool'"):
        conversation_ids(tok, fmt, [{"role": "tool", "content": "x"}], True)
    with pytest.raises(LorafitError, match="plain text"):
        conversation_ids(tok, PromptFormat(TEXT), messages, True)


def test_formats_and_stop_tokens(spm, tmp_path):
    assert default_format(spm) == PromptFormat(CHAT) and default_format(_plain(spm)) == PromptFormat(ALPACA)
    assert default_format(spm, "text") == PromptFormat(TEXT)
    assert PromptFormat.from_dict(PromptFormat(ALPACA).to_dict()) == PromptFormat(ALPACA)
    assert spm.convert_tokens_to_ids("<end_of_turn>") in stop_ids(spm) and spm.eos_token_id in stop_ids(spm)
    (tmp_path / PROMPT_NAME).write_text(json.dumps({"kind": "jinja"}))
    with pytest.raises(LorafitError, match="lorafit_prompt.json: prompt format 'jinja' is unknown"):
        read_prompt_format(tmp_path)


# -- acceptance: generate and serve feed the model the training prompt ------------------------
def _train(tok, root: Path) -> tuple[Path, Path, list]:
    """A tiny Llama folder for `tok`, and an adapter trained on RECORDS by the Trainer (1 step)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id)).eval()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    splits = load_data(tok, DataConfig(path=str(data), max_seq_length=128))
    Trainer(TrainConfig(output_dir=str(root / "run"), lora=LoraConfig(r=4), max_steps=1, batch_size=3),
            model, tok, splits.train, prompt_format=splits.prompt_format).train()
    return root / "model", root / "run" / "adapter", splits.train


class FirstInputs:
    """The token ids of the first forward pass (the prefill of one prompt, so no padding): what the
    first embedding lookup of any module in this process receives while the context is open."""

    def __enter__(self) -> FirstInputs:
        self.ids: list[int] | None = None

        def hook(module, args):
            if self.ids is None and isinstance(module, torch.nn.Embedding):
                self.ids = args[0][0].tolist()

        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def _generate_feeds(model_dir: Path, adapter: Path, instruction: str, capsys) -> list[int]:
    with FirstInputs() as seen:
        assert cli.main(["generate", "--model", str(model_dir), "--adapter", str(adapter), "--device", "cpu",
                         "--max-new-tokens", "2", instruction]) == 0
    capsys.readouterr()
    return seen.ids


def _serve_feeds(model_dir: Path, adapter: Path, instruction: str) -> list[int]:
    model, tokenizer = load_model(model_dir)
    engine = Engine(model, tokenizer, base_name="tiny")
    engine.load_adapter("mine", adapter)
    with TestClient(create_app(engine)) as client, FirstInputs() as seen:
        reply = client.post("/v1/chat/completions", json={
            "model": "mine", "max_tokens": 2, "messages": [{"role": "user", "content": instruction}]})
        assert reply.status_code == 200, reply.text
    return seen.ids


def _prompt_part(sample) -> list[int]:
    n = next(i for i, label in enumerate(sample.labels) if label != IGNORE)
    return sample.input_ids[:n]


@pytest.mark.parametrize("template", [False, True], ids=["no-chat-template", "chat-template"])
def test_generate_and_serve_feed_the_training_prompt(spm, template, tmp_path, capsys):
    tok = spm_tokenizer() if template else _plain(spm)
    model_dir, adapter, samples = _train(tok, tmp_path)
    recorded = read_prompt_format(adapter)
    assert recorded == PromptFormat(CHAT if template else ALPACA)
    instruction, sample = RECORDS[0]["instruction"], samples[0]
    want = _prompt_part(sample)
    assert want[0] == tok.bos_token_id and want.count(tok.bos_token_id) == 1
    assert tok.decode(want).endswith("<start_of_turn>model\n" if template else "### Response:\n")
    assert _generate_feeds(model_dir, adapter, instruction, capsys) == want
    assert _serve_feeds(model_dir, adapter, instruction) == want
