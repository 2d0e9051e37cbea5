"""Build a quantized model straight from a safetensors checkpoint, one layer at a time.

The model skeleton is created with its parameters on the meta device (no memory), then each linear
layer's weight is read from disk, quantized and swapped in before the next is read, so the whole
model never sits in full precision: peak memory is the quantized model plus one fp layer. A
checkpoint that transformers + bitsandbytes saved in 4-bit loads as is, with no requantization.
GPT-2's Conv1D layers (weights stored (in, out)) are quantized transposed, as bitsandbytes does, and
become `NF4Linear`s. Checkpoint names transformers renames while loading (GPT-NeoX's `embed_out` is
the model's `lm_head`) are renamed the same way.
"""

from __future__ import annotations

import ctypes
import json
import re
import struct
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lorafit.errors import LorafitError
from lorafit.modules import path_matches, plain_linear, read_by_weight, set_submodule
from lorafit.quant.apply import METHODS, is_conv1d
from lorafit.quant.bnb_format import nf4_from_bnb_state, nf4_to_bnb_state
from lorafit.quant.linear import NF4Linear, PackedLinear
from lorafit.quant.ternary import TernaryLinear

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


class TensorReader:
    """Reads single tensors of a safetensors file with plain reads, not a memory map.

    A memory-mapped checkpoint stays resident as file pages once touched, so loading a model
    through one costs its whole file size in RSS; reading tensor by tensor into fresh buffers costs
    one tensor at a time. Format: 8-byte header length, JSON header, then the raw data."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with path.open("rb") as f:
            try:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
                raise LorafitError(f"{path}: not a readable safetensors file ({e}); the checkpoint is corrupted") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries: dict[str, dict] = header

    def read(self, key: str) -> torch.Tensor:
        entry = self.entries[key]
        start, end = entry["data_offsets"]
        buffer = bytearray(end - start)
        with self.path.open("rb") as f:
            f.seek(self.data_start + start)
            if f.readinto(buffer) != len(buffer):
                raise LorafitError(f"{self.path}: tensor {key!r} is cut short; the checkpoint is truncated")
        if not buffer:
            return torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])
        return torch.frombuffer(buffer, dtype=_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc only; elsewhere a no-op).

    Layer-sized buffers come and go while loading; glibc keeps freed chunks in its heap for reuse,
    which shows as resident memory that grows and varies from run to run. Trimming after each
    layer keeps the peak at what is really alive."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise LorafitError(f"{folder}: no model.safetensors (or sharded index) found; quantized loading reads "
                       "safetensors checkpoints only (re-save the model with save_pretrained)")


def checkpoint_names(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """Model parameter name -> checkpoint key, through the plain renamings transformers applies to this
    model's checkpoints when it loads them (`transformers.conversion_mapping`)."""
    from transformers.conversion_mapping import extract_weight_conversions_for_model
    from transformers.core_model_loading import WeightRenaming

    renames = [(t.source_patterns[0], t.target_patterns[0]) for t in extract_weight_conversions_for_model(model) or []
               if type(t) is WeightRenaming and len(t.source_patterns) == len(t.target_patterns) == 1]
    names = {}
    for key in keys:
        name = key
        for source, target in renames:
            name = re.sub(source, target, name)
        names[name] = key
    return names


def stacked_experts(model: nn.Module, key: str, where: dict, read) -> torch.Tensor | None:
    """A 3-D expert weight (E, ...) that the checkpoint keeps one expert at a time, as transformers saves
    Qwen3-Next / Qwen3.5-MoE experts (`mlp.experts.{e}.gate_proj.weight`, ...): its conversion's sources
    stacked over experts (MergeModulelist), then joined (Concatenate) along its dim. None: no such conversion."""
    from transformers.conversion_mapping import extract_weight_conversions_for_model
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

    for conversion in extract_weight_conversions_for_model(model) or []:
        if type(conversion) is not WeightConverter or len(conversion.target_patterns) != 1:
            continue
        target = conversion.target_patterns[0]
        ops = conversion.operations
        if not key.endswith("." + target) or not ops or not isinstance(ops[0], MergeModulelist) or \
                not all(isinstance(op, Concatenate) for op in ops[1:]):
            continue
        prefix = key[: -len(target)]
        parts = []
        for source in conversion.source_patterns:
            experts = []
            while (name := prefix + source.replace("*", str(len(experts)))) in where:
                experts.append(read(name))
            if not experts:
                return None
            parts.append(torch.stack(experts, dim=ops[0].dim))  # (E, out, in)
        return torch.cat(parts, dim=ops[1].dim) if len(ops) > 1 else parts[0]
    return None


def is_bnb_4bit(config) -> bool:
    q = getattr(config, "quantization_config", None)
    q = q if isinstance(q, dict) else (q.to_dict() if q is not None else {})
    return q.get("quant_method") == "bitsandbytes" and bool(q.get("load_in_4bit") or q.get("_load_in_4bit"))


