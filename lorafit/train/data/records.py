"""JSONL records: reading, validating and splitting a training file (before any tokenizer runs).

Six record shapes, one per file (detected from the first record, or forced with `format=`):

    alpaca    {"instruction": str, "input": str (optional), "output": str}
    chat      {"messages": [{"role": str, "content": str}, ...]}
    text      {"text": str}
    paired    {"prompt": P, "chosen": C, "rejected": C}   preference pairs (TRL's format): P and C both
              strings, or both lists of chat messages; without "prompt" (implicit prompt) "chosen" and
              "rejected" are whole texts or conversations whose common start is the prompt
    unpaired  {"prompt": P, "completion": C, "label": true | false}   KTO's format
    prompt    {"prompt": P, ...}   prompt-only (GRPO): P a string or chat messages; the other fields are
              columns the reward functions read

Every mistake is a one-line `LorafitError` naming the file, the line and the field.
"""

from __future__ import annotations

import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafit.errors import LorafitError

SHAPES = ("alpaca", "chat", "text", "paired", "unpaired", "prompt")
PREFERENCE_SHAPES = ("paired", "unpaired")
FORMATS = ("auto", *SHAPES)
ROLES = ("system", "user", "assistant", "tool", "developer", "ipython", "function")  # chat templates' roles
# (ipython: Llama 3.1's tool results; function: OpenAI's older name for tool)
_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant"}  # ShareGPT's names (its turns: {"from", "value"})


@dataclass
class Record:
    """One validated JSONL record and where it came from (for error messages)."""

    shape: str  # one of SHAPES
    fields: dict[str, Any]
    source: str  # "path:line"


def _detect_shape(obj: dict) -> str | None:
    if "messages" in obj:
        return "chat"
    if "chosen" in obj or "rejected" in obj:
        return "paired"
    if "label" in obj and ("completion" in obj or "prompt" in obj):
        return "unpaired"
    if "prompt" in obj and "completion" not in obj:
        return "prompt"
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    if "text" in obj:
        return "text"
    return None


_SHAREGPT_HINT = ("'conversations' of {from, value} turns is ShareGPT's format: write each record as "
                 "{\"messages\": [{\"role\": \"user\", \"content\": ...}, {\"role\": \"assistant\", ...}]} "
                 "(human -> user, gpt -> assistant)")


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


