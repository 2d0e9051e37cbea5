"""How each HF tensor looks in llama.cpp: its GGUF name and the transforms between the two layouts.

Names come from gguf-py's tensor name map for the arch (`gguf.get_tensor_name_map`):
`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`, `model.embed_tokens.weight` ->
`token_embd.weight`, `lm_head.weight` -> `output.weight` (left out when tied to the embeddings:
llama.cpp then reads `token_embd` for the output too).

Rotary embedding layout. HF Llama rotates the two halves of each head against each other
(`rotate_half`: dims i and i + d/2 form a pair); llama.cpp's `llama` arch uses the original
interleaved layout (dims 2i and 2i + 1 form a pair). llama.cpp's converter therefore reorders the
rows of q_proj and k_proj per head, which is the same linear map up to that reordering:

    HF rows of one head:   [p0.x, p1.x, ..., p(d/2-1).x, p0.y, p1.y, ..., p(d/2-1).y]
    llama.cpp rows:        [p0.x, p0.y, p1.x, p1.y, ...]

`rotary_permute` does it on anything whose rows are q/k output features: weights (out, in),
biases (out,) and LoRA B matrices (out, r). Qwen2/Qwen3/Gemma 3 use the half-split ("NEOX")
rope in llama.cpp too, so nothing is permuted for them.

Gemma's RMSNorm computes `x_normed * (1 + w)`; llama.cpp's computes `x_normed * w`, so Gemma
norm weights are stored plus one. Llama rope scaling (llama3, linear) only changes the inverse
frequencies; it travels as `rope_freqs.weight` (d/2,), the factor llama.cpp divides each
frequency by: `base_inv_freq / scaled_inv_freq`, taken from the model's own rotary module.
"""

from __future__ import annotations

import re

import gguf
import torch
from torch import nn

from lorafit.errors import LorafitError
from lorafit.export.arch import Family, head_dim, rope_parameters

_QK = re.compile(r"^blk\.\d+\.attn_(q|k)\.(weight|bias)$")


def rotary_permute(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder rows (dim 0) of q/k tensors from HF's half-split rotary layout to interleaved pairs."""
    d = t.shape[0] // n_heads
    return t.reshape(n_heads, 2, d // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)  # (out, ...)


def unpermute(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `rotary_permute` (interleaved pairs back to half-split)."""
    d = t.shape[0] // n_heads
    return t.reshape(n_heads, d // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


class NameMap:
    """HF parameter names of one model -> GGUF tensor names, with the row permutation each needs."""

    def __init__(self, family: Family, config) -> None:
        self.family = family
        self.config = config
        self.map = gguf.get_tensor_name_map(family.arch, config.num_hidden_layers)

    def gguf_name(self, hf_name: str) -> str:
        """`model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight`."""
        name = self.map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise LorafitError(f"parameter {hf_name}: llama.cpp's {self.family.arch_name} model has no tensor for it; "
                               "lorafit cannot export this model to GGUF")
        return name

    def heads_to_permute(self, gguf_name: str) -> int | None:
        """The head count to permute this tensor's rows by (Llama q/k), or None."""
        m = _QK.match(gguf_name)
        if not self.family.permute_qk or m is None:
            return None
        c = self.config
        return c.num_attention_heads if m.group(1) == "q" else (c.num_key_value_heads or c.num_attention_heads)

    def to_gguf(self, hf_name: str, gguf_name: str, t: torch.Tensor) -> torch.Tensor:
        """A model tensor in llama.cpp's layout (fp32): permuted rows, shifted norms."""
        t = t.detach().float()
        if (heads := self.heads_to_permute(gguf_name)) is not None:
            t = rotary_permute(t, heads)
        if self.family.norm_shift and hf_name.endswith("norm.weight"):
            t = t + self.family.norm_shift
        return t


def is_tied(model: nn.Module) -> bool:
    """Whether the output head reads the input embedding's very storage."""
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and out.weight.data_ptr() == emb.weight.data_ptr()


def rope_freqs(model: nn.Module, family: Family) -> torch.Tensor | None:
    """(d/2,) factors for llama's `rope_freqs.weight`, or None when the rope is not scaled."""
    if family.model_type != "llama" or rope_parameters(model.config)["rope_type"] == "default":
        return None
    c = model.config
    inv = next((b for n, b in model.named_buffers() if n.endswith("rotary_emb.inv_freq")), None)
    if inv is None:
        raise LorafitError(f"{type(model).__name__}: no rotary_emb.inv_freq buffer to read the scaled rope from")
    d = head_dim(c)
    base = 1.0 / (rope_parameters(c)["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d))  # (d/2,)
    return (base / inv.detach().to("cpu", torch.float64)).float()
