"""lorafit.fieldinfo: a dataclass's field docstrings, types and defaults, and values checked against the
declared types (what `lorafit train --help` shows and what YAML / flag values must be)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import yaml

from lorafit.errors import LorafitError
from lorafit.fieldinfo import (
    REQUIRED,
    check_value,
    default,
    description,
    field_docs,
    get_field,
    help_text,
    is_bool,
    metavar,
    yaml_text,
)


@dataclass
class Example:
    """Not a field's docstring."""

    path: str
    """Where it is."""
    rate: float = 2e-4
    """A rate written
    over two lines.

    A second paragraph."""
    undocumented: int = 3
    # a comment, not a docstring
    steps: int | None = None
    """How many."""
    names: list[str] | str | None = None
    flag: bool = False
    """On or off."""
    table: dict[str, int] = field(default_factory=dict)
    """Per-name numbers."""


@dataclass
class Child(Example):
    steps: int | None = 5
    """Re-documented in the subclass."""


def test_docstrings_are_the_string_literals_under_the_fields():
    docs = field_docs(Example)
    assert docs == {"path": "Where it is.", "rate": "A rate written\nover two lines.\n\nA second paragraph.",
                    "steps": "How many.", "flag": "On or off.", "table": "Per-name numbers."}
    assert field_docs(Child)["steps"] == "Re-documented in the subclass."
    assert field_docs(Child)["path"] == "Where it is."
    assert description(Example, "rate") == "A rate written over two lines."
    assert description(Example, "undocumented") == ""


def test_help_text_has_description_type_and_default():
    assert help_text(Example, "rate") == "A rate written over two lines. (float, default: 0.0002)"
    assert help_text(Example, "path") == "Where it is. (str, required)"
    assert help_text(Example, "steps") == "How many. (int | None, default: null)"
    assert help_text(Example, "table") == "Per-name numbers. (dict[str, int], default: {})"
    assert help_text(Example, "undocumented") == "(int, default: 3)"
    assert default(get_field(Example, "path")) is REQUIRED


@pytest.mark.parametrize("value", [None, True, False, 0, 3, 2e-4, 1e-5, 0.05, "runs/x", "auto", "", [], {},
                                   ["q_proj", "v_proj"], {"a.*": 4}])
def test_yaml_text_reads_back_as_the_value(value):
    assert yaml.safe_load(yaml_text(value)) == value and "\n" not in yaml_text(value)


def test_metavar_and_bool():
    assert [metavar(get_field(Example, n)) for n in ("path", "rate", "steps", "names", "flag", "table")] == \
        ["STR", "FLOAT", "INT", "LIST|STR", "BOOL", "MAP"]
    assert is_bool(get_field(Example, "flag")) and not is_bool(get_field(Example, "steps"))


def test_check_value_coerces_numbers_written_as_text_for_float_fields():
    assert check_value(Example, "rate", "1e-4", "rate") == 1e-4  # YAML 1.1 reads 1e-4 as a string
    assert check_value(Example, "rate", 1, "rate") == 1
    assert check_value(Example, "steps", None, "steps") is None
    assert check_value(Example, "names", "all-linear", "names") == "all-linear"
    assert check_value(Example, "names", ["q"], "names") == ["q"]
    assert check_value(Example, "flag", True, "flag") is True


@pytest.mark.parametrize("name, value, shown", [("rate", "fast", "'fast'"), ("steps", "two", "'two'"),
                                                ("steps", True, "true"), ("steps", 2.5, "2.5"),
                                                ("flag", "run.yaml", "'run.yaml'"), ("path", None, "null"),
                                                ("table", [1], "[1]")])
def test_check_value_names_the_field_and_type(name, value, shown):
    with pytest.raises(LorafitError) as e:
        check_value(Example, name, value, f"cfg: {name}")
    type_name = get_field(Example, name).type
    assert str(e.value) == f"cfg: {name} must be {type_name}, got {shown}"
