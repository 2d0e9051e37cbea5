"""Generation metrics: how a model's answer is compared with the reference.

    exact      the answer's first line equals the reference's, whitespace-normalized (the demo's rule,
               lorafit.train.demo_task.exact_match)
    contains   the whitespace-normalized reference appears in the answer
    regex      the reference is a regular expression the answer's first line matches (re.fullmatch)
    M:F        a Python function F in module M (importable, or a .py path): F(prediction, reference,
               record) -> bool or a number in [0, 1]

Each returns a score in [0, 1] per example; an example scoring below 1 is a wrong answer.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorafit.errors import LorafitError
from lorafit.train.demo_task import exact_match

Scorer = Callable[[str, str, dict[str, Any]], float]
BUILTIN = ("exact", "contains", "regex")


def _normal(text: str) -> str:
    return " ".join(text.split())


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else ""


def exact(prediction: str, reference: str, record: dict[str, Any]) -> float:
    return float(exact_match(prediction, reference))


def contains(prediction: str, reference: str, record: dict[str, Any]) -> float:
    return float(_normal(reference) in _normal(prediction))


def regex(prediction: str, reference: str, record: dict[str, Any]) -> float:
    try:
        return float(re.fullmatch(reference, _first_line(prediction)) is not None)
    except re.error as e:
        raise LorafitError(f"--metric regex: the reference {reference!r} is not a regular expression ({e})") from None


def load_scorer(spec: str) -> Scorer:
    """The scorer a `--metric` names (see the module docstring); a one-line error for a bad one."""
    if spec in BUILTIN:
        return {"exact": exact, "contains": contains, "regex": regex}[spec]
    module_name, sep, function = spec.rpartition(":")
    if not sep or not module_name or not function:
        raise LorafitError(f"--metric {spec!r}: use exact, contains, regex, or a Python scorer as module:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise LorafitError(f"--metric {spec!r}: {path} not found")
            loaded = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            if "" not in sys.path:
                sys.path.insert(0, "")  # a module in the current folder, as `python -m` finds it
            module = importlib.import_module(module_name)
    except LorafitError:
        raise
    except Exception as e:  # the user's module failed to import: say which and why, in one line
        raise LorafitError(f"--metric {spec!r}: cannot import {module_name} ({type(e).__name__}: {e})") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise LorafitError(f"--metric {spec!r}: {module_name} has no function {function!r}")

    def scorer(prediction: str, reference: str, record: dict[str, Any]) -> float:
        value = fn(prediction, reference, record)
        if isinstance(value, bool) or (isinstance(value, int | float) and 0 <= value <= 1):
            return float(value)
        raise LorafitError(f"--metric {spec!r}: returned {value!r}; a scorer returns a bool or a number in [0, 1]")
    return scorer
