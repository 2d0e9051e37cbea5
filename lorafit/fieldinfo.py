"""What a config dataclass says about each of its fields: the docstring under it, its type, its default.

The dataclasses are the one list of options. A field's documentation is the string literal written
right under it (the convention PEP 257 calls an attribute docstring):

    learning_rate: float = 2e-4
    \"\"\"Peak learning rate; 1e-4 to 3e-4 is usual for LoRA, small tasks tolerate more.\"\"\"

`lorafit train --help` shows that text with the type and default of every field, and values read from
YAML files and flags are checked against the same declared types (`check_value`).
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from dataclasses import MISSING, Field, fields, is_dataclass
from typing import Any

import yaml

from lorafit.errors import LorafitError

REQUIRED = object()  # the default of a field that has none
_SCALARS = {"int": int, "float": float, "bool": bool, "str": str, "None": type(None)}
_METAVARS = {"int": "INT", "float": "FLOAT", "bool": "BOOL", "str": "STR", "list": "LIST", "dict": "MAP"}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: docstring} for a dataclass, from the string literal right under each field
    (base classes first, so a subclass can re-document a field)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def get_field(cls: type, name: str) -> Field:
    return next(f for f in fields(cls) if f.name == name)


def type_name(f: Field) -> str:
    """The field's annotation as written (`int | None`, `list[str] | str | None`)."""
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def _parts(f: Field) -> list[str]:
    """The annotation's alternatives reduced to their base names: `list[str] | None` -> [list, None]."""
    return [part.strip().split("[")[0] for part in type_name(f).split("|")]


def default(f: Field) -> Any:
    """The field's default value (a fresh one for default_factory fields), or REQUIRED."""
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return REQUIRED


def yaml_text(value: Any) -> str:
    """`value` as one would write it in the YAML file or after a flag (null, true, 0.0002, [a, b])."""
    if value is None or isinstance(value, (bool, int, float)):
        return yaml.safe_dump(value, default_flow_style=True).split("\n")[0]
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def description(cls: type, name: str) -> str:
    """The field's docstring as one line (its first paragraph, whitespace collapsed)."""
    return " ".join(field_docs(cls).get(name, "").split("\n\n")[0].split())


def help_text(cls: type, name: str) -> str:
    """`<description> (<type>, default: <default>)`: the help of the flag that sets this field."""
    f = get_field(cls, name)
    value = default(f)
    shown = "required" if value is REQUIRED else f"default: {yaml_text(value)}"
    return f"{description(cls, name)} ({type_name(f)}, {shown})".lstrip()


def metavar(f: Field) -> str:
    """INT, FLOAT, BOOL, STR, LIST|STR ...: what a flag for this field takes."""
    names = [_METAVARS.get(p, "VALUE") for p in _parts(f) if p != "None"]
    return "|".join(dict.fromkeys(names)) or "VALUE"


def is_bool(f: Field) -> bool:
    return [p for p in _parts(f) if p != "None"] == ["bool"]


def check_value(cls: type, name: str, value: Any, label: str) -> Any:
    """`value` for field `name` of `cls` if it has the declared type (a float field also takes an int
    or a number written as text, e.g. YAML's `1e-4`), else a LorafitError "<label> must be <type>".
    Fields typed with other classes (nested configs) are passed through for the class to check."""
    parts = _parts(get_field(cls, name))
    if any(p not in _SCALARS and p not in ("list", "dict") for p in parts):
        return value
    if "float" in parts and "str" not in parts:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            return value
    allowed = tuple(_SCALARS.get(p) or {"list": list, "dict": dict}[p] for p in parts)
    if isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed):
        return value
    got = repr(value) if isinstance(value, str) else yaml_text(value)
    raise LorafitError(f"{label} must be {type_name(get_field(cls, name))}, got {got}")
