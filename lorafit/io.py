"""Adapter files in the PEFT format: `adapter_config.json` + `adapter_model.safetensors`.

This is the only module that knows PEFT's names (`base_model.model.` prefixes, `lora_A.weight`,
`lora_alpha`, ...), so adapters we write load in PEFT, vLLM and friends, and theirs load here.
Files are written to a temporary name and renamed, so an interrupted save never leaves a
half-written adapter where a good one was.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lorafit.card import adapter_card, write_card
from lorafit.config import DEFAULT_ADAPTER, AdaLoraConfig, IA3Config, LoraConfig
from lorafit.errors import AdapterError, BaseMismatch, LorafitError
from lorafit.fingerprint import FINGERPRINT_NAME
from lorafit.lora.base import kind_of
from lorafit.lora.inject import adapter_configs, adapter_layers, add_adapter, delete_adapter, set_adapter
from lorafit.lora.state import AdapterState, check_fits, get_adapter_state, set_adapter_state
from lorafit.lora.targets import name_matches
from lorafit.paths import temporary_file
from lorafit.prompt import PromptFormat

FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PROMPT_NAME = "lorafit_prompt.json"
PREFIX = "base_model.model."

# A PiSSA adapter is always written as a plain LoRA update of the original base (see lora.state),
# so no file of ours asks PEFT to run PiSSA again on load.
_INIT_TO_PEFT = {"kaiming": True, "gaussian": "gaussian", "pissa": True, "random": False, "zeros": True,
                 "loftq": True}  # LoftQ's adapter needs its NF4 base: the weights in the file are what count
# PEFT options that change the math; loading an adapter that uses them must not silently drop them.
_UNSUPPORTED = {"lora_bias": False, "use_qalora": False, "layer_replication": None,
                "trainable_token_indices": None, "alora_invocation_tokens": None}


# -- atomic writes ----------------------------------------------------------------------------
def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` under a temporary name beside `path`, then rename it (the umask's permissions)."""
    with temporary_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    with temporary_file(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


# -- config <-> PEFT json ---------------------------------------------------------------------
def config_to_peft(config: LoraConfig, base_model: str | None, pissa_converted: bool = False,
                   fan_in_fan_out: bool = False) -> dict[str, Any]:
    r, alpha = config.r, config.alpha
    rank_pattern, alpha_pattern = dict(config.rank_pattern), dict(config.alpha_pattern)
    init = _INIT_TO_PEFT[config.init]
    if pissa_converted:
        # Rank doubled (see lora.state); scale alpha so alpha/r (or alpha/sqrt(r)) is unchanged.
        grow = math.sqrt(2) if config.use_rslora else 2.0
        r, alpha = 2 * r, alpha * grow
        rank_pattern = {k: 2 * v for k, v in rank_pattern.items()}
        alpha_pattern = {k: v * grow for k, v in alpha_pattern.items()}
        alpha_pattern.update({k: config.alpha * grow for k in rank_pattern if k not in alpha_pattern})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "target_modules": config.target_modules,
        "bias": config.bias,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "init_lora_weights": init,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "layers_to_transform": config.layers_to_transform,
        "modules_to_save": config.modules_to_save,
        "target_parameters": config.target_parameters,
        "fan_in_fan_out": fan_in_fan_out,  # PEFT's flag for GPT-2's transposed Conv1D weights
        "inference_mode": True,
        "lorafit_format_version": FORMAT_VERSION,
    }


def ia3_config_to_peft(config: IA3Config, base_model: str | None, fan_in_fan_out: bool) -> dict[str, Any]:
    return {
        "peft_type": "IA3",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "target_modules": config.target_modules,
        "feedforward_modules": config.feedforward_modules,
        "fan_in_fan_out": fan_in_fan_out,
        "init_ia3_weights": config.init_ia3_weights,
        "modules_to_save": config.modules_to_save,
        "inference_mode": True,
        "lorafit_format_version": FORMAT_VERSION,
    }


