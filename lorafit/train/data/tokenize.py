"""Records -> `Sample`s: token ids and the labels the loss is taken on.

By default the loss is only on what the model should *produce*: the Alpaca output, the chat
assistant turns (content plus their end-of-turn token), or all of a plain text. Every sample's
last trained label is the EOS / end-of-turn token, so the model learns where to stop.

Masked spans are found on token ids, never by searching decoded strings: the prompt is rendered
on its own (chat template with `add_generation_prompt=True`) and must be a token prefix of the
full rendering; whatever follows it up to the end-of-turn token is the trained span. Tokenizers
without a chat template get the Alpaca prompt (`ALPACA_PROMPT`), tokenized apart from the output.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorafit.errors import LorafitError
from lorafit.train.data.records import Record

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


# Alpaca prompt for tokenizers without a chat template; input_block is "### Input:\n...\n\n" or "".
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


def eos_id(tokenizer) -> int:
    """The tokenizer's EOS id (what every sample ends on); a LorafitError when it has none."""
    if tokenizer.eos_token_id is None:
        raise LorafitError("the tokenizer has no EOS token: set tokenizer.eos_token before training")
    return tokenizer.eos_token_id


def _encode(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _render(tokenizer, messages: list[dict], generation_prompt: bool, source: str) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as e:  # templates reject what they do not support (e.g. roles out of order)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LorafitError(
            f"{source}: field 'messages': the chat template rejects it ({reason}): fix the turns"
        ) from e
    return _encode(tokenizer, text, special=False)  # the template writes its own special tokens


def _is_prefix(prefix: list[int], ids: list[int]) -> bool:
    return len(prefix) <= len(ids) and ids[: len(prefix)] == prefix


def _turn_end(tokenizer, ids: list[int], start: int) -> int:
    """End (exclusive) of the assistant span ids[start:]: through its last special token (the
    end-of-turn, e.g. <|im_end|>) when only whitespace follows it; else the whole rest."""
    special = set(tokenizer.all_special_ids)
    for j in range(len(ids) - 1, start - 1, -1):
        if ids[j] in special:
            tail = ids[j + 1 :]
            if not tail or not tokenizer.decode(tail).strip():
                return j + 1
            break
    return len(ids)


def _chat_sample(
    tokenizer, messages: list[dict], source: str, spans: bool = True
) -> tuple[list[int], list[int]]:
    """Render a conversation; labels = assistant content + end-of-turn token, IGNORE elsewhere.

    Turns after the last assistant message carry nothing to learn and are dropped, as is the
    whitespace the template writes after the final end-of-turn token. `spans=False` skips the
    per-turn span search (for train_on_prompt, where every token is trained anyway).
    """
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages[: last + 1]]
    full = _render(tokenizer, messages, False, source)
    if not spans:  # train on everything: no per-turn spans needed
        end = _turn_end(tokenizer, full, 0)
        return full[:end], full[:end]
    labels = [IGNORE] * len(full)
    end = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], True, source)
        turn = _render(tokenizer, messages[: i + 1], False, source)
        if not (_is_prefix(prompt, turn) and _is_prefix(turn, full)):
            raise LorafitError(
                f"{source}: field 'messages[{i}]': the chat template does not render this turn as a token "
                "prefix of the conversation, so its span cannot be masked: use train_on_prompt=True"
            )
        end = _turn_end(tokenizer, turn, len(prompt))
        labels[len(prompt) : end] = full[len(prompt) : end]
    return full[:end], labels[:end]


def alpaca_user_text(instruction: str, input: str = "") -> str:
    """The user turn of an Alpaca record (also what generation must send to match training)."""
    return instruction + (f"\n\n{input}" if input else "")


def tokenize_record(tokenizer, record: Record, train_on_prompt: bool = False) -> Sample:
    """Token ids and labels of one record (see the module docstring for what is trained)."""
    eos = eos_id(tokenizer)
    f = record.fields
    if record.shape == "text":
        ids = _encode(tokenizer, f["text"], special=True)
        labels = list(ids)
    elif record.shape == "chat":
        ids, labels = _chat_sample(tokenizer, f["messages"], record.source, spans=not train_on_prompt)
    elif tokenizer.chat_template:  # alpaca through the model's own chat format
        user = alpaca_user_text(f["instruction"], f.get("input", ""))
        chat = [{"role": "user", "content": user}, {"role": "assistant", "content": f["output"]}]
        ids, labels = _chat_sample(tokenizer, chat, record.source, spans=not train_on_prompt)
    else:  # alpaca, plain prompt; prompt and output tokenized apart so the split is exact
        input_block = f"### Input:\n{f['input']}\n\n" if f.get("input") else ""
        prompt = _encode(
            tokenizer, ALPACA_PROMPT.format(instruction=f["instruction"], input_block=input_block), True
        )
        if prompt and prompt[-1] == eos:  # tokenizers that append EOS themselves
            prompt = prompt[:-1]
        output = _encode(tokenizer, f["output"], special=False)
        ids = prompt + output
        labels = [IGNORE] * len(prompt) + output
    # The model must learn to stop: end on EOS, or on the chat template's end-of-turn token.
    templated = record.shape == "chat" or (record.shape == "alpaca" and tokenizer.chat_template)
    stops = {eos} | (set(tokenizer.all_special_ids) if templated else set())
    if not ids or ids[-1] not in stops:
        ids, labels = ids + [eos], labels + [eos]
    if train_on_prompt:
        labels = list(ids)
    return Sample(ids, labels, record.source)

