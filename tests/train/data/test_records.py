"""Reading JSONL records: shape detection, validation errors naming file:line:field, splits."""

import json
import re

import pytest

from lorafit.errors import LorafitError
from lorafit.train.data import Record, read_records, split_records, tokenize_record
from tests.train.data.shared import ALPACA, BY_SHAPE, CHAT, TEXT, trained_runs, write_lines


@pytest.mark.parametrize("shape", ["alpaca", "chat", "text"])
def test_shape_is_detected_per_file(tmp_path, shape):
    path = write_lines(tmp_path / "d.jsonl", [BY_SHAPE[shape], "", BY_SHAPE[shape]])  # blank lines skipped
    records = read_records(path)
    assert [r.shape for r in records] == [shape, shape]
    assert [r.source for r in records] == [f"{path}:1", f"{path}:3"]


def test_format_override_beats_detection(tmp_path):
    both = {**ALPACA, "text": "raw text"}
    path = write_lines(tmp_path / "d.jsonl", [both])
    assert read_records(path)[0].shape == "alpaca"
    assert read_records(path, format="text")[0].shape == "text"


def test_alpaca_input_is_optional(tmp_path, tokenizer):
    path = write_lines(
        tmp_path / "d.jsonl", [{"instruction": "Say hi.", "output": "hi"}, {**ALPACA, "input": None}]
    )
    for record in read_records(path):
        assert trained_runs(tokenizer, tokenize_record(tokenizer, record))[-1].endswith("<|im_end|>")


BAD = [
    ([ALPACA, '{"instruction": "x", "output": '], ":2: invalid JSON"),
    ([{"instruction": "x"}], ":1: field 'output' is missing"),
    ([{"instruction": "x", "output": 5}], ":1: field 'output' must be a string, got int"),
    (
        [CHAT, {"messages": [{"role": "user", "content": "hi"}, {"content": "yo"}]}],
        ":2: messages[1]: field 'role'",
    ),
    ([{"messages": [{"role": "user", "content": "hi"}]}], ":1: field 'messages' has no 'assistant' turn"),
    ([{"messages": []}], ":1: field 'messages' must be a non-empty list"),
    ([TEXT, TEXT, ALPACA], ":3: record looks like 'alpaca' but line 1 is 'text'"),
    ([{"prompt": "x", "completion": "y"}], ":1: cannot tell the record shape"),
    (["[1, 2]"], ":1: expected a JSON object"),
    ([], ": file is empty"),
]


@pytest.mark.parametrize("lines,expected", BAD)
def test_user_mistakes_are_one_line_errors_naming_file_and_line(tmp_path, lines, expected):
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(LorafitError) as err:
        read_records(path)
    msg = str(err.value)
    assert msg.startswith(str(path)) and expected in msg, msg
    assert "\n" not in msg


def test_explicit_format_names_the_missing_field(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [TEXT])
    with pytest.raises(LorafitError, match=r"d.jsonl:1: field 'instruction' is missing"):
        read_records(path, format="alpaca")


def test_validation_fraction_is_deterministic_and_disjoint():
    records = [Record("text", {"text": str(i)}, f"d:{i + 1}") for i in range(40)]
    train, val = split_records(records, 0.25, seed=3)
    again_train, again_val = split_records(records, 0.25, seed=3)
    assert [r.source for r in val] == [r.source for r in again_val]
    assert [r.source for r in train] == [r.source for r in again_train]
    assert len(val) == 10 and not {r.source for r in train} & {r.source for r in val}
    assert sorted(r.source for r in train + val) == sorted(r.source for r in records)
    _, other_val = split_records(records, 0.25, seed=4)
    assert {r.source for r in other_val} != {r.source for r in val}
    with pytest.raises(LorafitError, match="too few for val_fraction"):
        split_records(records[:1], 0.25, seed=0)


def test_missing_file(tmp_path):
    with pytest.raises(LorafitError, match="nope.jsonl: file not found"):
        read_records(tmp_path / "nope.jsonl")


def test_a_json_error_names_its_column_on_the_line(tmp_path):
    """Parsed without its newline: an unfinished record is reported where it stops, not at "column 1"."""
    line = '{"instruction": "Convert it", "output": '
    path = write_lines(tmp_path / "d.jsonl", [ALPACA, line, ALPACA])
    with pytest.raises(LorafitError) as err:
        read_records(path)
    assert f"{path}:2: invalid JSON (Expecting value at column {len(line) + 1})" in str(err.value)
    path.write_text(json.dumps(ALPACA) + "\r\n" + '{"instruction": "x", "output": 5,}\r\n')  # Windows line ends
    with pytest.raises(LorafitError, match=r":2: invalid JSON \(Expecting property name .* at column 34\)"):
        read_records(path)


def test_a_byte_order_mark_is_read_and_other_encodings_name_their_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ALPACA).encode() + b"\n")  # what some editors write first
    assert read_records(path)[0].fields == ALPACA
    path.write_bytes(json.dumps(ALPACA).encode() + b"\n" + '{"text": "caf\u00e9"}'.encode("latin-1") + b"\n")
    with pytest.raises(LorafitError, match=rf"^{re.escape(str(path))}:2: not UTF-8 text .*save the file as UTF-8"):
        read_records(path)


@pytest.mark.parametrize("lines,expected", [
    ([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}],
     ":1: cannot tell the record shape from fields ['conversations']: 'conversations' of {from, value} turns is "
     "ShareGPT's format"),
    ([{"messages": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}],
     ":1: messages[0] has 'from'/'value': 'conversations' of {from, value} turns is ShareGPT's format"),
    ([{"messages": [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "yo"}]}],
     ":1: messages[0] has the unknown role 'human': use system, user, assistant, tool, developer, ipython, "
     "function; 'human' is ShareGPT's name for 'user'"),
    ([CHAT, {"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}],
     ":2: messages[1] has the unknown role 'bot': use system, user, assistant, tool, developer"),
])
def test_unknown_roles_are_named_and_sharegpt_is_recognised(tmp_path, lines, expected):
    path = write_lines(tmp_path / "d.jsonl", lines)
    with pytest.raises(LorafitError) as err:
        read_records(path)
    assert str(err.value).startswith(f"{path}{expected}") and "\n" not in str(err.value), err.value


def test_empty_replies_are_kept_with_one_warning_naming_their_lines(tmp_path):
    empty_chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}
    path = write_lines(tmp_path / "d.jsonl", [CHAT, empty_chat, CHAT, empty_chat])
    with pytest.warns(UserWarning) as caught:
        records = read_records(path)
    assert len(records) == 4 and len(caught) == 1
    assert str(caught[0].message).startswith(f"{path}: 2 record(s) have an empty reply (line 2, 4)")
    path = write_lines(tmp_path / "a.jsonl", [ALPACA, {**ALPACA, "output": ""}])
    with pytest.warns(UserWarning, match=r"1 record\(s\) have an empty reply \(line 2\)"):
        read_records(path)
