"""One fine-tuning run from a YAML file (and flag overrides): what `lorafit train` executes.

    model: SmolLM2-135M-Instruct      # HF folder, .gguf, or the bundled default
    quantize: nf4                     # or ternary, or null
    data: {path: train.jsonl, val_fraction: 0.05, max_seq_length: 512}
    lora: {r: 16, alpha: 32, target_modules: all-linear}
    output_dir: runs/mine
    epochs: 2
    learning_rate: 2.0e-4

Every other top-level key is a `TrainConfig` field. The flags come from the same dataclasses
(`--learning-rate 1e-4`, `--lora.r 8`, `--data.path other.jsonl`), so there is one list of options.
"""

from __future__ import annotations

import difflib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from lorafit.config import LoraConfig
from lorafit.errors import LorafitError
from lorafit.model import DEFAULT_MODEL
from lorafit.train.data import DataConfig
from lorafit.train.trainer import TrainConfig

SECTIONS = {"data": DataConfig, "lora": LoraConfig}
TOP = {"model", "quantize", "dtype", "data"}


@dataclass
class RunConfig:
    model: str = DEFAULT_MODEL
    """HF-format folder, .gguf file, or the bundled default's name."""
    quantize: str | None = None
    """Quantize the base while loading: "nf4" (QLoRA) or "ternary"; null keeps it in `dtype`."""
    dtype: str = "float32"
    """Dtype of the unquantized weights and of compute: float32 on CPU, bfloat16 on GPU."""
    data: DataConfig | None = None
    """Where the data is and how it becomes training rows (`path` is required)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The loop's knobs, written as top-level keys in the YAML file."""


def _names(cls) -> list[str]:
    return [f.name for f in fields(cls)]


def _unknown(key: str, known: list[str], where: str) -> LorafitError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(known))}"
    return LorafitError(f"{where}: unknown key {key!r}{hint}")


def _build(cls, values: dict[str, Any], where: str):
    if not isinstance(values, dict):
        raise LorafitError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(values).__name__}")
    known = _names(cls)
    for key in values:
        if key not in known:
            raise _unknown(key, known, where)
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    missing = [k for k in required if k not in values]
    if missing:
        raise LorafitError(f"{where}: missing required key(s) {missing}")
    try:
        return cls(**values)
    except TypeError as e:
        raise LorafitError(f"{where}: {e}") from None


def parse_run_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a nested mapping (from YAML + overrides) into a RunConfig; errors name the key."""
    raw = dict(raw)
    known_top = sorted(TOP | set(_names(TrainConfig)))
    for key in raw:
        if key not in known_top:
            raise _unknown(key, known_top, source)
    data = raw.pop("data", None)
    if data is None:
        raise LorafitError(f"{source}: missing 'data' (e.g. data: {{path: train.jsonl}})")
    top = {k: raw.pop(k) for k in ("model", "quantize", "dtype") if k in raw}
    lora = raw.pop("lora", None) or {}
    if top.get("quantize") not in (None, "nf4", "ternary"):
        raise LorafitError(f"{source}: quantize must be nf4, ternary or null, got {top['quantize']!r}")
    if top.get("dtype", "float32") not in ("float32", "bfloat16", "float16"):
        raise LorafitError(f"{source}: dtype must be float32, bfloat16 or float16, got {top['dtype']!r}")
    train = _build(TrainConfig, {**raw, "lora": _build(LoraConfig, lora, f"{source}: lora")}, source)
    return RunConfig(data=_build(DataConfig, data, f"{source}: data"), train=train, **top)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise LorafitError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise LorafitError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise LorafitError(f"{path}: expected a mapping of settings at the top level")
    return raw


def apply_override(raw: dict[str, Any], dotted: str, value: str) -> None:
    """Set `a.b` = value (parsed as YAML, so 1e-4, true, null and lists work) in a nested mapping."""
    *parents, leaf = dotted.replace("-", "_").split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = yaml.safe_load(value)


def override_flags() -> list[tuple[str, str]]:
    """(flag, help) for every settable field, derived from the dataclasses: one list of options."""
    flags = [("model", "model folder, .gguf or default name"), ("quantize", "nf4, ternary or null"),
             ("dtype", "float32 / bfloat16 / float16")]
    flags += [(f.name, "") for f in fields(TrainConfig) if f.name != "lora"]
    flags += [(f"{section}.{f.name}", "") for section, cls in SECTIONS.items() for f in fields(cls)]
    return flags


def run(config: RunConfig, resume: bool = False) -> list[dict]:
    """Load the model and data, show one sample as the model will see it, train, save."""
    import torch

    from lorafit.model import load_model
    from lorafit.train.data import describe_sample, load_data, n_tokens
    from lorafit.train.trainer import Trainer

    model, tokenizer = load_model(config.model, quantize=config.quantize, dtype=getattr(torch, config.dtype))
    splits = load_data(tokenizer, config.data)
    total, trained = n_tokens(splits.train)
    print(f"lorafit train: {len(splits.train)} training samples ({total:,} tokens, {trained:,} trained), "
          f"{len(splits.val)} validation samples")
    print("one sample as the model sees it («marked» = trained, the rest is masked):")
    print("    " + describe_sample(tokenizer, splits.train[0]).replace("\n", "\n    "))
    trainer = Trainer(config.train, model, tokenizer, splits.train, splits.val)
    history = trainer.train(resume=resume)
    out = Path(config.train.output_dir)
    print(f"lorafit train: done; adapter in {out / 'adapter'}, metrics in {out / 'metrics.jsonl'}, "
          f"loss curve in {out / 'loss.png'}")
    return history
