"""Prompt-only records -> `PromptSample`s: what GRPO samples completions of (TRL's prompt-only format).

    {"prompt": "Two plus two is", "answer": "4"}                                  text
    {"prompt": [{"role": "user", "content": "Two plus two?"}], "answer": "4"}     conversational

The prompt goes through lorafit's one prompt renderer (lorafit.prompt): chat messages by the chat
template with the generation prompt (or lorafit's instruction format for a tokenizer without one), text as
raw text with BOS as the tokenizer uses it, as TRL's `_tokenize_prompts` does. Every other field is a
column, handed to the reward functions as a keyword argument (one list per column, a value per completion).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorafit.prompt import TEXT, PromptFormat, conversation_ids, default_format, text_ids
from lorafit.train.data.records import Record


@dataclass
class PromptSample:
    """One prompt: its ids, the prompt as the file gave it, and the record's other fields."""

    prompt_ids: list[int]
    prompt: str | list[dict]  # what the reward functions receive as `prompts`
    columns: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # "path:line"

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @property
    def n_trained(self) -> int:
        return 0  # the trained tokens are sampled during training


def prompt_format(tokenizer, record: Record) -> PromptFormat:
    """Raw text for a string prompt, else the tokenizer's chat format (its template, or the instruction format)."""
    return default_format(tokenizer) if isinstance(record.fields["prompt"], list) else PromptFormat(TEXT)


def prompt_samples(tokenizer, records: list[Record], fmt: PromptFormat) -> list[PromptSample]:
    """The records' prompts as ids (see the module docstring); the other fields kept as columns."""
    out = []
    for r in records:
        prompt = r.fields["prompt"]
        if isinstance(prompt, list):
            prompt = [{"role": m["role"], "content": m["content"]} for m in prompt]
            ids = conversation_ids(tokenizer, fmt, prompt, True, r.source)
        else:
            ids = text_ids(tokenizer, prompt)
        columns = {k: v for k, v in r.fields.items() if k != "prompt"}
        out.append(PromptSample(ids, prompt, columns, r.source))
    return out
