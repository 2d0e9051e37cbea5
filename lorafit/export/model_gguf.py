"""A whole (merged) model as one GGUF file that llama.cpp runs: weights, hyperparameters, tokenizer.

    model (dense, adapters merged) ──► family (arch.py) ──► hparams metadata
                                   ──► names + layouts (layout.py) ──► tensors, encoded per --outtype (writer.py)
    tokenizer ────────────────────────► vocab metadata + chat template (vocab.py)

The model must hold plain dense weights: merge adapters first (`lorafit.merge.merge_to_dense`,
which also dequantizes NF4 layers). Tensors are produced one at a time while writing, so memory
stays at the model plus one encoded tensor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_VERSION, GGUFWriter
from torch import nn

from lorafit.errors import LorafitError
from lorafit.export.arch import family_for
from lorafit.export.layout import NameMap, is_tied, rope_freqs
from lorafit.export.vocab import read_vocab, write_vocab
from lorafit.export.writer import OUTTYPES, Planned, check_outtype, tensor_type, write_gguf
from lorafit.lora.base import is_quantized
from lorafit.lora.inject import adapter_layers, saved_modules


@dataclass
class Exported:
    path: Path
    arch: str
    outtype: str
    n_tensors: int
    n_bytes: int


def plan_tensors(model: nn.Module, outtype: str) -> list[Planned]:
    """Every tensor of the GGUF, in llama.cpp's names and layouts, not yet computed."""
    family = family_for(model.config)
    names = NameMap(family, model.config)
    tied = is_tied(model)
    planned = []
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp falls back to token_embd for the output
        gguf_name = names.gguf_name(hf_name)
        shape = tuple(tensor.shape)
        planned.append(Planned(gguf_name, shape, tensor_type(shape, outtype),
                               lambda h=hf_name, g=gguf_name, t=tensor: names.to_gguf(h, g, t)))
    if (freqs := rope_freqs(model, family)) is not None:
        planned.append(Planned("rope_freqs.weight", tuple(freqs.shape), tensor_type(freqs.shape, outtype, keep_f32=True),
                               lambda f=freqs: f))
    return planned


def check_dense(model: nn.Module) -> None:
    """A GGUF holds one set of plain weights: no adapters, no quantized layers left."""
    layers = [p for p, _ in adapter_layers(model)] + [p for p, _ in saved_modules(model)]
    if layers:
        raise LorafitError(f"{layers[0]}: the model still has adapter layers; merge them first "
                           "(lorafit.merge.merge_to_dense)")
    quantized = [n for n, m in model.named_modules() if is_quantized(m)]
    if quantized:
        raise LorafitError(f"{quantized[0]}: a quantized layer; dequantize first (lorafit.merge.merge_to_dense)")


def export_gguf(model: nn.Module, tokenizer, out: str | os.PathLike, outtype: str = "f16",
                name: str | None = None) -> Exported:
    """Write `model` (dense, merged) and its tokenizer to `out` as a GGUF llama.cpp loads."""
    check_outtype(outtype)
    check_dense(model)
    family = family_for(model.config)
    config = model.config
    vocab = read_vocab(tokenizer, model.get_input_embeddings().weight.shape[0])
    tensors = plan_tensors(model, outtype)

    def metadata(w: GGUFWriter) -> None:
        w.add_type("model")
        w.add_name(name or Path(getattr(config, "_name_or_path", "") or family.label).name)
        w.add_file_type(OUTTYPES[outtype][1])
        w.add_quantization_version(GGML_QUANT_VERSION)
        family.hparams(w, config)
        write_vocab(w, vocab)

    path = write_gguf(out, family.arch_name, metadata, tensors, desc=f"writing {Path(out).name} ({outtype})")
    return Exported(path, family.arch_name, outtype, len(tensors), sum(t.nbytes for t in tensors))
