"""JSONL loading, label masking, length limits, packing, splits, collate and describe_sample."""

import json
import warnings
from types import SimpleNamespace

import pytest

from lorafit.errors import LorafitError
from lorafit.train.data import (
    IGNORE,
    DataConfig,
    Record,
    Sample,
    collate,
    describe_sample,
    fit_length,
    load_data,
    n_tokens,
    pack,
    pad_id_for,
    read_records,
    split_records,
    tokenize_record,
)

ALPACA = {"instruction": "Convert the date to ISO format.", "input": "March 3rd 1998", "output": "1998-03-03"}
CHAT = {
    "messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
}
TEXT = {"text": "The quick brown fox jumps over the lazy dog."}
BY_SHAPE = {"alpaca": ALPACA, "chat": CHAT, "text": TEXT}


def write_lines(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def trained_runs(tok, sample):
    """Decoded text of each maximal run of trained labels."""
    runs, cur = [], []
    for tid, label in zip(sample.input_ids, sample.labels):
        if label != IGNORE:
            assert label == tid  # labels are the inputs themselves where trained (the model shifts)
            cur.append(tid)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def last_trained(sample):
    return [label for label in sample.labels if label != IGNORE][-1]


def sample_of(tok, shape, fields=None, **kw):
    return tokenize_record(tok, Record(shape, fields or BY_SHAPE[shape], "mem:1"), **kw)


# --- reading -----------------------------------------------------------------------------------


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


def test_missing_file_and_bad_config(tmp_path):
    with pytest.raises(LorafitError, match="nope.jsonl: file not found"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(LorafitError, match="on_long"):
        DataConfig(path="x.jsonl", on_long="wrap")
    with pytest.raises(LorafitError, match="val_fraction"):
        DataConfig(path="x.jsonl", val_fraction=1.5)


# --- masking -----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["alpaca", "chat", "text"])
def test_every_sample_ends_with_a_trained_stop_token(tokenizer, shape):
    s = sample_of(tokenizer, shape)
    assert len(s.input_ids) == len(s.labels)
    assert s.labels[-1] == s.input_ids[-1] == last_trained(s)
    assert tokenizer.convert_ids_to_tokens(last_trained(s)) in {tokenizer.eos_token, "<|im_end|>"}


def test_plain_alpaca_prompt_ends_with_eos(plain_tokenizer):
    s = sample_of(plain_tokenizer, "alpaca")
    assert last_trained(s) == plain_tokenizer.eos_token_id


def test_alpaca_trains_only_the_output(tokenizer):
    s = sample_of(tokenizer, "alpaca")
    assert trained_runs(tokenizer, s) == ["1998-03-03<|im_end|>"]
    # The masked part is exactly the chat template's prompt with the generation header.
    user = ALPACA["instruction"] + "\n\n" + ALPACA["input"]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert s.input_ids[: len(prompt_ids)] == prompt_ids
    assert set(s.labels[: len(prompt_ids)]) == {IGNORE}
    assert IGNORE not in s.labels[len(prompt_ids) :]


def test_plain_alpaca_template_without_chat_template(plain_tokenizer):
    tok = plain_tokenizer
    s = sample_of(tok, "alpaca")
    masked = tok.decode([t for t, lab in zip(s.input_ids, s.labels) if lab == IGNORE])
    assert ALPACA["instruction"] in masked and ALPACA["input"] in masked and "### Input:" in masked
    assert trained_runs(tok, s) == ["1998-03-03" + tok.eos_token]
    no_input = sample_of(tok, "alpaca", {"instruction": "Say hi.", "output": "hi"})
    assert "### Input:" not in tok.decode(no_input.input_ids)


def test_chat_trains_each_assistant_turn_and_its_end_token(tokenizer):
    s = sample_of(tokenizer, "chat")
    assert trained_runs(tokenizer, s) == ["Paris.<|im_end|>", "Rome.<|im_end|>"]
    # Everything else -- system, user turns, role headers -- is masked.
    masked = tokenizer.decode([t for t, lab in zip(s.input_ids, s.labels) if lab == IGNORE])
    for m in CHAT["messages"]:
        assert (m["content"] in masked) == (m["role"] != "assistant")


def test_chat_drops_turns_after_the_last_assistant(tokenizer):
    fields = {"messages": CHAT["messages"][:3] + [{"role": "user", "content": "Thanks!"}]}
    s = sample_of(tokenizer, "chat", fields)
    assert "Thanks!" not in tokenizer.decode(s.input_ids)
    assert trained_runs(tokenizer, s) == ["Paris.<|im_end|>"]


def test_text_trains_everything(tokenizer):
    s = sample_of(tokenizer, "text")
    assert IGNORE not in s.labels
    assert tokenizer.decode(s.input_ids) == TEXT["text"] + tokenizer.eos_token


@pytest.mark.parametrize("shape", ["alpaca", "chat"])
def test_train_on_prompt_trains_every_token(tokenizer, shape):
    masked, full = sample_of(tokenizer, shape), sample_of(tokenizer, shape, train_on_prompt=True)
    assert full.input_ids == masked.input_ids and full.labels == full.input_ids
    assert masked.n_trained < full.n_trained


# --- length, packing, splits, batching -----------------------------------------------------------


def make_samples(lengths, trained_from=0):
    """Synthetic samples with distinct ids; tokens from `trained_from` on are trained."""
    out, next_id = [], 10
    for i, n in enumerate(lengths):
        ids = list(range(next_id, next_id + n))
        next_id += n
        labels = [IGNORE] * min(trained_from, n) + ids[trained_from:]
        out.append(Sample(ids, labels, f"mem:{i + 1}"))
    return out


def test_truncate_keeps_the_start_and_warns_once_with_a_count():
    samples = make_samples([5, 12, 20, 8])
    with pytest.warns(UserWarning) as record:
        kept = fit_length(samples, 10, "truncate", "d.jsonl")
    assert len(record) == 1 and "2 of 4 samples" in str(record[0].message)
    assert [len(s) for s in kept] == [5, 10, 10, 8]
    assert kept[2].input_ids == samples[2].input_ids[:10] and kept[2].labels == samples[2].labels[:10]


def test_truncation_drops_samples_left_with_nothing_to_train():
    samples = make_samples([8, 30], trained_from=5)
    samples[1].labels[:11] = [IGNORE] * 11  # a prompt of 11 tokens: nothing trained in the first 10
    with pytest.warns(UserWarning, match="1 of 2 samples .*; 1 of those had no trained tokens"):
        kept = fit_length(samples, 10, "truncate")
    assert [s.source for s in kept] == ["mem:1"]
    kept = fit_length(make_samples([4, 6]), 10, "truncate")  # nothing long: no warning, all kept
    assert len(kept) == 2


def test_skip_drops_long_samples_with_a_count():
    samples = make_samples([5, 12, 20, 8])
    with pytest.warns(UserWarning, match="2 of 4 samples .* skipped"):
        kept = fit_length(samples, 10, "skip")
    assert [s.source for s in kept] == ["mem:1", "mem:4"]


def test_packing_has_no_cross_sample_targets_and_restarts_positions():
    samples = make_samples([3, 4, 5, 2, 6, 1])
    rows = pack(samples, 8)
    assert all(len(r) <= 8 for r in rows)
    assert [t for r in rows for t in r.input_ids] == [t for s in samples for t in s.input_ids]  # order kept
    flat_labels = [lab for r in rows for lab in r.labels]
    flat_pos = [p for r in rows for p in r.position_ids]
    at = 0
    for s in samples:
        assert flat_pos[at : at + len(s)] == list(range(len(s)))
        # first token: its label would be predicted from the previous sample, so it is masked;
        # the rest are exactly the sample's own labels.
        assert flat_labels[at] == IGNORE and flat_labels[at + 1 : at + len(s)] == s.labels[1:]
        at += len(s)
    # Same trained targets as unpacked training (where label 0 is dropped by the shift anyway).
    assert sum(r.n_trained for r in rows) == sum(s.n_trained - (s.labels[0] != IGNORE) for s in samples)


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


def test_collate_right_pads_and_masks(tokenizer):
    samples = [sample_of(tokenizer, "text"), sample_of(tokenizer, "alpaca")]
    pad = pad_id_for(tokenizer)
    batch = collate(samples, pad)
    rows, width = batch["input_ids"].shape
    assert rows == 2 and width == max(len(s) for s in samples)
    for b, s in enumerate(samples):
        n = len(s)
        assert (
            batch["input_ids"][b, :n].tolist() == s.input_ids and batch["labels"][b, :n].tolist() == s.labels
        )
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (width - n)
        assert set(batch["input_ids"][b, n:].tolist()) <= {pad} and set(batch["labels"][b, n:].tolist()) <= {
            IGNORE
        }
        assert batch["position_ids"][b, :n].tolist() == list(range(n))
    packed = collate(pack(make_samples([3, 2]), 8), pad)
    assert packed["position_ids"][0].tolist() == [0, 1, 2, 0, 1]
    assert pad_id_for(SimpleNamespace(pad_token_id=None, eos_token_id=7)) == 7  # no pad token: pad with EOS


def test_template_rejections_are_user_errors(tokenizer, monkeypatch):
    strict = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
    strict += "{% endif %}{{ m['content'] }}{% endfor %}"
    monkeypatch.setattr(tokenizer, "chat_template", strict)
    with pytest.raises(
        LorafitError, match=r"mem:1: field 'messages': the chat template rejects it \(no system role"
    ):
        sample_of(tokenizer, "chat")


def test_load_data_end_to_end(tmp_path, tokenizer):
    path = write_lines(tmp_path / "train.jsonl", [ALPACA] * 9 + [{**ALPACA, "output": "word " * 300}])
    cfg = DataConfig(path=str(path), max_seq_length=128, on_long="skip", val_fraction=0.2, seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = load_data(tokenizer, cfg)
    assert len(splits.train) + len(splits.val) + sum("skipped" in str(w.message) for w in caught) == 10
    assert len(splits.val) == 2 and all(len(s) <= 128 for s in splits.train + splits.val)
    val_path = write_lines(tmp_path / "val.jsonl", [ALPACA])
    packed = load_data(
        tokenizer, DataConfig(path=str(path), val_path=str(val_path), on_long="skip", packing=True)
    )
    assert len(packed.val) == 1 and len(packed.train) < 9 and packed.train[0].position_ids is not None
    total, trained = n_tokens(packed.train)
    assert total == sum(len(r) for r in packed.train) and 0 < trained < total


def test_describe_sample_marks_trained_text(tokenizer):
    sample = sample_of(tokenizer, "chat")
    header, body = describe_sample(tokenizer, sample).split("\n", 1)
    assert f"{len(sample)} tokens, {sample.n_trained} trained" in header
    assert "«Paris.<|im_end|>»" in body and "«Rome.<|im_end|>»" in body
    assert "Capital of France?" in body and "«Capital" not in body  # masked text is shown plain
    packed = describe_sample(tokenizer, pack([sample_of(tokenizer, "text")] * 2, 64)[0])
    assert packed.count("next packed sample") == 1


def test_template_that_rewrites_earlier_turns_is_refused(tokenizer, monkeypatch):
    # This template marks only the last message, so a turn rendered alone is not a prefix of the chat.
    marks_last = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% if loop.last %} END{% endif %}\n"
    )
    marks_last += "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    monkeypatch.setattr(tokenizer, "chat_template", marks_last)
    with pytest.raises(LorafitError, match=r"mem:1: field 'messages\[2\]': .* not .* token prefix"):
        sample_of(tokenizer, "chat")
    s = sample_of(tokenizer, "chat", train_on_prompt=True)  # the suggested way out works
    assert s.labels == s.input_ids and s.input_ids[-1] == tokenizer.eos_token_id
