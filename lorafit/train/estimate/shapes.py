"""Model shapes: the dimensions of a Llama-style decoder that decide its memory, and parameter counts.

A shape comes from a size name (`SIZES`: public Llama-family configs), a `ModelShape`, an HF config, a
config dict, a model folder or its config.json, or a .gguf file (its metadata, through lorafit.gguf_read).
No torch, no transformers: the numbers are read from the config.

Llama-style means attention with q/k/v/o projections (fused ones count the same: Phi-3's qkv_proj is
q, k and v side by side) and a gated MLP (gate, up, down). The families differ only in their small 1-D
weights per block, counted exactly (`block_vectors`):

    llama, mistral, phi3, ...   two RMSNorms                               2 * hidden
    qwen2                       + q/k/v biases                             + (heads + 2 kv_heads) * head_dim
    qwen3                       + per-head q/k RMSNorms                    + 2 * head_dim
    gemma2                      four RMSNorms (pre/post attention and MLP) 4 * hidden
    gemma3                      four RMSNorms + per-head q/k RMSNorms      4 * hidden + 2 * head_dim
    olmo2, olmo3                + q/k RMSNorms over whole projections      + (heads + kv_heads) * head_dim
    smollm3, ministral3         two RMSNorms (NoPE layers and YaRN change no weight)

GPT-2, GPT-NeoX, Falcon, OPT (ungated MLPs), mixtures of experts (gpt-oss, Llama 4, Qwen3.5-MoE), hybrids
with linear-attention, Mamba or convolution layers (Qwen3.5, Qwen3-Next, Granite 4, LFM2) and Gemma 4's
per-layer inputs have other shapes: a one-line error naming what the estimator does not model.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafit.errors import LorafitError

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ALL_LINEAR = ATTENTION + MLP


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-style decoder that decide its memory."""

    hidden: int
    """Model width (hidden_size)."""
    intermediate: int
    """MLP width (intermediate_size)."""
    layers: int
    """Number of decoder blocks."""
    heads: int
    """Query heads."""
    kv_heads: int
    """Key/value heads (< heads for grouped-query attention)."""
    vocab: int
    """Vocabulary size (rows of the embedding and the LM head)."""
    tie_embeddings: bool = False
    """LM head shares the embedding matrix (counted once)."""
    head_dim: int = 0
    """Per-head width; 0 means hidden // heads."""
    block_vectors: int = 0
    """1-D weights of one block (norms, biases); 0 means Llama's two RMSNorms, 2 * hidden."""
    model_type: str = "llama"
    """The family (HF config's model_type, or the GGUF's architecture), for the printout."""
    interpolated: str = ""
    """How a size that is not a known model's was shaped (`interpolate`), said in the printout."""

    def __post_init__(self) -> None:
        for name in ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab"):
            if getattr(self, name) <= 0:
                raise LorafitError(f"model shape: field '{name}' must be positive, got {getattr(self, name)}")
        if self.heads % self.kv_heads:
            raise LorafitError(
                f"model shape: heads={self.heads} is not a multiple of kv_heads={self.kv_heads}"
            )
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)
        if self.block_vectors == 0:
            object.__setattr__(self, "block_vectors", 2 * self.hidden)

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear layer in one block."""
        q, kv, h, i = (
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.hidden,
            self.intermediate,
        )
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def n_linear_params(self) -> int:
        """Weights of all blocks' linear layers (what QLoRA quantizes; no biases in Llama)."""
        return self.layers * sum(a * b for a, b in self.linears().values())

    @property
    def n_params(self) -> int:
        """All parameters: linears, each block's norms (and biases), the final norm, embedding (+ LM head)."""
        vectors = self.layers * self.block_vectors + self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tie_embeddings else 2)
        return self.n_linear_params + vectors + embeddings

    def describe(self) -> str:
        """One line: the family and the dimensions the estimate uses."""
        how = f" ({self.interpolated})" if self.interpolated else ""
        return (f"{self.model_type}{how}: {self.layers} layers, hidden {self.hidden}, intermediate {self.intermediate}, "
                f"{self.heads} heads ({self.kv_heads} kv) x {self.head_dim}, vocab {self.vocab}, "
                f"{'tied' if self.tie_embeddings else 'own'} head: {self.n_params:,} params")

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """Exact shape from an HF `PretrainedConfig`, a config dict, a config.json path (file or dir), or a .gguf."""
        where = "config"
        if isinstance(config, str | Path) and Path(config).suffix == ".gguf" and Path(config).is_file():
            where, config = str(config), gguf_config(config)
        elif isinstance(config, str | Path):
            path = Path(config)
            path = path / "config.json" if path.is_dir() else path
            if not path.is_file():
                raise LorafitError(f"{path}: file not found: pass a model directory with config.json")
            try:
                where, config = str(path), json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise LorafitError(
                    f"{path}:{e.lineno}: invalid JSON ({e.msg}): fix the config file"
                ) from None
        elif not isinstance(config, dict):
            config = config.to_dict()
        config = config.get("text_config") or config  # multimodal wrappers keep the decoder inside

        def need(key: str) -> int:
            if not isinstance(config.get(key), int):
                raise LorafitError(
                    f"{where}: field '{key}' is missing: this estimator needs a Llama-style config"
                )
            return config[key]

        model_type = config.get("model_type") or "llama"
        if model_type not in BLOCK_VECTORS:
            has = f" ({OTHER_SHAPES[model_type]})" if model_type in OTHER_SHAPES else ""
            raise LorafitError(f"{where}: model_type {model_type!r} is not a Llama-style decoder (gated MLP, q/k/v/o "
                               f"attention){has}; the estimator knows {', '.join(BLOCK_VECTORS)}: pass a size instead")
        heads = need("num_attention_heads")
        hidden = need("hidden_size")
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or hidden // heads
        return cls(
            hidden=hidden,
            intermediate=need("intermediate_size"),
            layers=need("num_hidden_layers"),
            heads=heads,
            kv_heads=kv_heads,
            vocab=need("vocab_size"),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            head_dim=head_dim,
            block_vectors=BLOCK_VECTORS[model_type](hidden, heads, kv_heads, head_dim),
            model_type=model_type,
        )


