"""One prompt format from training to generation to serving: how a conversation becomes token ids.

Training data (`lorafit.train.data`), evaluation, the demo, `lorafit generate` and `lorafit serve` all
render prompts here, so the ids a model is prompted with at inference are the prompt part of the
samples it was trained on. Three kinds of `PromptFormat`:

    chat     the tokenizer's own chat template (`apply_chat_template`): models that have one
    alpaca   lorafit's instruction format, for tokenizers without a template (base models):
                 [{system}\\n\\n]### Instruction:\\n{user}\\n\\n[### Input:\\n{input}\\n\\n]### Response:\\n{reply}<eos>
    text     raw text (adapters trained on plain `text` records): a prompt is continued as it is

The format an adapter was trained with is written next to it (`lorafit_prompt.json`, see lorafit.io),
so generating or serving with that adapter renders prompts the same way.

Special tokens: BOS exactly once. A tokenizer whose encoding starts with BOS (Gemma, Llama) gets one
in front of every rendering, whether or not its chat template writes one itself; one that adds none
(SmolLM2, Qwen) gets none. Rendered text is always encoded with `add_special_tokens=False`, so no EOS
is appended to a prompt either. The alpaca format is encoded piece by piece (each prompt part, each
reply), so a conversation's ids always start with the ids of its prompt.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from lorafit.errors import LorafitError

CHAT, ALPACA, TEXT = "chat", "alpaca", "text"
KINDS = (CHAT, ALPACA, TEXT)
ROLES = ("system", "user", "assistant")  # what the alpaca format can place


@dataclass(frozen=True)
class PromptFormat:
    """How prompts are rendered: `kind` (chat / alpaca / text) and the alpaca format's pieces."""

    kind: str = CHAT
    system: str = "{content}\n\n"
    """Alpaca: a system message, before the instruction."""
    instruction: str = "### Instruction:\n{content}\n\n"
    """Alpaca: a user message."""
    input: str = "### Input:\n{content}\n\n"
    """Alpaca: the `input` field of an Alpaca record, after its instruction."""
    response: str = "### Response:\n"
    """Alpaca: the header the reply follows (the end of every prompt)."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LorafitError(f"prompt format {self.kind!r} is unknown: use one of {', '.join(KINDS)}")

    @property
    def is_chat(self) -> bool:
        return self.kind == CHAT

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind} if self.kind != ALPACA else asdict(self)

    @classmethod
    def from_dict(cls, data: Any, source: str = "prompt format") -> PromptFormat:
        if not isinstance(data, dict) or not isinstance(data.get("kind"), str):
            raise LorafitError(f"{source}: expected an object with a 'kind' ({', '.join(KINDS)})")
        known = {f.name for f in fields(cls)}
        bad = [k for k, v in data.items() if k in known and not isinstance(v, str)]
        if bad:
            raise LorafitError(f"{source}: field {bad[0]!r} must be a string")
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except LorafitError as e:
            raise LorafitError(f"{source}: {e}") from None


def default_format(tokenizer, shape: str | None = None) -> PromptFormat:
    """The format lorafit trains with: plain `text` data as text, else the chat template when the
    tokenizer has one, else the alpaca instruction format."""
    if shape == "text":
        return PromptFormat(TEXT)
    return PromptFormat(CHAT if getattr(tokenizer, "chat_template", None) else ALPACA)


# -- special tokens -------------------------------------------------------------------------------
def encode(tokenizer, text: str) -> list[int]:
    """`text` as ids, with no special token added (the renderer places BOS itself)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's own encodings start with BOS (its convention, kept by the renderer)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and probe[0] == bos


def with_bos(tokenizer, ids: list[int]) -> list[int]:
    """`ids` starting with exactly one BOS when the tokenizer's convention has one, else as they are
    (a BOS doubled by a template that writes it, or by a client that sent it, is dropped)."""
    bos = tokenizer.bos_token_id
    if bos is None or not adds_bos(tokenizer):
        return list(ids)
    start = 0
    while start < len(ids) and ids[start] == bos:
        start += 1
    return [bos] + list(ids[start:])


def text_ids(tokenizer, text: str) -> list[int]:
    """Raw text as a model reads it: encoded, BOS in front when the tokenizer uses one."""
    return with_bos(tokenizer, encode(tokenizer, text))


def special_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens: the named ones (BOS, EOS, ...) and every added token
    marked special (turn markers such as <end_of_turn>, which `all_special_ids` may leave out)."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}


