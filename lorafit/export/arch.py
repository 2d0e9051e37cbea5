"""Which model families export to GGUF, and the hyperparameters llama.cpp reads for each.

    HF model_type   llama.cpp arch   Q/K rows permuted   norm weights   notes
    llama           llama            yes                 as is          SmolLM2, Llama 2/3; llama3/linear rope via rope_freqs
    qwen2           qwen2            no (NEOX rope)      as is          q/k/v biases
    qwen3           qwen3            no (NEOX rope)      as is          per-head q/k RMSNorm
    gemma3_text     gemma3           no (NEOX rope)      + 1            sliding-window layers, embeddings scaled by sqrt(d)
    smollm3         smollm3          yes                 as is          Llama's tensors; every 4th layer without rope

Metadata keys are `<arch>.<key>` (gguf-py's `Keys.LLM` / `Keys.Attention` / `Keys.Rope`):
context_length, embedding_length, block_count, feed_forward_length, attention.head_count,
attention.head_count_kv, attention.key_length / value_length (the head size),
attention.layer_norm_rms_epsilon, rope.dimension_count, rope.freq_base, and per family
rope.scaling.*, attention.sliding_window, final_logit_softcapping.

A model option llama.cpp's graph for that arch cannot express (an MLP bias, YaRN rope, a Gemma 3
attention scale other than 1/sqrt(head_dim), ...) is refused here, before anything is written:
the file would load and then compute something else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gguf import MODEL_ARCH, MODEL_ARCH_NAMES, GGUFWriter, RopeScalingType

from lorafit.errors import LorafitError


@dataclass(frozen=True)
class Family:
    model_type: str
    arch: MODEL_ARCH
    label: str
    permute_qk: bool  # llama.cpp rotates adjacent pairs for this arch, HF rotates half-split rows
    norm_shift: float  # added to every `*norm.weight` (Gemma's RMSNorm multiplies by 1 + w)
    check: Callable[[object], None]
    hparams: Callable[[GGUFWriter, object], None]

    @property
    def arch_name(self) -> str:
        return MODEL_ARCH_NAMES[self.arch]


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_parameters(config, layer_type: str | None = None) -> dict:
    """The rope settings as transformers 5 keeps them ({"rope_theta", "rope_type", "factor", ...});
    per layer type ("full_attention" / "sliding_attention") where the model has several."""
    params = getattr(config, "rope_parameters", None)
    if params is None:  # older transformers: rope_theta + rope_scaling
        params = {"rope_theta": getattr(config, "rope_theta", 10000.0), **(getattr(config, "rope_scaling", None) or {})}
    if layer_type is not None and layer_type in params:
        params = params[layer_type]
    return {"rope_type": params.get("rope_type", params.get("type", "default")), **params}


def _refuse(config, what: str) -> None:
    raise LorafitError(f"{config.model_type} model with {what}: llama.cpp's graph for this architecture cannot "
                       "compute that, so lorafit does not export it to GGUF")


def _common(w: GGUFWriter, c) -> None:
    d = head_dim(c)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(getattr(c, "num_key_value_heads", None) or c.num_attention_heads)
    w.add_key_length(d)
    w.add_value_length(d)
    w.add_rope_dimension_count(d)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)


# -- llama ------------------------------------------------------------------------------------
LLAMA_ROPE = ("default", "linear", "llama3")  # non-default ones travel as the rope_freqs tensor (see layout)


def _check_llama(c) -> None:
    if getattr(c, "mlp_bias", False):
        _refuse(c, "mlp_bias=True")
    if getattr(c, "hidden_act", "silu") != "silu":
        _refuse(c, f"hidden_act={c.hidden_act!r}")
    rope = rope_parameters(c)["rope_type"]
    if rope not in LLAMA_ROPE:
        _refuse(c, f"rope_type={rope!r} (exportable: {', '.join(LLAMA_ROPE)})")


def _llama(w: GGUFWriter, c) -> None:
    _common(w, c)
    w.add_rope_freq_base(rope_parameters(c)["rope_theta"])


# -- smollm3 ---------------------------------------------------------------------------------
SMOLLM3_NOPE_STEP = 4  # llama.cpp's smollm3: layers 3, 7, 11, ... skip rope (a fixed step, not a key it reads)


def _check_smollm3(c) -> None:
    _check_llama(c)
    expected = [int((i + 1) % SMOLLM3_NOPE_STEP != 0) for i in range(c.num_hidden_layers)]
    if list(getattr(c, "no_rope_layers", expected)) != expected:
        _refuse(c, f"no_rope_layers other than every {SMOLLM3_NOPE_STEP}th layer")
    if getattr(c, "use_sliding_window", False):
        _refuse(c, "use_sliding_window=True")


# -- qwen2 / qwen3 ----------------------------------------------------------------------------
def _check_qwen(c) -> None:
    if getattr(c, "use_sliding_window", False):
        _refuse(c, "use_sliding_window=True")
    if c.model_type == "qwen3" and getattr(c, "attention_bias", False):
        _refuse(c, "attention_bias=True")
    if getattr(c, "hidden_act", "silu") != "silu":
        _refuse(c, f"hidden_act={c.hidden_act!r}")
    rope = rope_parameters(c)["rope_type"]
    if rope != "default":
        _refuse(c, f"rope_type={rope!r} (exportable: default)")


def _qwen(w: GGUFWriter, c) -> None:
    _common(w, c)
    w.add_rope_freq_base(rope_parameters(c)["rope_theta"])


# -- gemma 3 ----------------------------------------------------------------------------------
GEMMA3_SWA_PERIOD = 6  # llama.cpp's gemma3: layers 5, 11, 17, ... attend globally, the rest in a window
GEMMA3_SWA_THETA = 10000.0  # llama.cpp's fixed rope base of the sliding-window layers


def _check_gemma3(c) -> None:
    n = c.num_hidden_layers
    expected = ["full_attention" if (i + 1) % GEMMA3_SWA_PERIOD == 0 else "sliding_attention" for i in range(n)]
    if list(getattr(c, "layer_types", expected)) != expected:
        _refuse(c, "a sliding-window layer pattern other than every 6th layer global")
    # llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 62-layer 27B
    scalar = c.hidden_size // c.num_attention_heads if n == 62 else head_dim(c)
    if getattr(c, "query_pre_attn_scalar", scalar) != scalar:
        _refuse(c, f"query_pre_attn_scalar={c.query_pre_attn_scalar} (llama.cpp uses {scalar})")
    if getattr(c, "attn_logit_softcapping", None):
        _refuse(c, "attn_logit_softcapping")
    if getattr(c, "hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        _refuse(c, f"hidden_activation={c.hidden_activation!r}")
    local = rope_parameters(c, "sliding_attention")
    if local["rope_type"] != "default" or float(local["rope_theta"]) != GEMMA3_SWA_THETA:
        _refuse(c, f"sliding-window rope {local} (llama.cpp uses theta {GEMMA3_SWA_THETA:g}, no scaling)")
    rope = rope_parameters(c, "full_attention")["rope_type"]
    if rope not in ("default", "linear"):
        _refuse(c, f"rope_type={rope!r} (exportable: default, linear)")


def _gemma3(w: GGUFWriter, c) -> None:
    _common(w, c)
    rope = rope_parameters(c, "full_attention")
    w.add_rope_freq_base(rope["rope_theta"])
    if rope["rope_type"] == "linear":  # llama.cpp applies it to the global layers only, as HF does
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    w.add_sliding_window(c.sliding_window)
    if getattr(c, "final_logit_softcapping", None):
        w.add_final_logit_softcapping(c.final_logit_softcapping)


FAMILIES = {f.model_type: f for f in (
    Family("llama", MODEL_ARCH.LLAMA, "Llama", True, 0.0, _check_llama, _llama),
    Family("qwen2", MODEL_ARCH.QWEN2, "Qwen2", False, 0.0, _check_qwen, _qwen),
    Family("qwen3", MODEL_ARCH.QWEN3, "Qwen3", False, 0.0, _check_qwen, _qwen),
    Family("gemma3_text", MODEL_ARCH.GEMMA3, "Gemma 3 (text)", False, 1.0, _check_gemma3, _gemma3),
    Family("smollm3", MODEL_ARCH.SMOLLM3, "SmolLM3", True, 0.0, _check_smollm3, _llama),
)}

# Families llama.cpp runs (its architecture name) whose tensors lorafit's writer does not lay out yet: their own
# kinds of layer (linear attention and its convolution state, Mamba-2, short convolutions, 3-D experts with
# their biases and sinks, per-layer input embeddings) each need their own GGUF mapping and hyperparameters.
NOT_YET = {"gemma4_text": ("gemma4", "per-layer input embeddings and KV-sharing layers"),
           "qwen3_5_text": ("qwen35", "gated DeltaNet linear attention"),
           "qwen3_5_moe_text": ("qwen35moe", "gated DeltaNet linear attention and 3-D experts"),
           "qwen3_next": ("qwen3next", "gated DeltaNet linear attention and 3-D experts"),
           "gpt_oss": ("gpt-oss", "3-D experts with biases and attention sinks"),
           "llama4_text": ("llama4", "3-D experts and chunked attention"),
           "olmo3": ("olmo2", "sliding-window layers"),
           "granitemoehybrid": ("granitehybrid", "Mamba-2 layers"),
           "lfm2": ("lfm2", "short-convolution layers"),
           "ministral3": ("mistral3", "YaRN rope with attention temperature scaling")}


def family_for(config) -> Family:
    """The family of an HF config, checked for options llama.cpp could not compute."""
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        supported = ", ".join(f"{f.label} ({f.model_type})" for f in FAMILIES.values())
        if model_type in NOT_YET:
            arch, what = NOT_YET[model_type]
            raise LorafitError(f"model_type {model_type!r}: llama.cpp runs it as {arch!r}, and lorafit's GGUF writer "
                               f"does not lay out its {what} yet; it exports {supported}")
        archs = "/".join(getattr(config, "architectures", None) or []) or "unknown class"
        raise LorafitError(f"model_type {model_type!r} ({archs}) cannot be exported to GGUF; supported: {supported}")
    family.check(config)
    return family
