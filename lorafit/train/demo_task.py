"""The embedded demo's task: dates written in words -> ISO dates. Generated here, no download.

    "the third of March, nineteen ninety-eight"  -> "1998-03-03"
    "Mar 3rd, '98"                               -> "1998-03-03"

Small enough for a 135M model to learn in a few hundred LoRA steps, hard enough that it cannot
do it before: day ordinals and year numbers come as words, months as abbreviations, years with
two digits ('98 means 1998, '05 means 2005: years span 1950-2049, so the century is unambiguous).
Records are Alpaca-shaped {instruction, input, output} and deterministic for a seed.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

from lorafit.errors import LorafitError

INSTRUCTION = "Convert the date to ISO format (YYYY-MM-DD)."
FIRST_YEAR, LAST_YEAR = 1950, 2049  # two-digit year yy: 50-99 -> 19yy, 00-49 -> 20yy

# fmt: off
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
    "November", "December",
)
# fmt: on
MONTH_ABBR = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

# fmt: off
ONES = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
    "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
)
# fmt: on
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
IRREGULAR_ORDINALS = {
    "one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth", "nine": "ninth",
    "twelve": "twelfth",
}  # fmt: skip


def number_words(n: int) -> str:
    """0..99 in words: 7 -> 'seven', 42 -> 'forty-two'."""
    assert 0 <= n < 100, n
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] + (f"-{ONES[ones]}" if ones else "")


def ordinal_words(n: int) -> str:
    """1..99 as an ordinal word: 3 -> 'third', 21 -> 'twenty-first', 30 -> 'thirtieth'."""
    words = number_words(n)
    head, _, last = words.rpartition("-")
    if last in IRREGULAR_ORDINALS:
        last = IRREGULAR_ORDINALS[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return f"{head}-{last}" if head else last


def ordinal_suffix(n: int) -> str:
    """3 -> '3rd', 11 -> '11th', 22 -> '22nd'."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def year_words(year: int, rng: random.Random) -> str:
    """1998 -> 'nineteen ninety-eight'; 2005 -> 'two thousand five'; 2016 -> 'twenty sixteen' or
    'two thousand sixteen' (both are said)."""
    century, rest = divmod(year, 100)
    if century == 19:
        return "nineteen " + number_words(rest)
    if rest == 0:
        return "two thousand"
    if rest >= 10 and rng.random() < 0.5:
        return "twenty " + number_words(rest)
    return "two thousand " + number_words(rest)


def surface(date: dt.date, rng: random.Random) -> str:
    """One randomly chosen way of writing `date` in words (see the module docstring)."""
    month = rng.choice([MONTHS[date.month - 1], MONTH_ABBR[date.month - 1]])
    if date.month == 9 and month == "Sep" and rng.random() < 0.5:
        month = "Sept"
    year = rng.choice([str(date.year), f"'{date.year % 100:02d}", year_words(date.year, rng)])
    ordinal = rng.choice([ordinal_words(date.day), ordinal_suffix(date.day)])
    any_day = rng.choice([str(date.day), f"{date.day:02d}", ordinal])
    pattern = rng.randrange(4)
    if pattern == 0:
        return f"{any_day} {month} {year}"  # 3 March 1998
    if pattern == 1:
        return f"{month} {any_day}, {year}"  # March 3rd, 1998
    if pattern == 2:
        return f"the {ordinal} of {month}, {year}"  # the third of March, nineteen ninety-eight
    return f"{month} the {ordinal}, {year}"  # Mar the 3rd, '98


def make_dataset(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` Alpaca records with distinct dates, the same for the same seed."""
    first, last = dt.date(FIRST_YEAR, 1, 1).toordinal(), dt.date(LAST_YEAR, 12, 31).toordinal()
    if not 0 <= n <= last - first + 1:
        raise LorafitError(
            f"demo dataset size n={n}: use 0 to {last - first + 1} (distinct dates in {FIRST_YEAR}-{LAST_YEAR})"
        )
    rng = random.Random(seed)
    dates = [dt.date.fromordinal(o) for o in rng.sample(range(first, last + 1), n)]
    return [{"instruction": INSTRUCTION, "input": surface(d, rng), "output": d.isoformat()} for d in dates]


def make_splits(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train and eval records with disjoint dates, so eval measures generalization, not recall."""
    records = make_dataset(n_train + n_eval, seed)
    return records[:n_train], records[n_train:]


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    """One JSON object per line (UTF-8); creates the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return " ".join(lines[0].split()) if lines else ""


def exact_match(pred: str, target: str) -> bool:
    """Whether a generation's first line, whitespace-normalized, equals the target."""
    return _first_line(pred) == _first_line(target)


def accuracy(preds: list[str], targets: list[str]) -> float:
    """Share of exact matches (0.0 for no examples)."""
    assert len(preds) == len(targets), (len(preds), len(targets))
    return sum(map(exact_match, preds, targets)) / len(targets) if targets else 0.0
