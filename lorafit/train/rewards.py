"""Reward functions for GRPO: named in a run's YAML, checked before the model loads, called per generation.

    grpo:
      reward_funcs:
        - {name: exact_match, column: answer}     # shipped, with options
        - my_rewards.py:brevity                   # a function in a file (relative to the working directory)
        - mypackage.rewards:format_ok             # a function in an importable module

A reward function has TRL's signature, f(prompts, completions, **columns) -> list[float | None]:

    prompts         one per completion: the prompt as the data file gave it (a string, or chat messages)
    completions     the sampled text; for chat prompts [{"role": "assistant", "content": text}]
    completion_ids  the sampled token ids
    **columns       the data file's other fields, one list each, a value per completion

It returns one reward per completion; None leaves that completion out of this function's term (TRL's
convention). A function that raises, or returns the wrong number of values, stops the run with one line
naming it. A function without **kwargs receives only the arguments it names.

Shipped rewards (each 1.0 or 0.0 unless said):

    exact_match(column="answer", first_line=False)   the completion (stripped; or its first line) equals
                                                     str(column value)
    regex_match(pattern, search=False)               the stripped completion matches `pattern` whole (or
                                                     somewhere, with search)
    length_target(target, unit="tokens")             max(0, 1 - |length - target| / target), length in tokens
                                                     or "chars"
    json_valid()                                     the completion (without a ``` fence) parses as JSON
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafit.errors import LorafitError

CALL_ARGS = ("prompts", "completions", "completion_ids")  # what every call passes besides the columns


def text_of(completion: str | list[dict]) -> str:
    """A completion's text: the string, or a chat completion's (first) message content."""
    return completion if isinstance(completion, str) else completion[0]["content"]


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return " ".join(lines[0].split()) if lines else ""


def exact_match(prompts: list, completions: list, *, column: str = "answer", first_line: bool = False,
                **columns) -> list[float | None]:
    """1.0 where the completion equals the record's `column` (None where the record has no value)."""
    if column not in columns:
        raise KeyError(f"the data has no column {column!r} (it has {sorted(columns) or 'none'}): "
                       f"set the reward's column option")
    out: list[float | None] = []
    for completion, target in zip(completions, columns[column]):
        if target is None:
            out.append(None)
            continue
        text, want = text_of(completion), str(target)
        same = _first_line(text) == _first_line(want) if first_line else text.strip() == want.strip()
        out.append(float(same))
    return out


def regex_match(prompts: list, completions: list, *, pattern: str, search: bool = False,
                **columns) -> list[float]:
    """1.0 where the stripped completion matches `pattern` (re.fullmatch, or re.search with `search`)."""
    compiled = re.compile(pattern, re.DOTALL)
    find = compiled.search if search else compiled.fullmatch
    return [float(find(text_of(c).strip()) is not None) for c in completions]


def length_target(prompts: list, completions: list, completion_ids: list | None = None, *, target: int,
                  unit: str = "tokens", **columns) -> list[float]:
    """max(0, 1 - |length - target| / target): 1 at the target length, falling linearly to 0 at 0 and 2x."""
    if unit not in ("tokens", "chars"):
        raise ValueError(f"unit must be tokens or chars, got {unit!r}")
    if unit == "tokens":
        lengths = [len(ids) for ids in completion_ids]
    else:
        lengths = [len(text_of(c)) for c in completions]
    return [max(0.0, 1.0 - abs(n - target) / target) for n in lengths]


def json_valid(prompts: list, completions: list, **columns) -> list[float]:
    """1.0 where the completion, stripped of a surrounding ``` fence, is valid JSON."""
    out = []
    for c in completions:
        text = text_of(c).strip()
        fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, re.DOTALL)
        try:
            json.loads(fenced.group(1) if fenced else text)
            out.append(1.0)
        except ValueError:
            out.append(0.0)
    return out


SHIPPED: dict[str, Callable] = {f.__name__: f for f in (exact_match, regex_match, length_target, json_valid)}


@dataclass
class Reward:
    """A loaded reward function: its metric name, the callable (options bound), and what it was written as."""

    name: str
    func: Callable
    spec: str
    takes: tuple[str, ...] | None  # the keyword arguments it names; None: it takes **kwargs (every column)
    required: tuple[str, ...] = ()  # the columns it cannot do without

    def __call__(self, prompts: list, completions: list, completion_ids: list, columns: dict[str, list]
                 ) -> list[float]:
        """Its rewards for one batch, None as NaN; a failure or a wrong length is a one-line LorafitError."""
        kwargs = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **columns}
        if self.takes is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in self.takes}
        try:
            values = self.func(**kwargs)
        except Exception as e:  # the user's code: its error, named, in one line
            message = " ".join(str(e).split()) or "(no message)"
            raise LorafitError(f"reward function {self.name} ({self.spec}) raised {type(e).__name__}: {message}") from None
        try:
            values = list(values)
        except TypeError:
            raise LorafitError(f"reward function {self.name} ({self.spec}) returned {type(values).__name__}, not "
                               f"a list of {len(completions)} rewards (one per completion)") from None
        if len(values) != len(completions):
            raise LorafitError(f"reward function {self.name} ({self.spec}) returned {len(values)} value(s) for "
                               f"{len(completions)} completions: return one reward (or None) per completion")
        out = []
        for v in values:
            try:
                out.append(math.nan if v is None else float(v))
            except (TypeError, ValueError):
                raise LorafitError(f"reward function {self.name} ({self.spec}) returned {v!r}: rewards are "
                                   "numbers (or None)") from None
        return out


