"""Demo task data: determinism, correct targets (by an independent parser), disjoint splits, scoring."""

import calendar
import datetime as dt
import re

import pytest

from lorafit.errors import LorafitError
from lorafit.train.data import IGNORE, read_records, tokenize_record
from lorafit.train.demo_task import (
    INSTRUCTION,
    accuracy,
    exact_match,
    make_dataset,
    make_splits,
    number_words,
    ordinal_suffix,
    ordinal_words,
    write_jsonl,
)

# An independent reader of the surface forms, written from English rather than from the generator.
# fmt: off
CARDINALS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
    "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
)
ORDINALS = (
    "zeroth", "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth",
    "tenth", "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth",
    "eighteenth", "nineteenth",
)
# fmt: on
WORDS = {w: i for i, w in enumerate(CARDINALS)} | {w: i for i, w in enumerate(ORDINALS)}
for tens, name in enumerate(
    ("twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"), 2
):
    WORDS[name] = WORDS[name.replace("y", "ieth")] = 10 * tens
WORDS["thousand"] = 1000
MONTH_OF = {calendar.month_name[m].lower(): m for m in range(1, 13)}
MONTH_OF |= {calendar.month_abbr[m].lower(): m for m in range(1, 13)} | {"sept": 9}


def words_value(words):
    return sum(WORDS[w] for w in words)


def read_year(group):
    if group[0].startswith("'"):
        yy = int(group[0][1:])
        return 1900 + yy if yy >= 50 else 2000 + yy
    if group[0].isdigit():
        return int(group[0])
    if "thousand" in group:  # "two thousand five"
        k = group.index("thousand")
        return 1000 * words_value(group[:k]) + words_value(group[k + 1 :])
    return 100 * WORDS[group[0]] + words_value(group[1:])  # "nineteen ninety eight", "twenty sixteen"


def read_date(text):
    tokens = re.findall(r"'\d\d|\d+(?:st|nd|rd|th)?|[a-z]+|,", text.lower().replace("-", " "))
    groups, current, month = [], [], None
    for t in tokens:
        if t in WORDS:
            current.append(t)
            continue
        if current:
            groups.append(current)
            current = []
        if t in MONTH_OF:
            month = MONTH_OF[t]
        elif t[0] in "'0123456789":
            groups.append([t])
        else:
            assert t in {"the", "of", ","}, (t, text)
    if current:
        groups.append(current)
    assert len(groups) == 2 and month, (groups, text)
    day = groups[0]
    day = int(re.match(r"\d+", day[0]).group()) if day[0][0].isdigit() else words_value(day)
    return dt.date(read_year(groups[1]), month, day)


def test_same_seed_same_data():
    assert make_dataset(300, seed=7) == make_dataset(300, seed=7)
    assert make_dataset(300, seed=7) != make_dataset(300, seed=8)


def test_targets_are_iso_dates_matching_the_inputs():
    records = make_dataset(3000, seed=0)
    for r in records:
        assert set(r) == {"instruction", "input", "output"} and r["instruction"] == INSTRUCTION
        date = dt.date.fromisoformat(r["output"])
        assert r["output"] == f"{date.year:04d}-{date.month:02d}-{date.day:02d}"
        assert read_date(r["input"]) == date, r
    assert len({r["output"] for r in records}) == len(records)  # distinct dates


def test_surface_forms_vary():
    inputs = [r["input"] for r in make_dataset(500, seed=1)]

    def share(pattern):
        return sum(bool(re.search(pattern, x)) for x in inputs) / len(inputs)

    forms = {
        "word year": r"nineteen|thousand|twenty [a-z]",
        "two-digit year": r"'\d\d$",
        "four-digit year": r"\d{4}$",
        "ordinal suffix": r"\d(st|nd|rd|th)\b",
        "ordinal word": r"\b(first|second|third|[a-z]+th)\b",
        "abbreviated month": r"\b(Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sept?|Oct|Nov|Dec)\b",
        "full month": r"January|February|March|April|June|July|August|September|October|November|December",
        "the ... of": r"^the .* of ",
    }
    for name, pattern in forms.items():
        assert share(pattern) > 0.1, name


def test_word_numbers_read_back():
    for n in range(1, 100):
        assert words_value(number_words(n).replace("-", " ").split()) == n
        assert words_value(ordinal_words(n).replace("-", " ").split()) == n
        assert int(ordinal_suffix(n)[:-2]) == n
    assert [ordinal_suffix(n)[-2:] for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 23, 111)] == [
        "st", "nd", "rd", "th", "th", "th", "th", "st", "nd", "rd", "th"
    ]  # fmt: skip


def test_splits_have_disjoint_dates():
    train, held = make_splits(400, 100, seed=5)
    assert len(train) == 400 and len(held) == 100
    assert not {r["output"] for r in train} & {r["output"] for r in held}
    assert make_splits(400, 100, seed=5) == (train, held)
    with pytest.raises(LorafitError, match="demo dataset size"):
        make_dataset(10**6)


def test_written_file_loads_as_alpaca_and_trains_on_the_date(tmp_path, tokenizer):
    records = make_dataset(5, seed=2)
    path = write_jsonl(tmp_path / "sub" / "demo.jsonl", records)
    loaded = read_records(path)
    assert [r.fields for r in loaded] == records and {r.shape for r in loaded} == {"alpaca"}
    for record in loaded:
        s = tokenize_record(tokenizer, record)
        trained = [t for t, lab in zip(s.input_ids, s.labels) if lab != IGNORE]
        assert tokenizer.decode(trained) == record.fields["output"] + "<|im_end|>"


def test_exact_match_normalizes_whitespace_and_takes_the_first_line():
    assert exact_match("1998-03-03", "1998-03-03")
    assert exact_match("  1998-03-03 \nThat is the date.", "1998-03-03")
    assert exact_match("\n\n1998-03-03", "1998-03-03\n")
    assert not exact_match("1998-03-04", "1998-03-03")
    assert not exact_match("", "1998-03-03")
    assert not exact_match("The date is\n1998-03-03", "1998-03-03")
    assert accuracy(["1998-03-03", "x", "2001-01-01\n"], ["1998-03-03", "2000-01-01", "2001-01-01"]) == 2 / 3
    assert accuracy([], []) == 0.0
