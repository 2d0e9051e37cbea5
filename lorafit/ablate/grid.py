"""The points of an ablation: a base run config (`lorafit train`'s YAML) times `--grid` axes times methods.

    --grid lora.r=1,4,8,16,64                 one axis: a dotted config key and its values
    --grid lora.target_modules=q|qk|qkv|qkvo|all   values separated by '|' (or ',' when there is no '|')
    --methods lora,qlora,dora,full

A method is a set of config changes: lora (16/32-bit base), qlora (NF4 base), dora (use_dora), full
(`method: full`, every weight; lora.* keys do not apply to it, so full points differing only there are
one point), and the preference objectives dpo, orpo, simpo, kto (on the base config's base and adapter,
with preference data). Short target names (`lorafit.lora.targets.SHORT_TARGETS`) become the family's module names.

Every point is built and validated (`parse_run_config`) before anything trains: an unknown key, an
empty list, an unknown method or a bad value is a LorafitError naming it.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorafit.errors import LorafitError
from lorafit.flags import suggest
from lorafit.lora.targets import SHORT_TARGETS, short_targets
from lorafit.train.run import RunConfig, apply_override, override_flags, parse_run_config

METHODS: dict[str, dict[str, Any]] = {
    "lora": {"method": "lora", "quantize": None, "lora.use_dora": False},
    "qlora": {"method": "lora", "quantize": "nf4", "lora.use_dora": False},
    "dora": {"method": "lora", "quantize": None, "lora.use_dora": True},
    "full": {"method": "full", "quantize": None, "save_steps": None},
    # the preference objectives on the base config's base and adapter (its data must be preference pairs)
    **{m: {"method": m} for m in ("dpo", "orpo", "simpo", "kto")},
}  # a full point keeps no intermediate checkpoints: each would hold the whole model and its AdamW states
POINTS_DIR = "points"


@dataclass
class Point:
    """One run of the ablation: `name` (its folder under points/), the settings that define it as the
    user wrote them (method and grid values), and the validated config it trains with."""

    name: str
    settings: dict[str, Any]
    config: RunConfig
    raw: dict[str, Any] = field(repr=False, default_factory=dict)


def parse_axis(spec: str) -> tuple[str, list[Any]]:
    """`key=v1,v2` (or `key=v1|v2`) -> (key, values parsed as YAML). Errors name the spec."""
    key, eq, values = spec.partition("=")
    key = key.strip().lstrip("-").replace("-", "_")
    if not eq or not key:
        raise LorafitError(f"--grid {spec!r}: expected KEY=V1,V2,... (e.g. lora.r=1,4,8)")
    known = [k for k, _, _ in override_flags()]
    if key not in known or key in ("output_dir", "method", "quantize"):
        reserved = key in ("output_dir", "method", "quantize")
        close = suggest("--" + key.replace("_", "-"), ["--" + k.replace("_", "-") for k in known])
        hint = ("; the ablation sets it (use --methods for method and quantize)" if reserved
                else f"; did you mean {close.lstrip('-').replace('-', '_')}?" if close else "")
        raise LorafitError(f"--grid {spec!r}: unknown key {key!r}{hint}")
    parts = [v.strip() for v in values.split("|" if "|" in values else ",")]
    if not values.strip() or not all(parts):
        raise LorafitError(f"--grid {spec!r}: empty value list; give at least one value, e.g. {key}=1,4")
    return key, [yaml.safe_load(v) for v in parts]


def parse_methods(spec: str) -> list[str]:
    methods = [m.strip() for m in spec.split(",")]
    if not spec.strip() or not all(methods):
        raise LorafitError(f"--methods {spec!r}: empty; give one or more of {', '.join(METHODS)}")
    for m in methods:
        if m not in METHODS:
            raise LorafitError(f"--methods: unknown method {m!r}; use {', '.join(METHODS)}")
    return list(dict.fromkeys(methods))


def point_name(settings: dict[str, Any]) -> str:
    """A folder name from the settings: `lora_r=8_target_modules=qkv`."""
    parts = [str(settings["method"])] + [f"{k.rsplit('.', 1)[-1]}={_text(v)}" for k, v in settings.items()
                                         if k != "method"]
    return re.sub(r"[^A-Za-z0-9=.,_+-]", "-", "_".join(parts))


def _text(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def model_type(model: str) -> str | None:
    """The transformers model_type of a model name or folder (for short target names)."""
    from transformers import AutoConfig

    from lorafit.model import resolve_model

    return getattr(AutoConfig.from_pretrained(resolve_model(model)), "model_type", None)


def build_points(raw: dict[str, Any], axes: list[tuple[str, list[Any]]], methods: list[str], out: str | Path,
                 source: str = "config", method_sets: dict[str, list[tuple[str, str]]] | None = None) -> list[Point]:
    """Every point of methods x axes (full points that differ only in lora.* keys merged), validated.
    method_sets: method -> [(dotted key, YAML value)] set for that method's points only (full fine-tuning
    usually wants a far smaller learning rate than an adapter)."""
    keys = [k for k, _ in axes]
    if len(set(keys)) != len(keys):
        raise LorafitError(f"--grid: a key is given twice ({', '.join(keys)}); list all its values in one --grid")
    combos: list[dict[str, Any]] = [{}]
    for key, values in axes:
        combos = [{**c, key: v} for c in combos for v in values]
    family = None
    if any(k == "lora.target_modules" and isinstance(v, str) and v in SHORT_TARGETS for k, vs in axes for v in vs):
        family = model_type(raw.get("model") or RunConfig().model)
    points: dict[str, Point] = {}
    for method in methods:
        for combo in combos:
            settings = {"method": method, **{k: v for k, v in combo.items()
                                             if not (method == "full" and k.startswith("lora."))}}
            name = point_name(settings)
            if name in points:
                continue
            point_raw = copy.deepcopy(raw)
            for key, value in {**METHODS[method], **settings, "method": METHODS[method]["method"]}.items():
                if key == "lora.target_modules" and isinstance(value, str) and value in SHORT_TARGETS:
                    value = short_targets(family, value)
                _set(point_raw, key, value)
            for key, value in (method_sets or {}).get(method, []):
                apply_override(point_raw, key, value)
            _set(point_raw, "output_dir", str(Path(out) / POINTS_DIR / name))
            points[name] = Point(name, settings, parse_run_config(point_raw, f"{source} [{name}]"), point_raw)
    return list(points.values())


def _set(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """raw[a][b] = value for `a.b` (a `data: file.jsonl` shorthand becomes {path: file.jsonl} first)."""
    *parents, leaf = dotted.split(".")
    node = raw
    for p in parents:
        child = node.get(p)
        child = {"path": child} if p == "data" and isinstance(child, str) else child
        node[p] = child = dict(child) if isinstance(child, dict) else {}
        node = child
    node[leaf] = value