def ia3_config_from_peft(data: dict[str, Any], source: str) -> IA3Config:
    if data.get("exclude_modules"):
        raise AdapterError(f"{source}: field exclude_modules={data['exclude_modules']!r} is a PEFT option lorafit "
                           "does not support for (IA)³")
    try:
        return IA3Config(target_modules=data.get("target_modules"), feedforward_modules=data.get("feedforward_modules"),
                         fan_in_fan_out=bool(data.get("fan_in_fan_out", False)),
                         init_ia3_weights=bool(data.get("init_ia3_weights", True)),
                         modules_to_save=data.get("modules_to_save"))
    except LorafitError as e:
        raise AdapterError(f"{source}: {e}") from None


_ADALORA_FIELDS = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step")


def adalora_config_to_peft(config: AdaLoraConfig, base_model: str | None, fan_in_fan_out: bool) -> dict[str, Any]:
    pattern = None if config.rank_pattern is None else {f"{k}.lora_E": v for k, v in config.rank_pattern.items()}
    out = {f: getattr(config, f) for f in _ADALORA_FIELDS}
    if out["total_step"] is None:  # never trained by a schedule: any valid one (inference ignores it)
        out["total_step"] = config.tinit + config.tfinal + 1
    return {**out, "peft_type": "ADALORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "lora_alpha": config.alpha, "lora_dropout": config.dropout, "target_modules": config.target_modules,
            "rank_pattern": pattern, "bias": "none", "fan_in_fan_out": fan_in_fan_out, "init_lora_weights": True,
            "inference_mode": True, "lorafit_format_version": FORMAT_VERSION}


def adalora_config_from_peft(data: dict[str, Any], source: str) -> AdaLoraConfig:
    for key, default in {**_UNSUPPORTED, "use_dora": False, "modules_to_save": None, "layers_to_transform": None}.items():
        if data.get(key, default) not in (default, None, False, {}, []):
            raise AdapterError(f"{source}: field {key}={data[key]!r} is a PEFT option lorafit does not support for AdaLoRA")
    pattern = data.get("rank_pattern")
    if pattern is not None:
        pattern = {k[: -len(".lora_E")] if k.endswith(".lora_E") else k: [bool(b) for b in v] for k, v in pattern.items()}
    targets = data.get("target_modules")
    try:
        return AdaLoraConfig(**{f: data[f] for f in _ADALORA_FIELDS if f in data}, alpha=data.get("lora_alpha", 8),
                             dropout=data.get("lora_dropout", 0.0) or 0.0, rank_pattern=pattern,
                             target_modules=sorted(targets) if isinstance(targets, (list, set, tuple)) else targets)
    except LorafitError as e:
        raise AdapterError(f"{source}: {e}") from None


def config_from_peft(data: dict[str, Any], source: str) -> LoraConfig | IA3Config | AdaLoraConfig:
    if data.get("peft_type") == "IA3":
        return ia3_config_from_peft(data, source)
    if data.get("peft_type") == "ADALORA":
        return adalora_config_from_peft(data, source)
    if data.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{source}: peft_type is {data.get('peft_type')!r}; lorafit loads LORA, IA3 and ADALORA "
                           "adapters")
    version = data.get("lorafit_format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise AdapterError(f"{source}: lorafit_format_version {version!r} is newer than this lorafit "
                           f"understands ({FORMAT_VERSION}); upgrade lorafit")
    for key, default in _UNSUPPORTED.items():
        if data.get(key, default) not in (default, None, False, {}, []):
            raise AdapterError(f"{source}: field {key}={data[key]!r} is a PEFT option lorafit does not support")
    init = data.get("init_lora_weights", True)
    init = "pissa" if isinstance(init, str) and init.startswith("pissa") else {True: "kaiming", False: "random"}.get(
        init, init if init in ("gaussian",) else "kaiming")
    targets = data.get("target_modules")
    if isinstance(targets, (list, set, tuple)):
        targets = sorted(targets) or None  # [] with target_parameters: only the experts are adapted
    try:
        return LoraConfig(
            r=int(data["r"]),
            alpha=data.get("lora_alpha", data["r"]),
            dropout=data.get("lora_dropout", 0.0) or 0.0,
            target_modules=targets,
            bias=data.get("bias", "none"),
            use_rslora=bool(data.get("use_rslora", False)),
            use_dora=bool(data.get("use_dora", False)),
            init=init,
            rank_pattern=data.get("rank_pattern") or {},
            alpha_pattern=data.get("alpha_pattern") or {},
            layers_to_transform=data.get("layers_to_transform"),
            modules_to_save=data.get("modules_to_save"),
            target_parameters=data.get("target_parameters") or None,
        )
    except KeyError as e:
        raise AdapterError(f"{source}: missing field {e.args[0]!r}") from None
    except LorafitError as e:
        raise AdapterError(f"{source}: {e}") from None


