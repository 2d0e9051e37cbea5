"""Training data: JSONL records -> token ids + loss labels.

Three record shapes, one per file (detected from the first record, or forced with `format=`):

    alpaca  {"instruction": str, "input": str (optional), "output": str}
    chat    {"messages": [{"role": str, "content": str}, ...]}
    text    {"text": str}

Each record becomes a `Sample` of `input_ids` and `labels` (same length; -100 = no loss there).
By default the loss is only on what the model should *produce*: the Alpaca output, the chat
assistant turns (content plus their end-of-turn token), or all of a plain text. Every sample's
last trained label is the EOS / end-of-turn token, so the model learns where to stop.

Masked spans are found on token ids, never by searching decoded strings: the prompt is rendered
on its own (chat template with `add_generation_prompt=True`) and must be a token prefix of the
full rendering; whatever follows it up to the end-of-turn token is the trained span.
"""

from __future__ import annotations

import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorafit.errors import LorafitError

IGNORE = -100  # label value the cross-entropy loss skips (torch/HF convention)
SHAPES = ("alpaca", "chat", "text")
FORMATS = ("auto", *SHAPES)
ON_LONG = ("truncate", "skip")


@dataclass
class DataConfig:
    """Where the data is and how it becomes training rows."""

    path: str
    """JSONL training file, one record per line."""
    format: str = "auto"
    """'auto' detects the shape per file from its first record; or force 'alpaca', 'chat', 'text'."""
    max_seq_length: int = 1024
    """Longest sample in tokens (and the row length when packing)."""
    on_long: str = "truncate"
    """Longer samples: 'truncate' keeps the start, 'skip' drops them. Both warn once with a count."""
    train_on_prompt: bool = False
    """Also train on prompt tokens (by default only the response is trained)."""
    packing: bool = False
    """Concatenate short samples into rows of up to max_seq_length tokens (fewer pad tokens)."""
    val_path: str | None = None
    """Separate validation file; takes precedence over val_fraction."""
    val_fraction: float = 0.0
    """Share of the training records held out for validation when there is no val_path."""
    seed: int = 0
    """Seed of the validation split, so the same records are held out every run."""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise LorafitError(f"data format {self.format!r} is unknown: use one of {', '.join(FORMATS)}")
        if self.on_long not in ON_LONG:
            raise LorafitError(f"on_long={self.on_long!r} is unknown: use 'truncate' or 'skip'")
        if self.max_seq_length < 2:
            raise LorafitError(f"max_seq_length={self.max_seq_length} is too small: use at least 2 tokens")
        if not 0.0 <= self.val_fraction < 1.0:
            raise LorafitError(f"val_fraction={self.val_fraction} must be in [0, 1): e.g. 0.05")


@dataclass
class Record:
    """One validated JSONL record and where it came from (for error messages)."""

    shape: str  # one of SHAPES
    fields: dict[str, Any]
    source: str  # "path:line"


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


@dataclass
class Splits:
    train: list[Sample]
    val: list[Sample]


# ---------------------------------------------------------------------------------------------
# Reading and validating records


def _detect_shape(obj: dict) -> str | None:
    if "messages" in obj:
        return "chat"
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    if "text" in obj:
        return "text"
    return None


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _need_str(obj: dict, key: str, where: str, optional: bool = False) -> None:
    if key not in obj or (optional and obj[key] is None):
        if optional:
            return
        raise LorafitError(f"{where}: field '{key}' is missing: add it as a string")
    if not isinstance(obj[key], str):
        raise LorafitError(
            f"{where}: field '{key}' must be a string, got {_type_name(obj[key])}: fix the record"
        )