def gguf_config(path: str | Path) -> dict[str, Any]:
    """The config.json fields of a GGUF's shape, read from its header (the standard library only, no torch)."""
    from lorafit.gguf_read import gguf_metadata, shape_fields

    return shape_fields(gguf_metadata(path), path)  # GGUF architectures are the HF model_types we know


def _norms(n: int, qk: int = 0):
    """block_vectors of a family: `n` hidden-wide norms per block, plus q/k norms of `qk` head widths."""
    return lambda hidden, heads, kv_heads, head_dim: n * hidden + qk * head_dim


# model_type -> block_vectors(hidden, heads, kv_heads, head_dim), see the module docstring
BLOCK_VECTORS = {
    **dict.fromkeys(["llama", "mistral", "phi3", "gemma", "granite", "smollm3", "ministral3", "ministral"], _norms(2)),
    "qwen2": lambda hidden, heads, kv_heads, head_dim: 2 * hidden + (heads + 2 * kv_heads) * head_dim,
    "qwen3": _norms(2, qk=2),
    "gemma2": _norms(4),
    "gemma3": _norms(4, qk=2),
    "gemma3_text": _norms(4, qk=2),
    **dict.fromkeys(["olmo2", "olmo3"], lambda hidden, heads, kv_heads, head_dim: 2 * hidden + (heads + kv_heads) * head_dim),
}

# What the families the estimator refuses have instead of a Llama-style block (said in the refusal)
_LINEAR_ATTENTION = "gated DeltaNet linear-attention layers"
OTHER_SHAPES = {
    "gemma4_text": "per-layer input embeddings and KV-sharing layers", "gemma4": "per-layer input embeddings and KV-sharing layers",
    "qwen3_5_text": _LINEAR_ATTENTION, "qwen3_5": _LINEAR_ATTENTION,
    "qwen3_5_moe_text": _LINEAR_ATTENTION + " and 3-D experts", "qwen3_5_moe": _LINEAR_ATTENTION + " and 3-D experts",
    "qwen3_next": _LINEAR_ATTENTION + " and 3-D experts", "gpt_oss": "3-D experts with biases and attention sinks",
    "llama4_text": "3-D experts every few layers", "llama4": "3-D experts every few layers",
    "granitemoehybrid": "Mamba-2 layers", "lfm2": "short-convolution layers",
    "mixtral": "3-D experts", "qwen2_moe": "3-D experts", "qwen3_moe": "3-D experts",
}


# Size names -> public Llama-family shapes (hidden, intermediate, layers, heads, kv_heads, vocab, tied).
SIZES: dict[str, ModelShape] = {
    "135M": ModelShape(576, 1536, 30, 9, 3, 49152, True),  # SmolLM2-135M
    "360M": ModelShape(960, 2560, 32, 15, 5, 49152, True),  # SmolLM2-360M
    "1B": ModelShape(2048, 8192, 16, 32, 8, 128256, True),  # Llama-3.2-1B
    "3B": ModelShape(3072, 8192, 28, 24, 8, 128256, True),  # Llama-3.2-3B
    "7B": ModelShape(4096, 11008, 32, 32, 32, 32000),  # Llama-2-7B
    "8B": ModelShape(4096, 14336, 32, 32, 8, 128256),  # Llama-3.1-8B
    "13B": ModelShape(5120, 13824, 40, 40, 40, 32000),  # Llama-2-13B
    "34B": ModelShape(8192, 22016, 48, 64, 8, 32000),  # CodeLlama-34B
    "65B": ModelShape(8192, 22016, 80, 64, 64, 32000),  # LLaMA-65B
    "70B": ModelShape(8192, 28672, 80, 64, 8, 128256),  # Llama-3.1-70B
}


SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([MB])", re.IGNORECASE)


def parse_size(text: str) -> float | None:
    """Parameters of a size written as a number with M or B ("40B", "1.5b", "350M"); None otherwise."""
    m = SIZE.fullmatch(text.strip())
    if not m or float(m.group(1)) <= 0:
        return None
    return float(m.group(1)) * (1e6 if m.group(2).upper() == "M" else 1e9)


def _round(x: float, to: int) -> int:
    return max(to, int(round(x / to)) * to)


def interpolate(n_params: float, name: str = "") -> ModelShape:
    """A Llama-shaped decoder of about `n_params` parameters, for a size that is no known model's.

    Between two known sizes a and b (`SIZES`, ordered by parameters), at t = log(n/n_a) / log(n_b/n_a):
    depth is interpolated linearly and width geometrically (heads of 128; GQA with 8 KV heads and a
    multiple of 8 heads where a neighbour uses it), vocabulary and tied head are the nearer neighbour's, and the
    MLP width is solved so that the total comes to n_params (a multiple of 256; 64 below 1B). Beyond the known range,
    depth and width scale as the cube root of the parameters from the nearest end."""
    known = sorted(SIZES.values(), key=lambda s: s.n_params)
    lo = max((s for s in known if s.n_params <= n_params), key=lambda s: s.n_params, default=None)
    hi = min((s for s in known if s.n_params >= n_params), key=lambda s: s.n_params, default=None)
    if lo is not None and hi is not None and lo is not hi:
        t = math.log(n_params / lo.n_params) / math.log(hi.n_params / lo.n_params)
        layers = round(lo.layers + t * (hi.layers - lo.layers))
        hidden = lo.hidden * (hi.hidden / lo.hidden) ** t
        near = lo if t < 0.5 else hi
        gqa = lo.kv_heads < lo.heads or hi.kv_heads < hi.heads
        how = f"interpolated between the known {_label(lo)} and {_label(hi)}"
    else:
        near = lo or hi  # the largest or the smallest known size
        scale = (n_params / near.n_params) ** (1 / 3)
        layers, hidden, gqa = max(1, round(near.layers * scale)), near.hidden * scale, near.kv_heads < near.heads
        how = f"extrapolated from the known {_label(near)}"
    head_dim = 128 if hidden >= 1024 else 64
    hidden = _round(hidden, head_dim * (8 if gqa else 1))  # GQA: a multiple of 8 heads, 8 of them for keys/values
    heads = hidden // head_dim
    kv_heads = 8 if gqa else heads
    probe = ModelShape(hidden, hidden, layers, heads, kv_heads, near.vocab, near.tie_embeddings)
    per_unit = 3 * layers * hidden  # parameters per unit of MLP width (gate, up, down)
    intermediate = _round(probe.intermediate + (n_params - probe.n_params) / per_unit, 256 if hidden >= 1024 else 64)
    return ModelShape(hidden, intermediate, layers, heads, kv_heads, near.vocab, near.tie_embeddings,
                      interpolated=f"{name or f'{n_params / 1e9:g}B'} is no known model: a Llama shape {how}")


def _label(shape: ModelShape) -> str:
    return next(k for k, v in SIZES.items() if v is shape)


def model_shape(model: str | Path | dict | Any) -> ModelShape:
    """A size name from SIZES, any other size (a number with M or B: `interpolate`), a ModelShape, or
    anything `ModelShape.from_config` reads."""
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, str) and model.upper() in SIZES:
        return SIZES[model.upper()]
    if isinstance(model, str) and not Path(model).exists():
        n_params = parse_size(model)
        if n_params is None:
            raise LorafitError(f"model size {model!r} is unknown: give a number of parameters with M or B "
                               f"(7B, 40B, 350M), a model folder or a .gguf file")
        return interpolate(n_params, model.upper())
    return ModelShape.from_config(model)


def lora_params(shape: ModelShape, rank: int, targets: tuple[str, ...] = ALL_LINEAR) -> int:
    """LoRA adds A (rank x in) and B (out x rank) to each targeted linear: rank*(in+out) per layer."""
    linears = shape.linears()
    return shape.layers * sum(rank * (linears[t][0] + linears[t][1]) for t in targets)

