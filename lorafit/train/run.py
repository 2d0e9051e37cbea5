"""One fine-tuning run from a YAML file (and flag overrides): what `lorafit train` executes.

`EXAMPLE` below is a commented run file (docs/guides/training.md shows the same text, and a test trains
with it). Every other top-level key is a `TrainConfig` field. The flags come from the same dataclasses
(`--learning-rate 1e-4`, `--lora.r 8`, `--data.path other.jsonl`, `--data other.jsonl`), so there is one
list of options; their help is the docstring under each field (lorafit.fieldinfo), and values are
checked against the fields' declared types. A mistake names the key as the user wrote it: the flag
(`--lora.r 0: must be a positive integer`) or the file and key (`run.yaml: lora.r must be ...`).

Relative paths in a YAML file (model, data.path, data.val_path, output_dir) are read from the file's
folder, so a run file works from any working directory; paths given as flags are read from the working
directory. Everything a user can get wrong is checked before the model loads: the config, the output
folder (lorafit.train.outdir), the data file and every line of it (with the tokenizer, which loads in
a moment), then the model.
"""

from __future__ import annotations

import difflib
import re
import time
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
from lorafit.train.config import PreferenceConfig, TrainConfig
from lorafit.train.data import DataConfig
from lorafit.train.grpo_config import GRPOConfig

SECTIONS = {"data": DataConfig, "lora": LoraConfig, "preference": PreferenceConfig, "grpo": GRPOConfig}
QUANTIZE = ("nf4", "ternary")
PATH_KEYS = ("model", "output_dir", "data.path", "data.val_path")  # read from a YAML file's folder

EXAMPLE = """\
# lorafit train run.yaml   (every key is a flag too: --lora.r 8 overrides r below)
model: SmolLM2-135M-Instruct   # an HF-format folder, a .gguf file, or the bundled default
quantize: null                 # nf4: QLoRA on a 4-bit base; ternary; null: the base in dtype
device: auto                   # auto (the first GPU, else the CPU), cpu, cuda, cuda:1
data:
  path: train.jsonl            # one JSON record per line: {"instruction", "input", "output"},
                               # {"messages": [{"role", "content"}, ...]} or {"text"}
  val_fraction: 0.05           # held out for the validation loss (or val_path: val.jsonl)
  max_seq_length: 512          # longer samples are truncated (on_long: skip drops them)
lora:
  r: 16
  alpha: 32
  target_modules: all-linear   # or a list such as [q_proj, v_proj]; null: the model family's default
output_dir: runs/mine          # adapter/, checkpoints/, metrics.jsonl, loss.png
epochs: 2                      # or max_steps: 500
batch_size: 8
learning_rate: 2.0e-4
save_steps: 100                # a checkpoint every 100 steps (Ctrl-C writes one too); --resume continues
# Relative paths are read from this file's folder. `lorafit train --help` lists every key.
"""


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
            raise LorafitError(f"RunConfig.quantize must be nf4, ternary or null, got {self.quantize!r}")
        parse_device(self.device)  # spelling only: whether the GPU is there is checked when the run starts
        parse_dtype(self.dtype)


TOP = [f.name for f in fields(RunConfig) if f.name != "train"]  # keys of the YAML file besides TrainConfig's


def _names(cls) -> list[str]:
    return [f.name for f in fields(cls)]


def _unknown(key: str, known: list[str], where: str, top: bool = False) -> LorafitError:
    section = next((name for name, cls in SECTIONS.items() if key in _names(cls)), None) if top else None
    if section:  # a section's field written at the top level (as TRL's flat configs have it)
        return LorafitError(f"{where}: unknown key {key!r}; it is a field of the {section} section: "
                            f"write {section}: {{{key}: ...}} (or --{section}.{key})")
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(known))}"
    return LorafitError(f"{where}: unknown key {key!r}{hint}")


def _build(cls, values: dict[str, Any], source: str, section: str | None = None, flags: dict[str, str] | None = None):
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
    try:
        values = {k: check_value(cls, k, v, f"{cls.__name__}.{k}") for k, v in values.items()}
        return cls(**values)
    except LorafitError as e:
        raise _as_typed(e, cls, source, section, flags or {}) from None
    except TypeError as e:
        raise LorafitError(f"{where}: {e}") from None


