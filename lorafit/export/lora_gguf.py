"""An adapter alone as a GGUF LoRA, which llama.cpp applies on top of a GGUF of its base (`--lora`).

The file (llama.cpp `src/llama-adapter.cpp`, written by its `convert_lora_to_gguf.py`):

    general.architecture   the base's arch (llama.cpp refuses an adapter for another arch)
    general.type           "adapter"
    adapter.type           "lora"
    adapter.lora.alpha     alpha; llama.cpp multiplies each pair's product by alpha / r (r read from the tensors)
    <base tensor>.lora_a   (r, in)   e.g. blk.3.attn_q.weight.lora_a      (numpy order; ggml ne = [in, r])
    <base tensor>.lora_b   (out, r)  e.g. blk.3.attn_q.weight.lora_b

so llama.cpp computes W x + (alpha / r) * B (A x) for each adapted matrix. One alpha serves the whole
file, while a lorafit/PEFT adapter may scale each layer differently (rank_pattern, alpha_pattern,
rsLoRA's alpha / sqrt(r)): each B is therefore written pre-multiplied by `s * r / alpha`, with s
the layer's own scaling, which gives exactly s * B A. B's rows get the same rotary permutation as
the base q/k weights (arch.py / layout.py); A is untouched.

What a GGUF LoRA cannot hold is refused with the reason: embedding adapters and modules_to_save
(llama.cpp applies low-rank pairs to matrices only), DoRA (its per-row magnitude is not a low-rank
update), trained biases, and an adapter on an output head tied to the embeddings (there is no
separate output tensor in the base GGUF to apply it to).
"""

from __future__ import annotations

import os

import torch
from gguf import GGUFWriter, Keys

from lorafit.config import LoraConfig, lora_scaling
from lorafit.errors import LorafitError
from lorafit.export.arch import family_for
from lorafit.export.layout import NameMap, rotary_permute
from lorafit.export.model_gguf import Exported
from lorafit.export.writer import OUTTYPES, Planned, check_outtype, tensor_type, write_gguf
from lorafit.lora.state import AdapterState

LORA_OUTTYPES = ("f32", "f16", "bf16")


def check_lora_exportable(state: AdapterState, source: str, tied_output: bool) -> None:
    """Refuse, with a one-line reason, what llama.cpp's GGUF LoRA cannot express."""
    merge = "; export the merged model instead (lorafit export --format gguf)"
    if state.saved:
        raise LorafitError(f"{source}: modules_to_save ({', '.join(state.saved)}) are full weights, which a GGUF LoRA "
                           f"cannot carry (llama.cpp applies only low-rank pairs){merge}")
    for path, entry in state.layers.items():
        if "embedding_A" in entry:
            raise LorafitError(f"{source}: {path} is an embedding adapter; llama.cpp's GGUF LoRA does not support "
                               f"embeddings{merge}")
        if "magnitude" in entry:
            raise LorafitError(f"{source}: {path} is a DoRA adapter; its magnitude vector is not a low-rank update{merge}")
        if tied_output and path.split(".")[-1] == "lm_head":
            raise LorafitError(f"{source}: {path} adapts an output head tied to the embeddings; the base GGUF has no "
                               f"separate output tensor to apply it to{merge}")
    if state.biases:
        raise LorafitError(f"{source}: the adapter trains biases ({next(iter(state.biases))}), which a GGUF LoRA "
                           f"cannot carry{merge}")


def plan_lora(state: AdapterState, config: LoraConfig, names: NameMap, outtype: str) -> list[Planned]:
    """The (lora_a, lora_b) tensors of every adapted matrix, B rescaled to the file's single alpha."""
    planned = []
    for path, entry in sorted(state.layers.items()):
        A, B = entry["A"], entry["B"]  # (r, in), (out, r)
        r = A.shape[0]
        base = names.gguf_name(f"{path}.weight")
        factor = lora_scaling(config.alpha_for(path), r, config.use_rslora) * r / config.alpha
        heads = names.heads_to_permute(base)

        def a_tensor(A=A) -> torch.Tensor:
            return A.float()

        def b_tensor(B=B, factor=factor, heads=heads) -> torch.Tensor:
            B = B.float() * factor
            return B if heads is None else rotary_permute(B, heads)

        planned.append(Planned(f"{base}.lora_a", tuple(A.shape), tensor_type(tuple(A.shape), outtype), a_tensor))
        planned.append(Planned(f"{base}.lora_b", tuple(B.shape), tensor_type(tuple(B.shape), outtype), b_tensor))
    return planned


def export_gguf_lora(config: LoraConfig, state: AdapterState, base_config, out: str | os.PathLike,
                     outtype: str = "f32", source: str = "adapter", name: str | None = None) -> Exported:
    """Write an adapter (read with `lorafit.io.read_adapter`) as a GGUF LoRA for a base of `base_config`."""
    check_outtype(outtype, LORA_OUTTYPES)
    family = family_for(base_config)
    check_lora_exportable(state, source, bool(getattr(base_config, "tie_word_embeddings", False)))
    if not state.layers:
        raise LorafitError(f"{source}: the adapter holds no LoRA weights")
    tensors = plan_lora(state, config, NameMap(family, base_config), outtype)

    def metadata(w: GGUFWriter) -> None:
        w.add_type("adapter")
        w.add_string(Keys.Adapter.TYPE, "lora")
        w.add_float32(Keys.Adapter.LORA_ALPHA, float(config.alpha))
        w.add_name(name or "lorafit adapter")
        w.add_file_type(OUTTYPES[outtype][1])

    path = write_gguf(out, family.arch_name, metadata, tensors, desc=f"writing {os.path.basename(out)} (LoRA)")
    return Exported(path, family.arch_name, outtype, len(tensors), sum(t.nbytes for t in tensors))
