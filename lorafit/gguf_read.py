"""What a GGUF file says about its model: the architecture, its hyperparameters, and the config fields
transformers' GGUF reader leaves at their defaults.

transformers rebuilds an HF config from a GGUF's metadata, but not all of it: it ignores Qwen3's head
size (`attention.key_length`, falling back to 128), Gemma 3's query scale and the linear rope scaling of
its global layers, and Gemma's logit soft-capping. `config_fixes` reads those from the file the way
llama.cpp does, so a converted model computes what the GGUF computes in llama.cpp. An architecture
transformers cannot read at all is a one-line error naming it.

Only gguf-py (numpy) is needed here: the estimator reads shapes through this module without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorafit.errors import LorafitError

SKIP_ARRAYS = 4096  # metadata arrays longer than this (the vocabulary, merges, scores) are not decoded


def gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The GGUF's metadata as plain values (long arrays left out), plus `tensor_names`."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as e:
        raise LorafitError(f"{path}: not a readable GGUF file ({e})") from None
    meta: dict[str, Any] = {"tensor_names": [t.name for t in reader.tensors]}
    for key, field in reader.fields.items():
        if len(field.data) > SKIP_ARRAYS:
            meta[key + ".length"] = len(field.data)
            continue
        try:
            meta[key] = field.contents()
        except (ValueError, TypeError, IndexError):
            continue
    return meta


def architecture(meta: dict[str, Any], path: str | Path) -> str:
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise LorafitError(f"{path}: the GGUF names no architecture (general.architecture is missing)")
    return arch


def readable_architectures() -> list[str]:
    """GGUF architectures transformers' GGUF reader rebuilds a model of."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    return sorted(a for a in GGUF_CONFIG_MAPPING if a not in ("general", "tokenizer"))


def check_convertible(meta: dict[str, Any], path: str | Path) -> str:
    """The file's architecture, or a one-line error naming it when transformers cannot read it."""
    arch = architecture(meta, path)
    readable = readable_architectures()
    if arch.replace("-", "_") not in readable and arch.replace("moe", "_moe") not in readable:
        raise LorafitError(f"{Path(path).name}: GGUF architecture {arch!r} cannot be converted to a transformers "
                           f"model (transformers reads {', '.join(readable)}); convert it from its original "
                           "checkpoint instead")
    return arch


def config_fixes(meta: dict[str, Any]) -> dict[str, Any]:
    """HF config fields the GGUF holds that transformers' reader drops, for this architecture."""
    arch = meta.get("general.architecture", "")

    def get(key: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{key}", default)

    fixes: dict[str, Any] = {}
    head = get("attention.key_length")
    if head and arch in ("qwen3", "qwen3moe", "qwen2", "llama", "mistral", "gemma2", "gemma3"):
        fixes["head_dim"] = int(head)
    if arch in ("gemma2", "gemma3"):
        layers, hidden, heads = get("block_count"), get("embedding_length"), get("attention.head_count")
        # llama.cpp scales queries by 1/sqrt(head_dim), by 1/sqrt(hidden/heads) for the 62-layer Gemma 3 27B
        if arch == "gemma3" and head:
            fixes["query_pre_attn_scalar"] = hidden // heads if layers == 62 else int(head)
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            if get(key) is not None:
                fixes[key] = float(get(key))
        if get("attention.sliding_window") is not None:
            fixes["sliding_window"] = int(get("attention.sliding_window"))
    if arch == "gemma3" and get("rope.scaling.type") == "linear":
        fixes["rope_scaling_factor"] = float(get("rope.scaling.factor", 1.0))
    return fixes


def apply_fixes(config, fixes: dict[str, Any]) -> None:
    """Set `config_fixes` on an HF config (the rope factor goes to Gemma 3's global layers only)."""
    for key, value in fixes.items():
        if key == "rope_scaling_factor":
            params = dict(getattr(config, "rope_parameters", None) or {})
            full = dict(params.get("full_attention") or {})
            full.update(rope_type="linear", factor=value)
            params["full_attention"] = full
            config.rope_parameters = params
        else:
            setattr(config, key, value)


def shape_fields(meta: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """The config.json fields of the model's shape (layers, widths, heads, vocabulary, tied head)."""
    arch = architecture(meta, path)

    def get(key: str) -> Any:
        return meta.get(f"{arch}.{key}")

    vocab = get("vocab_size") or meta.get("tokenizer.ggml.tokens.length") or len(meta.get("tokenizer.ggml.tokens") or [])
    fields = {"model_type": arch, "hidden_size": get("embedding_length"), "intermediate_size": get("feed_forward_length"),
              "num_hidden_layers": get("block_count"), "num_attention_heads": get("attention.head_count"),
              "num_key_value_heads": get("attention.head_count_kv"), "head_dim": get("attention.key_length"),
              "vocab_size": vocab or None,
              "tie_word_embeddings": "output.weight" not in meta["tensor_names"]}
    return {k: (int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
            for k, v in fields.items() if v is not None}