def _as_typed(error: LorafitError, cls, source: str, section: str | None, flags: dict[str, str]) -> LorafitError:
    """A config class's error ("LoraConfig.r must be a positive integer, got 0") in the words the user
    typed: the flag and its value ("--lora.r 0: must be a positive integer") or the file and key
    ("run.yaml: lora.r must be a positive integer, got 0")."""
    m = re.match(rf"{cls.__name__}\.(\w+)(.*)", str(error), re.S)
    if m is None:
        return LorafitError(f"{source}: {section}: {error}" if section else f"{source}: {error}")
    name, rest = m.groups()
    key = f"{section}.{name}" if section else name
    if key in flags:
        if rest.startswith(" "):
            rest = ":" + re.sub(r", got [^;:]*$", "", rest)  # the value is in front already
        return LorafitError(f"--{key.replace('_', '-')} {flags[key]}{rest}")
    return LorafitError(f"{source}: {key}{rest}")


def parse_run_config(raw: dict[str, Any], source: str = "config", flags: dict[str, str] | None = None) -> RunConfig:
    """Validate a nested mapping (from YAML + overrides) into a RunConfig; errors name the key, or the
    flag for keys in `flags` ({dotted key: the value as typed}, from `--lora.r 8` and the like)."""
    raw = dict(raw)
    known_top = sorted(set(TOP) | set(_names(TrainConfig)))
    for key in raw:
        if key not in known_top:
            raise _unknown(key, known_top, source, top=True)
    data = _data_mapping(raw.pop("data", None))
    if data is None:
        raise LorafitError(f"{source}: missing 'data' (e.g. data: {{path: train.jsonl}}, or --data train.jsonl)")
    top = {k: raw.pop(k) for k in TOP if k in raw}
    lora = raw.pop("lora", None) or {}
    preference = raw.pop("preference", None) or {}
    grpo = raw.pop("grpo", None) or {}
    config = _build(RunConfig, top, source, flags=flags)  # model, quantize, device, dtype
    config.train = _build(TrainConfig, {**raw, "lora": _build(LoraConfig, lora, source, "lora", flags),
                                        "preference": _build(PreferenceConfig, preference, source, "preference",
                                                             flags),
                                        "grpo": _build(GRPOConfig, grpo, source, "grpo", flags)},
                          source, flags=flags)
    config.data = _build(DataConfig, data, source, "data", flags)
    return config


def _data_mapping(data: Any) -> Any:
    """`data: train.jsonl` (or `--data train.jsonl`) is short for `data: {path: train.jsonl}`."""
    return {"path": data} if isinstance(data, str) else data


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML run file, its relative paths (PATH_KEYS) read from the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise LorafitError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        column = f" at column {mark.column + 1}" if mark is not None else ""
        raise LorafitError(f"{path}{at}: not valid YAML ({problem}{column})") from None
    except UnicodeDecodeError:
        raise LorafitError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    if not isinstance(raw, dict):
        raise LorafitError(f"{path}: expected a mapping of settings at the top level")
    return resolve_paths(raw, path.parent)


