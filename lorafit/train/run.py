"""One fine-tuning run from a YAML file (and flag overrides): what `lorafit train` executes.

    model: SmolLM2-135M-Instruct      # HF folder, .gguf, or the bundled default
    quantize: nf4                     # or ternary, or null
    device: auto                      # or cpu, cuda, cuda:1; dtype: auto / float32 / bfloat16 / float16
    data: {path: train.jsonl, val_fraction: 0.05, max_seq_length: 512}   # or just data: train.jsonl
    lora: {r: 16, alpha: 32, target_modules: all-linear}
    output_dir: runs/mine
    epochs: 2
    learning_rate: 2.0e-4

Every other top-level key is a `TrainConfig` field. The flags come from the same dataclasses
(`--learning-rate 1e-4`, `--lora.r 8`, `--data.path other.jsonl`, `--data other.jsonl`), so there is one
list of options; their help is the docstring under each field (lorafit.fieldinfo), and values are
checked against the fields' declared types.
"""

from __future__ import annotations

import difflib
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from lorafit.config import LoraConfig
from lorafit.device import parse_device, parse_dtype
from lorafit.errors import LorafitError
from lorafit.fieldinfo import check_value
from lorafit.model import DEFAULT_MODEL
from lorafit.train.config import TrainConfig
from lorafit.train.data import DataConfig

SECTIONS = {"data": DataConfig, "lora": LoraConfig}
QUANTIZE = ("nf4", "ternary")


@dataclass
class RunConfig:
    model: str = DEFAULT_MODEL
    """HF-format folder, .gguf file, or the bundled default's name."""
    quantize: str | None = None
    """Quantize the base while loading: "nf4" (QLoRA) or "ternary"; null keeps it in `dtype`."""
    device: str = "auto"
    """Where the model runs: "auto" (the first CUDA GPU when there is one, else the CPU), "cpu", "cuda"
    or "cuda:N"."""
    dtype: str = "auto"
    """Dtype of the unquantized weights and of compute: "auto" (bfloat16 on a GPU, float32 on the
    CPU), "float32", "bfloat16" or "float16"."""
    data: DataConfig | None = None
    """Where the data is and how it becomes training rows (`path` is required)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The loop's knobs, written as top-level keys in the YAML file."""

    def __post_init__(self) -> None:
        if self.quantize not in (None, *QUANTIZE):
            raise LorafitError(f"quantize must be nf4, ternary or null, got {self.quantize!r}")
        parse_device(self.device)  # spelling only: whether the GPU is there is checked when the run starts
        parse_dtype(self.dtype)


TOP = [f.name for f in fields(RunConfig) if f.name != "train"]  # keys of the YAML file besides TrainConfig's


def _names(cls) -> list[str]:
    return [f.name for f in fields(cls)]


def _unknown(key: str, known: list[str], where: str) -> LorafitError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(known))}"
    return LorafitError(f"{where}: unknown key {key!r}{hint}")


def _build(cls, values: dict[str, Any], source: str, section: str | None = None):
    where = f"{source}: {section}" if section else source
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
    label = f"{source}: {section}." if section else f"{source}: "
    values = {k: check_value(cls, k, v, label + k) for k, v in values.items()}
    try:
        return cls(**values)
    except TypeError as e:
        raise LorafitError(f"{where}: {e}") from None