@torch.no_grad()
def load_quantized(folder: str | Path, method: str | None = "nf4", dtype: torch.dtype = torch.float32,
                   skip: tuple[str, ...] = ("lm_head",), blocksize: int = 64, double_quant: bool = True,
                   group_size: int | None = None, device: torch.device | str = "cpu") -> nn.Module:
    """A causal LM from an HF folder with its linear layers quantized while loading, on `device`.

    `dtype` is the dtype of everything that is not quantized, and the compute dtype of the
    quantized layers. A bitsandbytes 4-bit checkpoint keeps its NF4 codes exactly. Each linear
    weight is read into host memory, quantized there (the CPU kernel: the same bytes as everywhere)
    and only its packed form goes to `device`, so neither host nor device ever holds the
    full-precision model: the host holds one layer at a time, the device the quantized model."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if method is not None and method not in METHODS:
        raise LorafitError(f"quantize={method!r} is unknown; use one of {METHODS} or None")
    config = AutoConfig.from_pretrained(folder)
    bnb = is_bnb_4bit(config)
    if bnb:
        del config.quantization_config  # we read its tensors ourselves; no bitsandbytes needed
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    readers = [TensorReader(f) for f in _checkpoint_files(folder)]
    files = {key: r for r in readers for key in r.entries}
    stored = checkpoint_names(model, list(files))  # model name -> checkpoint key
    where = {name: files[key] for name, key in stored.items()}

    def read(key: str) -> torch.Tensor:
        if key not in where:
            raise LorafitError(f"{folder}: checkpoint has no tensor {key!r} that {type(model).__name__} needs")
        return where[key].read(stored[key])

    compute = dtype if dtype != torch.float32 else None
    targets = [n for n, m in model.named_modules()
               if (plain_linear(m) or is_conv1d(m)) and not path_matches(n, [*skip, *read_by_weight(model)])]
    done: set[str] = set()
    for name in tqdm(targets, desc=f"loading + quantizing ({method or 'bnb-nf4'})", unit="layer", leave=False):
        bias = read(f"{name}.bias").to(dtype) if f"{name}.bias" in where else None
        state_keys = [k for k in where if k.startswith(f"{name}.weight.")]
        if bnb and state_keys:  # nf4_from_bnb_state names any missing or mismatched statistic
            state = {k: read(k) for k in [f"{name}.weight", *state_keys] if k in where}
            layer: nn.Module = NF4Linear.from_nf4(nf4_from_bnb_state(name, state), bias)
            layer.compute_dtype = compute
            done |= set(state)
        else:
            weight = read(f"{name}.weight")
            if is_conv1d(model.get_submodule(name)):
                weight = weight.T.contiguous()  # (in, out) -> (out, in), as bitsandbytes quantizes Conv1D
            if not weight.is_floating_point():
                raise LorafitError(f"{folder}: {name}.weight is {weight.dtype} with no quantization statistics "
                                   "next to it; the checkpoint is incomplete or in a format lorafit does not read")
            if method == "nf4":
                layer = NF4Linear(weight, bias, blocksize=blocksize, double_quant=double_quant, compute_dtype=compute)
            elif method == "ternary":
                layer = TernaryLinear(weight, bias, group_size=group_size, compute_dtype=compute)
            else:
                layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=dtype)
                layer.weight.copy_(weight)
                if bias is not None:
                    layer.bias.copy_(bias)
                layer.requires_grad_(False)
            done.add(f"{name}.weight")
            del weight
        done |= {f"{name}.bias"} if bias is not None else set()
        set_submodule(model, name, layer.to(device))
        _release_freed_memory()

    for key, tensor in model.state_dict(keep_vars=True).items():
        if key in done or tensor.device.type != "meta":
            continue
        module_name, _, attr = key.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if key in where:
            value = read(key)
        elif (value := stacked_experts(model, key, where, read)) is None:
            continue  # e.g. a tied output head, tied below
        value = value.to(device, dtype) if value.is_floating_point() else value.to(device)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[attr] = value
    if getattr(config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    missing = [k for k, t in model.state_dict(keep_vars=True).items() if t.device.type == "meta"]
    if missing:
        raise LorafitError(f"{folder}: the checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}")
    return model.to(device).eval()  # moves what is left on the host: non-persistent buffers (rotary tables)


def save_bnb_checkpoint(model: nn.Module, out: str | Path, compute_dtype: str = "float32") -> Path:
    """Save a model whose linear layers are NF4Linear in the layout transformers + bitsandbytes load
    (`from_pretrained(out)` gives their Linear4bit layers with the very same codes)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    nf4_prefixes = []
    for name, module in model.named_modules():
        if isinstance(module, NF4Linear):
            state.update(nf4_to_bnb_state(name, module.nf4()))
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias.detach()
            nf4_prefixes.append(name)
        elif isinstance(module, PackedLinear):
            raise LorafitError(f"layer {name!r} is {type(module).__name__}; only NF4 layers have a bitsandbytes format")
    skip_prefixes = tuple(p + "." for p in nf4_prefixes)
    for key, tensor in model.state_dict().items():
        if not key.startswith(skip_prefixes):
            state.setdefault(key, tensor)
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": None,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    return out