def resolve_paths(raw: dict[str, Any], folder: Path) -> dict[str, Any]:
    """PATH_KEYS holding a relative path, joined to `folder` (the YAML file's); the bundled model's name
    and absolute paths stay as they are."""
    from lorafit.model import is_default_name

    raw = dict(raw)
    if isinstance(raw.get("data"), (str, dict)):
        raw["data"] = dict(_data_mapping(raw["data"]))
    for key in PATH_KEYS:
        section, _, name = key.rpartition(".")
        node = raw.get(section) if section else raw
        value = node.get(name) if isinstance(node, dict) else None
        if not isinstance(value, str) or not value or (key == "model" and is_default_name(value)):
            continue
        node[name] = str(folder / Path(value).expanduser())
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
    the run's own fields, TrainConfig's (top-level keys), then the data, lora, preference and grpo sections."""
    flags = [(f.name, RunConfig, f.name) for f in fields(RunConfig) if f.name not in ("data", "train")]
    flags += [(f.name, TrainConfig, f.name) for f in fields(TrainConfig) if f.name not in SECTIONS]
    flags += [(f"{section}.{f.name}", cls, f.name) for section, cls in SECTIONS.items() for f in fields(cls)]
    return flags


def run(config: RunConfig, resume: bool = False, overwrite: bool = False) -> list[dict]:
    """Check the output folder, read the data, load the model, show one sample as the model will see
    it, train, save; says at the end the final losses and how long it took.

    `resume` continues from the newest checkpoint in output_dir; `overwrite` replaces an earlier run
    there (lorafit.train.outdir: without either, a folder holding a run is refused). The data is read
    and checked with the tokenizer alone, before the model loads.

    Under torchrun (several processes) every process runs this: they join one process group first
    (lorafit.train.distributed.world), the batch is checked against their number before anything loads,
    `distributed: auto` is decided from the model's config.json, and with FSDP each process loads the
    base into host memory and keeps only its shards on its device. Rank 0 alone prints."""
    from lorafit.device import resolve_device, resolve_dtype
    from lorafit.model import load_model, load_tokenizer, resolve_model
    from lorafit.train.data import describe_sample, load_data, n_tokens
    from lorafit.train.distributed.share import check_batch
    from lorafit.train.distributed.strategy import choose_strategy
    from lorafit.train.distributed.world import init_world, launched_size, shutdown_world
    from lorafit.train.outdir import check_output_dir
    from lorafit.train.trainer import Trainer

    start = time.perf_counter()
    check_batch(config.train.batch_size, launched_size())
    if config.train.method == "grpo":  # reward functions imported and checked against the data, before any model
        check_grpo_rewards(config)
    world = init_world(config.device, config.train.collective_timeout)
    if world.is_main:
        check_output_dir(config.train.output_dir, resume, overwrite)  # checked again (and acted on) by the Trainer
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
    tokenizer = load_tokenizer(config.model)  # the data is read and checked before the slow part
    splits = load_data(tokenizer, config.data, unpair=config.train.method == "kto")
    model, _ = load_model(config.model, quantize=None if loftq else config.quantize, dtype=dtype, device=load_on)
    if world.is_main:
        total, trained = n_tokens(splits.train)
        print(f"lorafit train: {len(splits.train)} training samples ({total:,} tokens, {trained:,} trained), "
              f"{len(splits.val)} validation samples, method {config.train.method}")
        print("one sample as the model sees it («marked» = trained, the rest is masked):")
        print("    " + describe_sample(tokenizer, splits.train[0]).replace("\n", "\n    "))
    trainer = Trainer(config.train, model, tokenizer, splits.train, splits.val, splits.prompt_format)
    if loftq:
        _quantize_unadapted(model)
    history = trainer.train(resume=resume, overwrite=overwrite)
    out = Path(config.train.output_dir)
    if world.is_main:
        weights = "model" if config.train.method == "full" else "adapter"
        print(f"lorafit train: done in {_duration(time.perf_counter() - start)}; {summary(history)}")
        print(f"lorafit train: {weights} in {out / weights}, metrics in {out / 'metrics.jsonl'}, "
              f"loss curve in {out / 'loss.png'}")
    shutdown_world()
    return history


def summary(history: list[dict]) -> str:
    """The final losses of a run: the last step's training loss (and the mean of the last 10 steps,
    less noisy), and the last validation loss."""
    if not history:
        return "no steps were run"
    last = history[-1]
    tail = [h["loss"] for h in history[-10:]]
    text = f"final training loss {last['loss']:.4f} at step {last['step']}"
    if len(tail) > 1:
        text += f" (mean of the last {len(tail)} steps {sum(tail) / len(tail):.4f})"
    val = next((h for h in reversed(history) if "val_loss" in h), None)
    if val is not None:
        text += f", validation loss {val['val_loss']:.4f}" + (f" at step {val['step']}" if val is not last else "")
    return text


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def check_grpo_rewards(config: RunConfig) -> None:
    """Method grpo: every reward function imports, has TRL's signature and finds the columns it needs in the
    data file's records (one line naming the function otherwise), before the model loads."""
    from lorafit.train.data import read_records
    from lorafit.train.rewards import check_columns, load_rewards

    rewards = load_rewards(config.train.grpo.reward_funcs)
    records = read_records(config.data.path, config.data.format)
    if records[0].shape != "prompt":
        raise LorafitError(f"{records[0].source}: method grpo trains on prompt-only records ({{prompt, ...}}), but "
                           f"the data holds {records[0].shape!r} records")
    check_columns(rewards, {k for r in records for k in r.fields if k != "prompt"}, config.data.path)


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