def parse_run_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a nested mapping (from YAML + overrides) into a RunConfig; errors name the key."""
    raw = dict(raw)
    known_top = sorted(set(TOP) | set(_names(TrainConfig)))
    for key in raw:
        if key not in known_top:
            raise _unknown(key, known_top, source)
    data = _data_mapping(raw.pop("data", None))
    if data is None:
        raise LorafitError(f"{source}: missing 'data' (e.g. data: {{path: train.jsonl}}, or --data train.jsonl)")
    top = {k: raw.pop(k) for k in TOP if k in raw}
    lora = raw.pop("lora", None) or {}
    config = _build(RunConfig, top, source)  # model, quantize, device, dtype
    config.train = _build(TrainConfig, {**raw, "lora": _build(LoraConfig, lora, source, "lora")}, source)
    config.data = _build(DataConfig, data, source, "data")
    return config


def _data_mapping(data: Any) -> Any:
    """`data: train.jsonl` (or `--data train.jsonl`) is short for `data: {path: train.jsonl}`."""
    return {"path": data} if isinstance(data, str) else data


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
        child = _data_mapping(node.get(p)) if p == "data" else node.get(p)
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise LorafitError(f"--{dotted}: {p} is {child!r} in the config, not a mapping of settings")
        node[p] = child
        node = child
    node[leaf] = yaml.safe_load(value)


def override_flags() -> list[tuple[str, type, str]]:
    """(dotted key, dataclass, field name) for every settable field, in the order --help shows them:
    the run's own fields, TrainConfig's (top-level keys), then the data and lora sections."""
    flags = [(f.name, RunConfig, f.name) for f in fields(RunConfig) if f.name not in ("data", "train")]
    flags += [(f.name, TrainConfig, f.name) for f in fields(TrainConfig) if f.name != "lora"]
    flags += [(f"{section}.{f.name}", cls, f.name) for section, cls in SECTIONS.items() for f in fields(cls)]
    return flags


def run(config: RunConfig, resume: bool = False) -> list[dict]:
    """Load the model and data, show one sample as the model will see it, train, save.

    Under torchrun (several processes) every process runs this: they join one process group first
    (lorafit.train.distributed.world), the batch is checked against their number before anything loads,
    `distributed: auto` is decided from the model's config.json, and with FSDP each process loads the
    base into host memory and keeps only its shards on its device. Rank 0 alone prints."""
    from lorafit.device import resolve_device, resolve_dtype
    from lorafit.model import load_model, resolve_model
    from lorafit.train.data import describe_sample, load_data, n_tokens
    from lorafit.train.distributed.share import check_batch
    from lorafit.train.distributed.strategy import choose_strategy
    from lorafit.train.distributed.world import init_world, launched_size, shutdown_world
    from lorafit.train.trainer import Trainer

    check_batch(config.train.batch_size, launched_size())
    world = init_world(config.device, config.train.collective_timeout)
    if not world.is_main:  # rank 0 speaks for all: no second copy of the same warnings and progress bars
        import warnings

        from transformers.utils import logging as hf_logging

        warnings.simplefilter("ignore")
        hf_logging.disable_progress_bar()
    device = world.device if world.distributed else resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    load_on = device
    if world.distributed:
        if not world.is_main:
            world.barrier()  # rank 0 converts a GGUF base once, the others then find it converted
        folder = resolve_model(config.model)
        if world.is_main:
            world.barrier()
        strategy, why = choose_strategy(
            config.train.distributed, world.size, folder / "config.json", quantize=config.quantize,
            rank=config.train.lora.r, batch_size=config.train.batch_size, seq=config.data.max_seq_length,
            device=device, dtype=dtype, checkpointing=config.train.gradient_checkpointing)
        config.train.distributed = strategy
        if world.is_main:
            print(f"lorafit train: {world.size} processes ({device.type}), distributed: {strategy} ({why})")
        if strategy == "fsdp":
            load_on = torch.device("cpu")  # each rank then keeps its shards only, on its device
    # LoftQ picks the NF4 codes of the layers it adapts itself, from the full-precision weights: load
    # those, let the Trainer's apply_lora quantize the adapted layers, then quantize the rest as usual
    loftq = config.quantize == "nf4" and config.train.lora.init == "loftq"
    if loftq and world.distributed:
        raise LorafitError("lora.init: loftq quantizes the base in one process: run it without torchrun "
                           "(or --nproc-per-node 1), then train on several with lora.init: kaiming")
    model, tokenizer = load_model(config.model, quantize=None if loftq else config.quantize, dtype=dtype,
                                  device=load_on)
    splits = load_data(tokenizer, config.data)
    if world.is_main:
        total, trained = n_tokens(splits.train)
        print(f"lorafit train: {len(splits.train)} training samples ({total:,} tokens, {trained:,} trained), "
              f"{len(splits.val)} validation samples")
        print("one sample as the model sees it («marked» = trained, the rest is masked):")
        print("    " + describe_sample(tokenizer, splits.train[0]).replace("\n", "\n    "))
    trainer = Trainer(config.train, model, tokenizer, splits.train, splits.val, splits.prompt_format)
    if loftq:
        _quantize_unadapted(model)
    history = trainer.train(resume=resume)
    out = Path(config.train.output_dir)
    if world.is_main:
        weights = "model" if config.train.method == "full" else "adapter"
        print(f"lorafit train: done; {weights} in {out / weights}, metrics in {out / 'metrics.jsonl'}, "
              f"loss curve in {out / 'loss.png'}")
    shutdown_world()
    return history


def _quantize_unadapted(model) -> None:
    """NF4 for the frozen nn.Linear layers LoftQ did not adapt, as QLoRA would have loaded them: not the
    output head, nothing inside a LoRA layer or a modules_to_save wrapper."""
    from torch import nn

    from lorafit.lora.layer import inside_wrapper
    from lorafit.modules import path_matches, set_submodule
    from lorafit.quant.apply import quantize_linear

    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and not inside_wrapper(name) and not path_matches(name, ["lm_head"]) \
                and not module.weight.requires_grad:
            set_submodule(model, name, quantize_linear(name, module))