def turn_end(tokenizer, ids: list[int], start: int) -> int:
    """End (exclusive) of a reply ids[start:]: through its last special token (the end-of-turn,
    e.g. <|im_end|>, or EOS) when only whitespace follows it; else the whole rest."""
    special = special_ids(tokenizer)
    for j in range(len(ids) - 1, start - 1, -1):
        if ids[j] in special:
            tail = ids[j + 1:]
            if not tail or not tokenizer.decode(tail).strip():
                return j + 1
            break
    return len(ids)


# -- rendering ------------------------------------------------------------------------------------
def conversation_ids(tokenizer, fmt: PromptFormat, messages: list[dict], generation_prompt: bool,
                     source: str = "messages") -> list[int]:
    """A conversation (`[{"role", "content"}, ...]`) as ids. With `generation_prompt`, it ends where
    the model's reply begins (the assistant header); `source` names the data in errors."""
    if fmt.kind == CHAT:
        return _chat_template_ids(tokenizer, messages, generation_prompt, source)
    if fmt.kind == TEXT:
        raise LorafitError(f"{source}: this adapter was trained on plain text, which has no conversation "
                           "format: send the text itself as the prompt")
    return _alpaca_ids(tokenizer, fmt, messages, generation_prompt, source)


def prompt_ids(tokenizer, fmt: PromptFormat, instruction: str, input: str = "") -> list[int]:
    """The prompt of one instruction (with an Alpaca record's `input`), exactly as the training sample
    of that record starts: what `generate` and `serve` feed the model."""
    if fmt.kind == TEXT:
        return text_ids(tokenizer, alpaca_user_text(instruction, input))
    if fmt.kind == CHAT:
        return conversation_ids(tokenizer, fmt, [user_message(instruction, input)], True)
    text = fmt.instruction.format(content=instruction) + (fmt.input.format(content=input) if input else "")
    return with_bos(tokenizer, encode(tokenizer, text + fmt.response))


def alpaca_user_text(instruction: str, input: str = "") -> str:
    """An Alpaca record's instruction and input as one user message (chat templates and text)."""
    return instruction + (f"\n\n{input}" if input else "")


def user_message(instruction: str, input: str = "") -> dict[str, str]:
    return {"role": "user", "content": alpaca_user_text(instruction, input)}


def _chat_template_ids(tokenizer, messages: list[dict], generation_prompt: bool, source: str) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise LorafitError(f"{source}: the format is the chat template, but this tokenizer has none: load the "
                           "base model the adapter was trained on")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # templates reject what they do not support (e.g. roles out of order)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LorafitError(f"{source}: the chat template rejects it ({reason}): fix the turns") from e
    return with_bos(tokenizer, encode(tokenizer, text))  # the template writes its own turn tokens


def _alpaca_ids(tokenizer, fmt: PromptFormat, messages: list[dict], generation_prompt: bool,
                source: str) -> list[int]:
    """Prompt parts (system / instruction blocks, then the response header) and replies (+ EOS),
    each encoded on its own, after one BOS."""
    ids: list[int] = []
    pending = ""  # the prompt text since the last reply
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content") or ""
        if role not in ROLES:
            raise LorafitError(f"{source}: messages[{i}] has role {role!r}; the instruction format of a model "
                               f"without a chat template places {', '.join(ROLES)}")
        if role == "assistant":
            ids += encode(tokenizer, pending + fmt.response) + encode(tokenizer, content)
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
            pending = ""
        else:
            pending += (fmt.system if role == "system" else fmt.instruction).format(content=content)
    if generation_prompt:
        pending += fmt.response
    if pending:
        ids += encode(tokenizer, pending)
    return with_bos(tokenizer, ids)


def end_of_turn_ids(tokenizer) -> set[int]:
    """Tokens that end a reply in the chat template (e.g. <|im_end|>, <end_of_turn>, <|eot_id|>),
    found by rendering a short conversation; empty without a template."""
    if not getattr(tokenizer, "chat_template", None):
        return set()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    try:
        prompt = _chat_template_ids(tokenizer, messages[:1], True, "probe")
        full = _chat_template_ids(tokenizer, messages, False, "probe")
    except LorafitError:
        return set()
    end = turn_end(tokenizer, full, len(prompt))
    special = special_ids(tokenizer)
    return {full[end - 1]} if end > len(prompt) and full[end - 1] in special else set()


def stop_ids(tokenizer, generation_config=None) -> set[int]:
    """Token ids that end a generation: EOS, the model's generation-config EOS ids, the chat
    template's end-of-turn token."""
    ids = {tokenizer.eos_token_id} | end_of_turn_ids(tokenizer)
    extra = getattr(generation_config, "eos_token_id", None)
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra])
    return {int(i) for i in ids if i is not None}
