"""The family matrix, prompt side: each family's turn format trains on the replies only and is prompted at
inference exactly as its training samples begin.

Each family gets a chat template written here in its turn format (the markers its published templates use,
added to the matrix tokenizer as special tokens), the thinking formats included: Qwen3.5 / Qwen3-Next and
SmolLM3 write an empty think block before a reply given without reasoning, in the training sample and in the
generation prompt alike (their no-thinking mode); gpt-oss writes the harmony channel. For every family:
a two-turn conversation trains exactly the two replies and their end-of-turn tokens, the end-of-turn token is
one the generation stops on, and the prompt `lorafit generate` and `lorafit serve` feed for an instruction is
the masked start of that instruction's training sample. GPT-2 and GPT-NeoX have no chat template: lorafit's
instruction format stands in, with the same checks.
"""

from __future__ import annotations

import pytest

from lorafit.prompt import default_format, prompt_ids, stop_ids
from lorafit.train.data import IGNORE, Record, tokenize_record
from tests.families.kit import FAMILIES, tokenizer


def _turns(start: str, end: str, roles: dict[str, str] | None = None, reply_prefix: str = "",
           bos: str = "") -> str:
    """A template of turns `{start}{reply_prefix if a reply}{content}{end}` (`start` may hold `{role}`, renamed
    through `roles`); the generation prompt is the assistant's `start` and `reply_prefix`."""
    roles = roles or {}
    role = "{{ " + repr(roles) + ".get(m['role'], m['role']) }}"
    head = start.replace("{role}", role)
    gen_head = start.replace("{role}", roles.get("assistant", "assistant"))
    template = (bos + "{% for m in messages %}" + head
                + "{% if m['role'] == 'assistant' %}" + reply_prefix + "{% endif %}{{ m['content'] }}" + end
                + "{% endfor %}{% if add_generation_prompt %}" + gen_head + reply_prefix + "{% endif %}")
    return template


THINK = "<think>\n\n</think>\n\n"  # the empty think block of a reply without reasoning
CHATML = (_turns("<|im_start|>{role}\n", "<|im_end|>\n"), ["<|im_start|>", "<|im_end|>"])
CHATML_THINK = (_turns("<|im_start|>{role}\n", "<|im_end|>\n", reply_prefix=THINK),
                ["<|im_start|>", "<|im_end|>", "<think>", "</think>"])
GEMMA = (_turns("<start_of_turn>{role}\n", "<end_of_turn>\n", {"assistant": "model"}), ["<start_of_turn>", "<end_of_turn>"])
# Mistral and Ministral 3: [INST]...[/INST] around a user turn, a reply closed by EOS (no assistant header)
MISTRAL = ("{% for m in messages %}{% if m['role'] == 'user' %}[INST]{{ m['content'] }}[/INST]{% else %}"
           "{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}", ["[INST]", "[/INST]"])
# gpt-oss (harmony): a reply names its channel; the generation prompt stops after the role, the model writes
# the channel itself, so it is trained with the reply
HARMONY = ("{% for m in messages %}<|start|>{{ m['role'] }}{% if m['role'] == 'assistant' %}<|channel|>final"
           "{% endif %}<|message|>{{ m['content'] }}<|end|>{% endfor %}{% if add_generation_prompt %}<|start|>assistant"
           "{% endif %}", ["<|start|>", "<|message|>", "<|end|>", "<|channel|>"])
LLAMA3 = (_turns("<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>"), ["<|start_header_id|>",
                                                                                    "<|end_header_id|>", "<|eot_id|>"])
TEMPLATES = {
    "llama": LLAMA3, "mistral": MISTRAL,
    "qwen2": CHATML, "qwen3": CHATML_THINK, "gemma2": GEMMA, "gemma3": GEMMA,
    "phi3": (_turns("<|{role}|>\n", "<|end|>\n"), ["<|user|>", "<|assistant|>", "<|end|>"]),
    "olmo2": CHATML,
    "gemma4": (_turns("<|turn>{role}\n", "<turn|>\n", {"assistant": "model"}), ["<|turn>", "<turn|>"]),
    "qwen3_5": CHATML_THINK, "qwen3_5_moe": CHATML_THINK, "qwen3_next": CHATML_THINK,
    "gpt_oss": HARMONY,
    "llama4": (_turns("<|header_start|>{role}<|header_end|>\n\n", "<|eot|>"), ["<|header_start|>", "<|header_end|>",
                                                                               "<|eot|>"]),
    "smollm3": CHATML_THINK, "olmo3": CHATML,
    "granitemoehybrid": (_turns("<|start_of_role|>{role}<|end_of_role|>", "<|end_of_text|>\n"),
                         ["<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>"]),
    "lfm2": CHATML,
    "ministral3": MISTRAL,
}
USER = ["the quick brown fox", "and then?"]
REPLY = ["jumps over the lazy dog", "a server answers many clients at once"]


def family_tokenizer(family: str):
    tok = tokenizer()
    if family not in TEMPLATES:  # GPT-2, GPT-NeoX: no chat template
        tok.chat_template = None
        return tok
    template, markers = TEMPLATES[family]
    tok.add_special_tokens({"additional_special_tokens": markers})
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_trains_and_prompts_alike(family):
    tok = family_tokenizer(family)
    messages = [{"role": r, "content": c} for pair in zip(USER, REPLY) for r, c in zip(("user", "assistant"), pair)]
    shape = "chat" if tok.chat_template else "alpaca"
    fields = {"messages": messages} if tok.chat_template else {"instruction": USER[0], "output": REPLY[0]}
    sample = tokenize_record(tok, Record(shape, fields, "mem:0"))
    trained = [label for label in sample.labels if label != IGNORE]
    text = tok.decode(trained)
    assert all(reply in text for reply in REPLY[: 2 if tok.chat_template else 1])
    assert not any(user in text for user in USER)  # no prompt token is trained
    assert sample.labels[-1] in stop_ids(tok)  # the reply ends on a token generation stops on
    one = tokenize_record(tok, Record("alpaca", {"instruction": USER[0], "output": REPLY[0]}, "mem:1"))
    prompt = prompt_ids(tok, default_format(tok), USER[0])  # what generate and serve feed the model
    assert one.input_ids[: len(prompt)] == prompt
    assert all(label == IGNORE for label in one.labels[: len(prompt)]) and one.labels[len(prompt)] != IGNORE
    if family in TEMPLATES and THINK in TEMPLATES[family][0]:
        assert tok.decode(prompt, skip_special_tokens=False).endswith(THINK)  # the empty think block is prompted
