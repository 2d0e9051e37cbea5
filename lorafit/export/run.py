"""The two commands that write a model with its adapter folded in: `lorafit merge` (a transformers
checkpoint) and `lorafit export` (GGUF for llama.cpp, Ollama, LM Studio).

Both check everything a user can get wrong (flags, output path, architecture, that the adapter fits
the base) before the slow part, and write atomically: a temporary name beside the target, renamed
when complete.

    lorafit merge   dense base      -> merge_and_unload, the exact merged weights in the base's dtype
                    quantized base  -> merge_quantized (requantize; the drift report says what it cost),
                                       saved as a bitsandbytes 4-bit checkpoint; --dense: merge_to_dense, bf16
    lorafit export  --format gguf       merge_to_dense in fp32 (an NF4 base is dequantized), then model_gguf
                    --format gguf-lora  the adapter alone (lora_gguf), checked against the base's shapes
"""

from __future__ import annotations

from pathlib import Path

import torch

from lorafit.card import gguf_card, is_card, write_card
from lorafit.errors import LorafitError
from lorafit.export.arch import family_for
from lorafit.export.lora_gguf import LORA_OUTTYPES, export_gguf_lora
from lorafit.export.model_gguf import export_gguf
from lorafit.export.writer import OUTTYPES, check_out_path, check_outtype
from lorafit.io import adapter_dir, adapter_name, check_adapter_fits, load_adapter, read_adapter
from lorafit.lora.base import is_quantized
from lorafit.lora.inject import merge_and_unload
from lorafit.merge import format_report, merge_quantized_report, merge_to_dense
from lorafit.model import load_model, resolve_model
from lorafit.paths import write_folder

