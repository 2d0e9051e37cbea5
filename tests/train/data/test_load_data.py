"""load_data end to end, DataConfig's checks, and the package's public names."""

import ast
import dataclasses
import inspect
import warnings

import pytest

from lorafit.errors import LorafitError
from lorafit.train.data import (
    DataConfig,
    batches,
    config,
    load,
    load_data,
    n_tokens,
    preview,
    records,
    tokenize,
)
from tests.train.data.shared import ALPACA, write_lines


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


def test_bad_config_names_the_field():
    with pytest.raises(LorafitError, match="on_long"):
        DataConfig(path="x.jsonl", on_long="wrap")
    with pytest.raises(LorafitError, match="val_fraction"):
        DataConfig(path="x.jsonl", val_fraction=1.5)
    with pytest.raises(LorafitError, match="DataConfig.format 'csv' is unknown"):
        DataConfig(path="x.jsonl", format="csv")


def test_every_data_config_field_has_a_docstring():
    """The CLI's help is built from these (a string right under each field)."""
    tree = ast.parse(inspect.getsource(DataConfig))
    body = tree.body[0].body
    documented = {a.target.id for a, b in zip(body, body[1:])
                  if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)}
    assert documented == {f.name for f in dataclasses.fields(DataConfig)}


# What `lorafit.train.data` exported when it was one module; callers import these from the package.
PUBLIC = ["ALPACA_PROMPT", "FORMATS", "IGNORE", "ON_LONG", "SHAPES", "TRAINED_CLOSE", "TRAINED_OPEN", "DataConfig",
          "Record", "Sample", "Splits", "alpaca_user_text", "collate", "describe_sample", "fit_length", "load_data",
          "n_tokens", "pack", "pad_id_for", "read_records", "split_records", "tokenize_record"]


def test_the_package_exports_every_public_name_of_its_modules():
    import lorafit.train.data as data

    assert set(PUBLIC) <= set(data.__all__)
    for module in (batches, config, load, preview, records, tokenize):
        defined = {name for name, value in vars(module).items() if not name.startswith("_")
                   and (getattr(value, "__module__", None) == module.__name__ or name.isupper())}
        assert defined <= set(data.__all__), module.__name__
    assert all(getattr(data, name) is not None for name in data.__all__)
