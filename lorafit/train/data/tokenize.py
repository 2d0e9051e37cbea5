"""Records -> `Sample`s: token ids and the labels the loss is taken on.

By default the loss is only on what the model should *produce*: the Alpaca output, the chat
assistant turns (content plus their end-of-turn token), or all of a plain text. Every sample's
last trained label is the EOS / end-of-turn token, so the model learns where to stop.

Masked spans are found on token ids, never by searching decoded strings: the prompt is rendered
on its own (chat template with `add_generation_prompt=True`) and must be a token prefix of the
full rendering; whatever follows it up to the end-of-turn token is the trained span. Tokenizers
without a chat template get lorafit's instruction format (the Alpaca prompt, `ALPACA_PROMPT`),
the prompt encoded apart from the output.

Every rendering goes through `lorafit.prompt`, the renderer `generate` and `serve` use too, so a
prompt at inference is exactly the masked start of a training sample (BOS once, no EOS).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from lorafit.errors import LorafitError
from lorafit.prompt import (
    PromptFormat,
    alpaca_user_text,
    conversation_ids,
    default_format,
    encode,
    prompt_ids,
    special_ids,
    text_ids,
    turn_end,
    user_message,
)
from lorafit.train.data.records import Record

__all__ = ["ALPACA_PROMPT", "IGNORE", "Sample", "alpaca_user_text", "eos_id", "tokenize_record"]

IGNORE = -100  # label value the cross-entropy loss skips (torch/HF convention)


@dataclass
class Sample:
    """One training row. `labels[t]` is the target at position t (the model shifts it by one)."""

    input_ids: list[int]
    labels: list[int]  # same length; IGNORE where no loss
    source: str  # "path:line" (packed rows: the first sample's)
    position_ids: list[int] | None = None  # packed rows only: restart at 0 for each sample

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_trained(self) -> int:
        return sum(label != IGNORE for label in self.labels)


# The prompt of lorafit's instruction format (lorafit.prompt.PromptFormat, kind "alpaca") for one
# Alpaca record; input_block is "### Input:\n...\n\n" or "".
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


def eos_id(tokenizer) -> int:
    """The tokenizer's EOS id (what every sample ends on); a LorafitError when it has none."""
    if tokenizer.eos_token_id is None:
        raise LorafitError("the tokenizer has no EOS token: set tokenizer.eos_token before training")
    return tokenizer.eos_token_id


def _is_prefix(prefix: list[int], ids: list[int]) -> bool:
    return len(prefix) <= len(ids) and ids[: len(prefix)] == prefix


def _chat_sample(
    tokenizer, fmt: PromptFormat, messages: list[dict], source: str, spans: bool = True
) -> tuple[list[int], list[int]]:
    """Render a conversation; labels = assistant content + end-of-turn token, IGNORE elsewhere.

    Turns after the last assistant message carry nothing to learn and are dropped, as is the
    whitespace the template writes after the final end-of-turn token. `spans=False` skips the
    per-turn span search (for train_on_prompt, where every token is trained anyway).

    Reasoning (a `<think>...</think>` block in the content, or a `reasoning_content` field, as
    Qwen3-style templates read it) is rendered by the template and trained like the rest of the turn.
    Such templates drop the reasoning of *earlier* assistant turns from the history, so an earlier turn
    is not in the conversation as the model would write it; it is then left untrained (with a warning)
    rather than taught without its reasoning. The last turn always keeps it.
    """
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages = [{k: m[k] for k in ("role", "content", "reasoning_content") if isinstance(m.get(k), str)}
                for m in messages[: last + 1]]
    where = f"{source}: field 'messages'"
    full = conversation_ids(tokenizer, fmt, messages, False, where)
    if not spans:  # train on everything: no per-turn spans needed
        end = turn_end(tokenizer, full, 0)
        return full[:end], full[:end]
    labels = [IGNORE] * len(full)
    end = 0
    rewritten = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = conversation_ids(tokenizer, fmt, messages[:i], True, where)
        turn = conversation_ids(tokenizer, fmt, messages[: i + 1], False, where)
        if not _is_prefix(prompt, full):
            raise LorafitError(
                f"{source}: field 'messages[{i}]': the chat template does not render this turn as a token "
                "prefix of the conversation, so its span cannot be masked: use train_on_prompt=True"
            )
        if not (_is_prefix(prompt, turn) and _is_prefix(turn, full)):
            rewritten += 1  # the history shows this turn otherwise than the model writes it (reasoning dropped)
            continue
        end = turn_end(tokenizer, turn, len(prompt))
        labels[len(prompt) : end] = full[len(prompt) : end]
    if rewritten:
        # one message for all records (shown once): the template, not the record, is the cause
        warnings.warn("the chat template renders earlier assistant turns differently in the history than as a reply "
                      "(e.g. without their reasoning), so those turns are not trained; put each turn to learn last "
                      "in a record of its own", stacklevel=3)
    return full[:end], labels[:end]


def tokenize_record(tokenizer, record: Record, train_on_prompt: bool = False,
                    fmt: PromptFormat | None = None) -> Sample:
    """Token ids and labels of one record (see the module docstring for what is trained).

    `fmt` is the prompt format (lorafit.prompt); None: `default_format` for the tokenizer and the
    record's shape, what `load_data` uses and what the trained adapter records."""
    eos = eos_id(tokenizer)
    fmt = fmt or default_format(tokenizer, record.shape)
    f = record.fields
    if record.shape == "text":
        ids = text_ids(tokenizer, f["text"])
        labels = list(ids)
    elif record.shape == "chat" or fmt.is_chat:
        messages = f["messages"] if record.shape == "chat" else [
            user_message(f["instruction"], f.get("input") or ""), {"role": "assistant", "content": f["output"]}]
        ids, labels = _chat_sample(tokenizer, fmt, messages, record.source, spans=not train_on_prompt)
    else:  # alpaca record, instruction format: prompt and output encoded apart, so the split is exact
        prompt = prompt_ids(tokenizer, fmt, f["instruction"], f.get("input") or "")
        output = encode(tokenizer, f["output"])
        ids = prompt + output
        labels = [IGNORE] * len(prompt) + output
    # The model must learn to stop: end on EOS, or on the chat template's end-of-turn token.
    stops = {eos} | (special_ids(tokenizer) if fmt.is_chat and record.shape != "text" else set())
    if not ids or ids[-1] not in stops:
        ids, labels = ids + [eos], labels + [eos]
    if train_on_prompt:
        labels = list(ids)
    return Sample(ids, labels, record.source)

