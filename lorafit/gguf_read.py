"""What a GGUF file says about its model: the architecture, its hyperparameters, and the config fields
transformers' GGUF reader leaves at their defaults.

transformers rebuilds an HF config from a GGUF's metadata, but not all of it: it ignores Qwen3's head
size (`attention.key_length`, falling back to 128), Gemma 3's query scale and the linear rope scaling of
its global layers, and Gemma's logit soft-capping. `config_fixes` reads those from the file the way
llama.cpp does, so a converted model computes what the GGUF computes in llama.cpp. An architecture
transformers cannot read at all is a one-line error naming it.

Only the standard library is needed here (the header is parsed with struct): the estimator reads shapes
through this module without torch or numpy.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from lorafit.errors import LorafitError

SKIP_ARRAYS = 4096  # metadata arrays longer than this (the vocabulary, merges, scores) are not decoded


def gguf_metadata(path: str | Path) -> dict[str, Any]:
    """The GGUF's metadata as plain values (arrays longer than SKIP_ARRAYS left out, their length kept as
    `<key>.length`), plus `tensor_names`. Only the header is read: gguf-py's GGUFReader decodes every
    array (Gemma 3's 262,144-token vocabulary takes it twenty seconds); this skips them.

    The header (GGUF v2/v3, little-endian): magic "GGUF", version u32, tensor count u64, key/value count
    u64, then each key (u64 length + UTF-8) with its value type (u32) and value, then each tensor's name,
    dimension count (u32), dimensions (u64 each), type (u32) and data offset (u64)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            magic, version, n_tensors, n_fields = struct.unpack("<4sIQQ", _read(f, 24))
            if magic != b"GGUF" or version not in (2, 3):
                raise ValueError(f"magic {magic!r}, version {version}: not a little-endian GGUF v2/v3")
            meta: dict[str, Any] = {"GGUF.version": version, "GGUF.tensor_count": n_tensors, "GGUF.kv_count": n_fields}
            for _ in range(n_fields):
                key = _string(f)
                kind = struct.unpack("<I", _read(f, 4))[0]
                if kind != _ARRAY:
                    meta[key] = _value(f, kind)
                    continue
                items, length = struct.unpack("<IQ", _read(f, 12))
                if length > SKIP_ARRAYS:
                    meta[key + ".length"] = length
                    _skip(f, items, length)
                else:
                    meta[key] = [_value(f, items) for _ in range(length)]
            names = []
            for _ in range(n_tensors):
                names.append(_string(f))
                dims = struct.unpack("<I", _read(f, 4))[0]
                _read(f, 8 * dims + 12)
    except (ValueError, OSError, struct.error, UnicodeDecodeError) as e:
        raise LorafitError(f"{path}: not a readable GGUF file ({e})") from None
    meta["tensor_names"] = names
    return meta


_ARRAY, _STRING = 9, 8
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _read(f, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ValueError("the file ends inside its header")
    return data


def _string(f) -> str:
    return _read(f, struct.unpack("<Q", _read(f, 8))[0]).decode("utf-8")


def _value(f, kind: int) -> Any:
    if kind == _STRING:
        return _string(f)
    if kind == _ARRAY:
        items, length = struct.unpack("<IQ", _read(f, 12))
        return [_value(f, items) for _ in range(length)]
    if kind not in _SCALARS:
        raise ValueError(f"unknown value type {kind}")
    fmt = _SCALARS[kind]
    return struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0]


def _skip(f, kind: int, length: int) -> None:
    """Moves past `length` values of type `kind` without decoding them (strings: only their lengths)."""
    if kind in _SCALARS:
        f.seek(length * struct.calcsize(_SCALARS[kind]), 1)
    else:
        for _ in range(length):
            _value(f, kind) if kind == _ARRAY else f.seek(struct.unpack("<Q", _read(f, 8))[0], 1)


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