def _messages(value: Any, key: str, where: str) -> None:
    """A non-empty list of {role, content} strings (chat messages)."""
    if not value:
        raise LorafitError(f"{where}: field '{key}' is empty: give a list of {{role, content}} messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise LorafitError(f"{where}: field '{key}[{i}]' must be an object with 'role' and 'content'")
        _need_str(m, "role", f"{where}: {key}[{i}]")
        _need_str(m, "content", f"{where}: {key}[{i}]")


def _completion(obj: dict, key: str, where: str, what: str) -> None:
    """A preference completion: a non-empty string or a non-empty list of messages."""
    if key not in obj or obj[key] is None:
        raise LorafitError(f"{where}: field '{key}' is missing: add {what}")
    value = obj[key]
    if isinstance(value, list):
        _messages(value, key, where)
    elif not isinstance(value, str):
        raise LorafitError(f"{where}: field '{key}' must be a string or a list of chat messages, "
                           f"got {_type_name(value)}")
    elif not value.strip():
        raise LorafitError(f"{where}: field '{key}' is empty: give {what}")


def _validate_preference(obj: dict, shape: str, where: str) -> None:
    keys = ("chosen", "rejected") if shape == "paired" else ("completion",)
    for key in keys:
        _completion(obj, key, where, "the preferred completion" if key == "chosen" else
                    "the dispreferred completion" if key == "rejected" else "the completion")
    if shape == "unpaired":
        if "label" not in obj:
            raise LorafitError(f"{where}: field 'label' is missing: add true (desirable) or false (undesirable)")
        if not isinstance(obj["label"], bool):
            raise LorafitError(f"{where}: field 'label' must be true or false, got {json.dumps(obj['label'])}")
        if "prompt" not in obj:
            raise LorafitError(f"{where}: field 'prompt' is missing: add the prompt the completion answers")
    prompt = obj.get("prompt")
    if prompt is not None:
        if isinstance(prompt, list):
            _messages(prompt, "prompt", where)
        elif not isinstance(prompt, str):
            raise LorafitError(f"{where}: field 'prompt' must be a string or a list of chat messages, "
                               f"got {_type_name(prompt)}")
    kinds = {k: isinstance(obj[k], list) for k in ("prompt", *keys) if obj.get(k) is not None}
    if len(set(kinds.values())) > 1:
        texts = [k for k, chat in kinds.items() if not chat]
        raise LorafitError(f"{where}: field '{texts[0]}' is a string but {', '.join(k for k in kinds if kinds[k])} "
                           "are chat messages: use strings everywhere or messages everywhere")


def _validate_prompt(obj: dict, where: str) -> None:
    """A prompt-only record: "prompt" a non-empty string or a non-empty list of chat messages."""
    if "prompt" not in obj or obj["prompt"] is None:
        raise LorafitError(f"{where}: field 'prompt' is missing: add the prompt to sample completions of")
    prompt = obj["prompt"]
    if isinstance(prompt, list):
        _messages(prompt, "prompt", where)
    elif not isinstance(prompt, str):
        raise LorafitError(f"{where}: field 'prompt' must be a string or a list of chat messages, "
                           f"got {_type_name(prompt)}")
    elif not prompt.strip():
        raise LorafitError(f"{where}: field 'prompt' is empty: give the prompt to sample completions of")


def _validate(obj: dict, shape: str, where: str) -> None:
    """Raise a one-line LorafitError if `obj` lacks the fields of `shape` or has wrong types."""
    if shape == "prompt":
        _validate_prompt(obj, where)
    elif shape in PREFERENCE_SHAPES:
        _validate_preference(obj, shape, where)
    elif shape == "alpaca":
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
            if "from" in m and "value" in m and "role" not in m:
                raise LorafitError(f"{where}: messages[{i}] has 'from'/'value': {_SHAREGPT_HINT}")
            _need_str(m, "role", f"{where}: messages[{i}]")
            _need_str(m, "content", f"{where}: messages[{i}]")
            if m["role"] not in ROLES:
                meant = _SHAREGPT_ROLES.get(m["role"])
                hint = (f"; {m['role']!r} is ShareGPT's name for {meant!r}: rename the roles (human -> user, "
                        "gpt -> assistant)") if meant else ""
                raise LorafitError(f"{where}: messages[{i}] has the unknown role {m['role']!r}: use "
                                   f"{', '.join(ROLES)}{hint}")
        if not any(m["role"] == "assistant" for m in messages):
            raise LorafitError(f"{where}: field 'messages' has no 'assistant' turn: add the reply to learn")


def _empty_reply(obj: dict, shape: str) -> bool:
    """Whether a record's reply (alpaca output, some assistant turn) is empty or blank."""
    if shape == "alpaca":
        return not obj["output"].strip()
    if shape == "chat":
        return any(m["role"] == "assistant" and not m["content"].strip() for m in obj["messages"])
    return False


def read_records(path: str | Path, format: str = "auto") -> list[Record]:
    """Parse and validate a JSONL file; all records must have one shape (`format` or detected).
    A UTF-8 byte-order mark is accepted; empty replies are kept, with one warning naming their lines."""
    path = Path(path)
    if format not in FORMATS:
        raise LorafitError(f"data format {format!r} is unknown: use one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise LorafitError(f"{path}: file not found: check the data path")
    shape = None if format == "auto" else format
    first_line = 0
    records, empty = [], []
    with path.open("rb") as f:  # decoded line by line, so an encoding error names its line
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise LorafitError(f"{path}:{lineno}: not UTF-8 text (byte {e.start + 1} of the line: {e.reason}): "
                                   "save the file as UTF-8") from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line.rstrip("\r\n"))  # without its line ending, so the column is the line's
            except json.JSONDecodeError as e:
                raise LorafitError(f"{where}: invalid JSON ({e.msg} at column {e.colno}): fix the line") from None
            if not isinstance(obj, dict):
                raise LorafitError(f"{where}: expected a JSON object per line, got {_type_name(obj)}")
            found = _detect_shape(obj)
            if shape is None:  # first record of an auto-detected file decides
                if found is None:
                    hint = _SHAREGPT_HINT if "conversations" in obj else (
                        "use 'instruction'+'output' (alpaca), 'messages' (chat) or 'text', or 'prompt' (prompt-only, for grpo)")
                    raise LorafitError(f"{where}: cannot tell the record shape from fields {sorted(obj)}: {hint}")
                shape, first_line = found, lineno
            elif format == "auto" and found is not None and found != shape:
                raise LorafitError(
                    f"{where}: record looks like {found!r} but line {first_line} is {shape!r}: "
                    "use one shape per file"
                )
            _validate(obj, shape, where)
            if _empty_reply(obj, shape):
                empty.append(lineno)
            records.append(Record(shape, obj, where))
    if not records:
        raise LorafitError(f"{path}: file is empty: add one JSON record per line")
    if empty:
        lines = ", ".join(map(str, empty[:5])) + (", ..." if len(empty) > 5 else "")
        warnings.warn(f"{path}: {len(empty)} record(s) have an empty reply (line {lines}): they teach the model "
                      "to answer with nothing; fill in or remove them", stacklevel=2)
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