def _validate(obj: dict, shape: str, where: str) -> None:
    """Raise a one-line LorafitError if `obj` lacks the fields of `shape` or has wrong types."""
    if shape == "alpaca":
        _need_str(obj, "instruction", where)
        _need_str(obj, "input", where, optional=True)
        _need_str(obj, "output", where)
    elif shape == "text":
        _need_str(obj, "text", where)
    else:
        messages = obj.get("messages")
        if not isinstance(messages, list) or not messages:
            raise LorafitError(
                f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects"
            )
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise LorafitError(
                    f"{where}: field 'messages[{i}]' must be an object with 'role' and 'content'"
                )
            _need_str(m, "role", f"{where}: messages[{i}]")
            _need_str(m, "content", f"{where}: messages[{i}]")
        if not any(m["role"] == "assistant" for m in messages):
            raise LorafitError(f"{where}: field 'messages' has no 'assistant' turn: add the reply to learn")


def read_records(path: str | Path, format: str = "auto") -> list[Record]:
    """Parse and validate a JSONL file; all records must have one shape (`format` or detected)."""
    path = Path(path)
    if format not in FORMATS:
        raise LorafitError(f"data format {format!r} is unknown: use one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise LorafitError(f"{path}: file not found: check the data path")
    shape = None if format == "auto" else format
    first_line = 0
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise LorafitError(
                    f"{where}: invalid JSON ({e.msg} at column {e.colno}): fix the line"
                ) from None
            if not isinstance(obj, dict):
                raise LorafitError(f"{where}: expected a JSON object per line, got {_type_name(obj)}")
            found = _detect_shape(obj)
            if shape is None:  # first record of an auto-detected file decides
                if found is None:
                    raise LorafitError(
                        f"{where}: cannot tell the record shape from fields {sorted(obj)}: use 'instruction'+"
                        "'output' (alpaca), 'messages' (chat) or 'text'"
                    )
                shape, first_line = found, lineno
            elif format == "auto" and found is not None and found != shape:
                raise LorafitError(
                    f"{where}: record looks like {found!r} but line {first_line} is {shape!r}: "
                    "use one shape per file"
                )
            _validate(obj, shape, where)
            records.append(Record(shape, obj, where))
    if not records:
        raise LorafitError(f"{path}: file is empty: add one JSON record per line")
    return records


def split_records(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Deterministic hold-out: the same `seed` and file always give the same validation records."""
    n_val = max(1, round(len(records) * fraction))
    if n_val >= len(records):
        raise LorafitError(
            f"{records[0].source.rsplit(':', 1)[0]}: {len(records)} records are too few for "
            f"val_fraction={fraction}: add records or pass a separate validation file"
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    train = [r for i, r in enumerate(records) if i not in held]
    val = [r for i, r in enumerate(records) if i in held]
    return train, val


# ---------------------------------------------------------------------------------------------
# Tokenizing records into (input_ids, labels)

# Alpaca prompt for tokenizers without a chat template; input_block is "### Input:\n...\n\n" or "".
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"


def _eos_id(tokenizer) -> int:
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
    eos = _eos_id(tokenizer)
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


def fit_length(samples: list[Sample], max_len: int, on_long: str, path: str = "data") -> list[Sample]:
    """Truncate (keep the start) or skip samples over `max_len`; warn once with the counts."""
    kept, n_long, n_empty = [], 0, 0
    for s in samples:
        if len(s) > max_len:
            n_long += 1
            if on_long == "skip":
                continue
            s = Sample(s.input_ids[:max_len], s.labels[:max_len], s.source)
            if s.n_trained == 0:  # the prompt alone filled the window: nothing left to learn
                n_empty += 1
                continue
        kept.append(s)
    if n_long:
        what = "skipped" if on_long == "skip" else "truncated to their first tokens"
        extra = f"; {n_empty} of those had no trained tokens left and were dropped" if n_empty else ""
        warnings.warn(
            f"{path}: {n_long} of {len(samples)} samples are longer than max_seq_length={max_len} "
            f"and were {what}{extra}",
            stacklevel=2,
        )
    return kept


def pack(samples: list[Sample], max_len: int) -> list[Sample]:
    """Greedily concatenate samples (in order) into rows of at most `max_len` tokens.

    No loss crosses a sample boundary: the label of each sample's first token (which the shifted
    loss would predict from the previous sample's last token) is set to IGNORE; unpacked, that
    label is never used either, so packed and unpacked losses see the same targets.
    `position_ids` restart at 0 per sample, ready for per-sample attention.
    """
    rows: list[Sample] = []
    row: Sample | None = None
    for s in samples:
        assert len(s) <= max_len, "fit_length() must run before pack()"
        if row is None or len(row) + len(s) > max_len:
            row = Sample([], [], s.source, [])
            rows.append(row)
        row.input_ids += s.input_ids
        row.labels += [IGNORE] + s.labels[1:]
        row.position_ids += list(range(len(s)))
    return rows


def load_data(tokenizer, cfg: DataConfig) -> Splits:
    """Read, split, tokenize, length-limit and (optionally) pack the training and validation data."""
    records = read_records(cfg.path, cfg.format)
    val_records: list[Record] = []
    if cfg.val_path:
        val_records = read_records(cfg.val_path, cfg.format)
    elif cfg.val_fraction > 0:
        records, val_records = split_records(records, cfg.val_fraction, cfg.seed)

    def prepare(recs: list[Record], path: str) -> list[Sample]:
        samples = [tokenize_record(tokenizer, r, cfg.train_on_prompt) for r in recs]
        samples = fit_length(samples, cfg.max_seq_length, cfg.on_long, path)
        return pack(samples, cfg.max_seq_length) if cfg.packing else samples

    return Splits(prepare(records, cfg.path), prepare(val_records, cfg.val_path or cfg.path))


# ---------------------------------------------------------------------------------------------
# Batching and pre-flight display


def pad_id_for(tokenizer) -> int:
    """The tokenizer's pad id, else EOS (padding is masked out of attention and loss anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_id(tokenizer)


def collate(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest sample. Returns (B, T) long tensors: input_ids, labels
    (IGNORE on padding), attention_mask (1 = real token) and position_ids.

    Use with a DataLoader as `functools.partial(collate, pad_id=pad_id_for(tokenizer))`.
    """
    B, T = len(samples), max(len(s) for s in samples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    position_ids = torch.arange(T, dtype=torch.long).repeat(B, 1)
    for b, s in enumerate(samples):
        n = len(s)
        input_ids[b, :n] = torch.tensor(s.input_ids)
        labels[b, :n] = torch.tensor(s.labels)
        attention_mask[b, :n] = 1
        if s.position_ids is not None:
            position_ids[b, :n] = torch.tensor(s.position_ids)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
    }


TRAINED_OPEN, TRAINED_CLOSE = "«", "»"


def describe_sample(tokenizer, sample: Sample) -> str:
    """Render a sample for a pre-flight look: text the model learns to produce is «in guillemets»,
    masked (prompt) text is plain. Packed rows show a divider between samples."""
    n = len(sample)
    header = (
        f"{sample.source}: {n} tokens, {sample.n_trained} trained "
        f"({100 * sample.n_trained / max(n, 1):.0f}%); «trained», rest masked"
    )
    starts = {0}
    if sample.position_ids is not None:
        starts |= {t for t, p in enumerate(sample.position_ids) if p == 0}
    parts, t = [], 0
    while t < n:  # one run = consecutive tokens with the same trained/masked state in one sample
        trained = sample.labels[t] != IGNORE
        u = t + 1
        while u < n and (sample.labels[u] != IGNORE) == trained and u not in starts:
            u += 1
        if t in starts and t > 0:
            parts.append("\n----- next packed sample -----\n")
        text = tokenizer.decode(sample.input_ids[t:u], skip_special_tokens=False)
        parts.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained else text)
        t = u
    return header + "\n" + "".join(parts)


def n_tokens(samples: list[Sample]) -> tuple[int, int]:
    """(total tokens, trained tokens) over samples, e.g. for a pre-flight summary."""
    return sum(len(s) for s in samples), sum(s.n_trained for s in samples)