# -- tensors <-> PEFT keys --------------------------------------------------------------------
_LAYER_KEYS = {"A": "lora_A.weight", "B": "lora_B.weight", "magnitude": "lora_magnitude_vector",
               "embedding_A": "lora_embedding_A", "embedding_B": "lora_embedding_B"}
_KEY_PARTS = {v: k for k, v in _LAYER_KEYS.items()}


def state_to_peft(state: AdapterState) -> dict[str, torch.Tensor]:
    out = {}
    for path, entry in state.layers.items():
        for key, tensor in entry.items():
            out[f"{PREFIX}{path}.{_LAYER_KEYS[key]}"] = tensor
    for path, tensor in state.ia3.items():
        out[f"{PREFIX}{path}.ia3_l"] = tensor
    for path, entry in state.svd.items():
        for key, tensor in entry.items():
            out[f"{PREFIX}{path}.lora_{key}"] = tensor
    for path, by_depth in state.experts.items():
        for depth, entry in by_depth.items():
            for key, tensor in entry.items():
                out[f"{PREFIX}{path}.{'base_layer.' * depth}{_LAYER_KEYS[key]}"] = tensor
    for name, tensor in state.biases.items():
        out[PREFIX + name] = tensor
    for path, sd in state.saved.items():
        for key, tensor in sd.items():
            out[f"{PREFIX}{path}.{key}"] = tensor
    return out


def state_from_peft(tensors: dict[str, torch.Tensor], config: LoraConfig, source: str) -> AdapterState:
    state = AdapterState()
    saved = sorted(getattr(config, "modules_to_save", None) or [], key=len, reverse=True)
    for key, tensor in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        name = name.replace(".default.", ".")  # some tools keep the adapter name in the key
        part = next((p for p in _KEY_PARTS if name.endswith("." + p)), None)
        svd = next((p for p in ("lora_A", "lora_E", "lora_B") if name.endswith("." + p)), None)
        if svd is not None and isinstance(config, AdaLoraConfig):
            state.svd.setdefault(name[: -len(svd) - 1], {})[svd[-1]] = tensor
        elif name.endswith(".ia3_l"):
            state.ia3[name[: -len(".ia3_l")]] = tensor
        elif part in ("lora_A.weight", "lora_B.weight") and _expert_key(name[: -len(part) - 1], config):
            path, depth = name[: -len(part) - 1], 0
            while path.endswith(".base_layer"):  # PEFT nests one ParamWrapper per adapted 3-D parameter
                path, depth = path[: -len(".base_layer")], depth + 1
            state.experts.setdefault(path, {}).setdefault(depth, {})[_KEY_PARTS[part]] = tensor
        elif part is not None:
            state.layers.setdefault(name[: -len(part) - 1], {})[_KEY_PARTS[part]] = tensor
        elif name.endswith(".base_layer.weight"):
            continue  # PEFT also stores the full base embedding next to an embedding adapter; the base is ours
        elif name.endswith("bias") and not any(name.startswith(s + ".") or (("." + s + ".") in name) for s in saved):
            state.biases[name] = tensor
        else:
            owner = _saved_owner(name, saved)
            if owner is None:
                raise AdapterError(f"{source}: key {key!r} is neither a LoRA weight nor part of a modules_to_save "
                                   "module; the file is not a LoRA adapter lorafit understands")
            state.saved.setdefault(owner, {})[name[len(owner) + 1:]] = tensor
    return state


def _expert_key(path: str, config: LoraConfig | IA3Config) -> bool:
    """Whether LoRA weights at `path` belong to MoE expert parameters (target_parameters) rather than to
    a module: always when nested under '.base_layer', else when the adapter has target_parameters and
    the path is not one of its target_modules."""
    if not getattr(config, "target_parameters", None):
        return False
    return path.endswith(".base_layer") or config.target_modules is None or not name_matches(path, config.target_modules)