def load_rewards(specs: list[str | dict]) -> list[Reward]:
    """Every reward of a `reward_funcs` list, imported and checked (see the module docstring); metric
    names made unique (a second exact_match is exact_match_2)."""
    rewards = [load_reward(spec, f"grpo.reward_funcs[{i}]") for i, spec in enumerate(specs)]
    seen: dict[str, int] = {}
    for r in rewards:
        seen[r.name] = seen.get(r.name, 0) + 1
        if seen[r.name] > 1:
            r.name = f"{r.name}_{seen[r.name]}"
    return rewards


def load_reward(spec: str | dict, where: str = "reward") -> Reward:
    """One reward function from `module:function`, `file.py:function`, a shipped name, or a mapping
    {name: <one of those>, option: value, ...}."""
    options: dict[str, Any] = {}
    if isinstance(spec, dict):
        options = dict(spec)
        if not isinstance(options.get("name"), str):
            raise LorafitError(f"{where}: a mapping needs name: <function> (module:function, file.py:function "
                               f"or one of {', '.join(SHIPPED)}), got {spec!r}")
        spec = options.pop("name")
    if not isinstance(spec, str) or not spec.strip():
        raise LorafitError(f"{where}: expected module:function, file.py:function or one of "
                           f"{', '.join(SHIPPED)}, got {spec!r}")
    func = _resolve(spec.strip(), where)
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        raise LorafitError(f"{where}: {spec} is not a function whose signature can be read") from None
    kinds = {p.kind for p in params.values()}
    varkw = inspect.Parameter.VAR_KEYWORD in kinds
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    shape = f"({', '.join(str(p) for p in params.values())})"
    missing = [a for a in ("prompts", "completions") if a not in named and not varkw]
    positional_only = [n for n, p in params.items() if p.kind is p.POSITIONAL_ONLY and p.default is p.empty]
    if missing or positional_only:
        raise LorafitError(f"{where}: {spec} takes {shape}; a reward function takes TRL's (prompts, completions, "
                           "**kwargs) and returns one float (or None) per completion")
    unknown = [k for k in options if k not in named]
    if unknown:
        raise LorafitError(f"{where}: {spec} has no option {unknown[0]!r}; its options: "
                           f"{', '.join(sorted(named - set(CALL_ARGS))) or 'none'}")
    required = tuple(n for n, p in params.items() if n in named and n not in CALL_ARGS and n not in options
                     and p.default is p.empty)
    bound = functools.partial(func, **options) if options else func
    name = getattr(func, "__name__", spec.rsplit(":", 1)[-1])
    return Reward(name, bound, spec, None if varkw else tuple(named), required)


def _resolve(spec: str, where: str) -> Callable:
    if ":" not in spec:
        if spec in SHIPPED:
            return SHIPPED[spec]
        raise LorafitError(f"{where}: unknown reward {spec!r}: write module:function or path/to/file.py:function, "
                           f"or use a shipped one ({', '.join(SHIPPED)})")
    source, _, attr = spec.rpartition(":")
    if source.endswith(".py"):
        path = Path(source)
        if not path.is_file():
            raise LorafitError(f"{where}: {path} not found (relative paths start at the working directory "
                               f"{Path.cwd()})")
        module_name = f"lorafit_reward_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(module_name)
        if module is None:
            loader = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(loader)
            try:
                loader.loader.exec_module(module)
            except Exception as e:
                raise LorafitError(f"{where}: importing {path} failed: {type(e).__name__}: {e}") from None
            sys.modules[module_name] = module
    else:
        try:
            module = importlib.import_module(source)
        except Exception as e:
            raise LorafitError(f"{where}: cannot import module {source!r} for reward {spec}: "
                               f"{type(e).__name__}: {e}") from None
    func = getattr(module, attr, None)
    if func is None:
        raise LorafitError(f"{where}: {source} has no {attr!r}")
    if not callable(func):
        raise LorafitError(f"{where}: {spec} is not callable")
    return func


def check_columns(rewards: list[Reward], columns: set[str], source: str) -> None:
    """Refuse, before the model loads, a reward that needs a column the data does not have."""
    for r in rewards:
        lacking = [c for c in r.required if c not in columns]
        if lacking:
            raise LorafitError(f"{source}: reward function {r.name} ({r.spec}) needs the column {lacking[0]!r}, which "
                               f"the records do not have (they have {', '.join(sorted(columns)) or 'no other field'})")
        column = getattr(r.func, "keywords", {}).get("column", "answer") if _shipped(r, exact_match) else None
        if column is not None and column not in columns:
            raise LorafitError(f"{source}: reward function {r.name} compares with the column {column!r}, which the "
                               f"records do not have (they have {', '.join(sorted(columns)) or 'no other field'}): "
                               f"set its column option, e.g. {{name: exact_match, column: ...}}")


def _shipped(reward: Reward, func: Callable) -> bool:
    return getattr(reward.func, "func", reward.func) is func
