"""JSONL records: reading, validating and splitting a training file (before any tokenizer runs).

Three record shapes, one per file (detected from the first record, or forced with `format=`):

    alpaca  {"instruction": str, "input": str (optional), "output": str}
    chat    {"messages": [{"role": str, "content": str}, ...]}
    text    {"text": str}

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

SHAPES = ("alpaca", "chat", "text")
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
                        "use 'instruction'+'output' (alpaca), 'messages' (chat) or 'text'")
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