FORMATS = ("gguf", "gguf-lora")
MERGE_QUANTIZE = ("nf4",)
DENSE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _skeleton(config):
    """The base model's modules with no memory behind them (for shape checks)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = config.__class__.from_dict(config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a bitsandbytes checkpoint's shapes are the dense ones
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config)


def export_command(model: str, adapter: str | None, fmt: str, outtype: str | None, out: str,
                   overwrite: bool = False) -> Path:
    """`lorafit export`: see the module docstring. Prints what it did; returns the file written."""
    from transformers import AutoConfig

    if fmt not in FORMATS:
        raise LorafitError(f"--format {fmt}: unknown; use one of {', '.join(FORMATS)}")
    outtype = outtype or ("f16" if fmt == "gguf" else "f32")
    check_outtype(outtype, OUTTYPES if fmt == "gguf" else LORA_OUTTYPES)
    path = check_out_path(out, overwrite)
    folder = resolve_model(model)
    config = AutoConfig.from_pretrained(folder)
    family_for(config)  # an unsupported architecture fails here, before any weight is read
    if fmt == "gguf-lora" and adapter is None:
        raise LorafitError("--format gguf-lora writes an adapter: give it with --adapter DIR")
    if adapter is not None:  # an adapter for another base fails here too
        adapter = str(adapter_dir(adapter))  # a run's output_dir: its adapter/
        lora_config, state = read_adapter(adapter)
        check_adapter_fits(_skeleton(config), lora_config, state, adapter)
        if fmt == "gguf-lora" and (state.ia3 or state.svd or state.experts):
            raise LorafitError(f"--format gguf-lora: {adapter} is an (IA)³, AdaLoRA or MoE-expert adapter and a GGUF "
                               "LoRA holds plain LoRA A/B pairs only; export it merged with --format gguf")

    if fmt == "gguf-lora":
        done = export_gguf_lora(lora_config, state, config, path, outtype, source=str(adapter),
                                name=adapter_name(adapter))
        print(f"lorafit export: wrote {done.path}: GGUF LoRA ({done.n_tensors // 2} adapted matrices, {outtype}, arch {done.arch}); "
              f"llama.cpp applies it on a GGUF of {model} (--lora)")
        write_gguf_card(done.path, model, "LoRA adapter", outtype)
        return done.path

    base, tokenizer = load_model(folder)
    quantized = any(is_quantized(m) for m in base.modules())
    if adapter is not None:
        load_adapter(base, adapter)
    if quantized:
        print(f"lorafit export: the base {model} is quantized (NF4); it is exported by dequantizing its weights "
              "to fp32 first" + (", then merging the adapter exactly" if adapter else ""))
    merge_to_dense(base, dtype=torch.float32)  # the exact fp32 merge; dequantizes every NF4 layer
    done = export_gguf(base, tokenizer, path, outtype, name=adapter_name(adapter) if adapter else Path(folder).resolve().name)
    what = f"{model} + adapter {adapter}" if adapter else str(model)
    print(f"lorafit export: wrote {done.path}: {what} as GGUF ({outtype}, arch {done.arch}, {done.n_tensors} tensors, "
          f"{done.n_bytes / 2**20:.0f} MiB of weights, tokenizer and chat template included)")
    write_gguf_card(done.path, model, "merged model" if adapter else "model", outtype)
    return done.path


def write_gguf_card(path: Path, base: str, what: str, outtype: str) -> None:
    """The model card (README.md, library_name: gguf) beside a .gguf, unless that folder's README is
    not a model card (a project's own README is never rewritten)."""
    readme = path.parent / "README.md"
    if not is_card(readme):
        print(f"lorafit export: {readme} exists and is not a model card; left as it is (no card written)")
        return
    write_card(path.parent, *gguf_card(path, base, what, outtype), title=path.stem)


def merge_command(model: str, adapter: str, out: str, overwrite: bool = False, dense: bool = False,
                  quantize: str | None = None, device=None, dtype=None) -> Path:
    """`lorafit merge`: see the module docstring. Prints what it did; returns the folder written.
    `dtype`: of the merged weights (None: the base's own, from its config.json; a quantized base
    merged `dense`: bfloat16)."""
    from transformers import AutoConfig

    from lorafit.quant.load import is_bnb_4bit, save_bnb_checkpoint

    if quantize is not None and quantize not in MERGE_QUANTIZE:
        raise LorafitError(f"--quantize {quantize}: merging supports {', '.join(MERGE_QUANTIZE)} "
                           "(a base quantized as during QLoRA training)")
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise LorafitError(f"{target}: exists and is not empty; choose another --out or pass --overwrite")
    adapter = str(adapter_dir(adapter))  # a run's output_dir: its adapter/
    adapter_config, state = read_adapter(adapter)  # checked against the base's shapes before any weight is read
    base_config = AutoConfig.from_pretrained(resolve_model(model))
    check_adapter_fits(_skeleton(base_config), adapter_config, state, adapter)
    stored = str(getattr(base_config, "dtype", None) or getattr(base_config, "torch_dtype", None)).removeprefix("torch.")
    if dtype is None and quantize is None and not is_bnb_4bit(base_config):  # a dense base: written as it came
        dtype = DENSE_DTYPES.get(stored)
    base, tokenizer = load_model(model, quantize=quantize, device=device or "cpu", dtype=dtype or torch.float32)
    load_adapter(base, adapter)
    quantized = any(is_quantized(m) for m in base.modules())
    if quantized and not dense:
        report = merge_quantized_report(base)
        print(format_report(report))
        merged = merge_and_unload(base)  # adapters are merged already: this unwraps and folds modules_to_save

        def save(folder: Path) -> None:
            save_bnb_checkpoint(merged, folder)
        kind = "a bitsandbytes 4-bit (NF4) checkpoint (transformers + bitsandbytes load it)"
    else:
        out_dtype = dtype or torch.bfloat16
        merged = merge_to_dense(base, out_dtype).to(out_dtype) if quantized else merge_and_unload(base)

        def save(folder: Path) -> None:
            merged.save_pretrained(folder)
        written = str(next(p.dtype for p in merged.parameters())).removeprefix("torch.")
        kind = f"a plain transformers checkpoint in {written}" + (" (the exact merged weights)" if quantized else "")
    def write(folder: Path) -> None:
        save(folder)
        tokenizer.save_pretrained(folder)
    write_folder(target, write)
    print(f"lorafit merge: merged {adapter} into {model}: {kind} in {target}")
    return target