def _saved_owner(name: str, saved: list[str]) -> str | None:
    """The module path in `name` that ends with a modules_to_save entry (longest entry first)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        path = ".".join(parts[:i])
        if any(path == s or path.endswith("." + s) for s in saved):
            return path
    return None


# -- public API -------------------------------------------------------------------------------
def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter: str = DEFAULT_ADAPTER,
                 prompt_format: PromptFormat | None = None, training: dict[str, Any] | None = None) -> Path:
    """Write one adapter (a few MB) in PEFT's format, with its model card (README.md, lorafit.card);
    the base model is not saved.

    `prompt_format`: how its training data was rendered, written to `lorafit_prompt.json` (the Trainer
    passes it); None writes none and removes an older one, so the folder describes this save only. An
    older fingerprint (`lorafit_fingerprint.json`, lorafit.fingerprint) is removed too: the Trainer
    writes the new weights' own after saving them.
    `training`: the run that trained it (the Trainer's `run_info` and history), for the card."""
    configs = adapter_configs(model)
    if adapter not in configs:
        raise LorafitError(f"no adapter named {adapter!r} to save; loaded adapters: {sorted(configs) or 'none'}")
    config = configs[adapter]
    state = get_adapter_state(model, adapter, bias=config.bias)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base_name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    conv1d = any(getattr(kind_of(layer.base_layer), "name", None) == "conv1d" for _, layer in adapter_layers(model)
                 if adapter in layer.adapter_names())
    if isinstance(config, IA3Config):
        peft_config = ia3_config_to_peft(config, base_name, fan_in_fan_out=conv1d)
    elif isinstance(config, AdaLoraConfig):
        peft_config = adalora_config_to_peft(config, base_name, fan_in_fan_out=conv1d)
    else:
        peft_config = config_to_peft(config, base_name, state.pissa_converted, fan_in_fan_out=conv1d)
    atomic_save_safetensors(state_to_peft(state), directory / WEIGHTS_NAME,
                            metadata={"format": "pt", "lorafit_format_version": str(FORMAT_VERSION)})
    atomic_write_bytes(directory / CONFIG_NAME, (json.dumps(peft_config, indent=2, sort_keys=True) + "\n").encode())
    (directory / FINGERPRINT_NAME).unlink(missing_ok=True)  # it described the weights this save replaces
    if prompt_format is None:
        (directory / PROMPT_NAME).unlink(missing_ok=True)
    else:
        atomic_write_bytes(directory / PROMPT_NAME, (json.dumps(prompt_format.to_dict(), indent=2) + "\n").encode())
    write_card(directory, *adapter_card(peft_config, training), title=directory.name)
    return directory


def adapter_dir(directory: str | os.PathLike) -> Path:
    """The adapter folder meant by `directory`: itself, or for the output_dir of a `lorafit train` run
    (no adapter_config.json in it, one in its adapter/) that run's adapter/."""
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file() and (directory / "adapter" / CONFIG_NAME).is_file():
        return directory / "adapter"
    return directory


def adapter_name(directory: str | os.PathLike) -> str:
    """A readable name for an adapter folder: its own, or its run's for a run's adapter/ folder."""
    folder = adapter_dir(directory).resolve()
    return folder.parent.name if folder.name == "adapter" and folder.parent.name else folder.name


def recorded_base(directory: str | os.PathLike) -> str | None:
    """The base model an adapter folder records (`base_model_name_or_path`), when it records one."""
    try:
        base = json.loads((adapter_dir(directory) / CONFIG_NAME).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return base if isinstance(base, str) and base else None


def check_adapter_fits(model: nn.Module, config, state: AdapterState, directory: str | os.PathLike) -> dict[str, int]:
    """`check_fits` for an adapter read from `directory`: when it does not fit (another base model), the
    error names the base the adapter records, the one to load it on."""
    try:
        return check_fits(model, state, str(Path(directory) / WEIGHTS_NAME), getattr(config, "target_parameters", None))
    except BaseMismatch as e:
        base = recorded_base(directory)
        raise BaseMismatch(f"{e} (it was trained on {base!r}: load that base, e.g. --model {base})" if base else
                           str(e)) from None


def read_prompt_format(directory: str | os.PathLike) -> PromptFormat | None:
    """The prompt format recorded next to an adapter (`lorafit_prompt.json`), or None when there is none."""
    path = adapter_dir(directory) / PROMPT_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path}: not valid JSON ({e}); fix or delete the file") from None
    try:
        return PromptFormat.from_dict(data, str(path))
    except LorafitError as e:
        raise AdapterError(str(e)) from None


def read_adapter(directory: str | os.PathLike) -> tuple[LoraConfig | IA3Config | AdaLoraConfig, AdapterState]:
    """Read and parse an adapter folder (or a run's output_dir: its adapter/, see `adapter_dir`); every
    failure names the file and what to do."""
    directory = adapter_dir(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not directory.is_dir():
        raise AdapterError(f"{directory}: adapter folder not found (expected {CONFIG_NAME} and {WEIGHTS_NAME} in it)")
    if not config_path.is_file():
        raise AdapterError(f"{config_path}: missing; an adapter folder needs {CONFIG_NAME} next to {WEIGHTS_NAME}")
    if not weights_path.is_file():
        legacy = directory / "adapter_model.bin"
        hint = " (only a pickled adapter_model.bin is there: re-save it with PEFT's safe_serialization)" if legacy.exists() else ""
        raise AdapterError(f"{weights_path}: missing{hint}")
    try:
        data = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{config_path}: not valid JSON ({e}); fix or re-save the adapter") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{config_path}: expected a JSON object")
    config = config_from_peft(data, str(config_path))
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AdapterError(f"{weights_path}: not a readable safetensors file ({reason}); "
                           "the file is truncated or corrupted: re-save or re-download the adapter") from None
    return config, state_from_peft(tensors, config, str(weights_path))


def load_adapter(model: nn.Module, directory: str | os.PathLike, adapter: str = DEFAULT_ADAPTER,
                 activate: bool = True) -> nn.Module:
    """Load a PEFT-format adapter onto a model (bare or already adapted) under the name `adapter`;
    with activate=True it becomes the active one, with activate=False the model computes exactly what
    it did before (the adapter waits, frozen, for `set_adapter` or per-row serving).

    Everything is read and checked against the model first; on any error the model is unchanged."""
    config, state = read_adapter(directory)
    return add_adapter_state(model, config, state, adapter, activate=activate, source=str(adapter_dir(directory)))


def add_adapter_state(model: nn.Module, config: LoraConfig | IA3Config | AdaLoraConfig, state: AdapterState, adapter: str = DEFAULT_ADAPTER,
                      activate: bool = True, source: str = "adapter") -> nn.Module:
    """Put an adapter already read (`read_adapter`) into `model` under the name `adapter`, as
    `load_adapter` does; `source` names it in errors. A caller that inspects the parsed adapter
    first (a server refusing what it cannot batch) so reads the files once.

    Checked against the model first; on any error the model is unchanged."""
    ranks = check_adapter_fits(model, config, state, source)
    if isinstance(config, IA3Config):
        ranks = dict.fromkeys(state.ia3, 1)  # the paths to wrap; (IA)³ has no rank
    if not ranks and not state.saved:
        raise AdapterError(f"{source}: the adapter holds no LoRA weights")
    pattern = (config.rank_pattern or {}) if isinstance(config, AdaLoraConfig) else {}
    for path, keep in pattern.items():
        if path in ranks and sum(keep) != ranks[path]:
            raise AdapterError(f"{source}: rank_pattern keeps {sum(keep)} triplets of {path} but the weights hold "
                               f"{ranks[path]}; the config and the weights do not belong together")
    if isinstance(config, (IA3Config, AdaLoraConfig)):
        load_config = config
    else:
        load_config = LoraConfig(**{**config.to_dict(), "init": "zeros"})
    add_adapter(model, load_config, adapter, ranks=ranks, activate=False)
    try:
        set_adapter_state(model, adapter, state)
    except Exception:
        delete_adapter(model, adapter)
        raise
    adapter_configs(model)[adapter] = config
    if activate:
        set_adapter(model, adapter)
    return model
