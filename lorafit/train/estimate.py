"""How much memory a fine-tune needs: full fine-tuning vs LoRA vs QLoRA, on a GPU or on the CPU.

Pure arithmetic over a Llama-style decoder shape, so it runs anywhere (no torch) and answers
"does a 7B LoRA at rank 16 fit my 16 GB card?" before anything is downloaded.

`device="cuda"` (the default) describes accelerator memory of a 16-bit run; `device="cpu"` describes
the peak resident memory (RSS) of a CPU process running lorafit's trainer in fp32: the weights
default to fp32, the overhead is the resident size of the Python process with torch + transformers
+ lorafit imported, and the activation term uses `CPU_ACTIVATION_FACTOR`, fitted to measured peaks
(tests/train/test_estimate_measured.py).

Units: bytes everywhere, except names ending in `_gb`, which are GiB (2**30 bytes).

The total is a sum of independent terms (see `MemoryEstimate`):

    weights      base model: dtype bytes/param (full, LoRA) or NF4 for the linear layers (QLoRA)
    master       fp32 copies of what is trained: LoRA adapters live in fp32 (this term is the
                 adapters themselves); full fine-tuning in a 16-bit dtype keeps an fp32 master copy
                 of every weight, and none when the weights already are fp32 (no duplicate)
    gradients    one per trainable param, in the dtype of that param (fp32 adapters; 16-bit weights)
    optimizer    AdamW: two fp32 states = 8 B per trainable param; 8-bit AdamW ~2 B
    activations  saved for backward; formula in `activation_bytes` (scaled by `activation_factor`,
                 the one constant to calibrate against a measured peak)
    logits       with the plain loss (`loss_chunk=None`) two (B*S x vocab) fp32 buffers, the full
                 logits and their gradient; with lorafit's chunked loss (lorafit.ops.chunked_loss,
                 `loss_chunk="auto"` as the Trainer uses it) one (min(B*S, chunk) x vocab) fp32 buffer,
                 reused for every chunk and turned into the gradient in place
    overhead     cuda: a constant for the CUDA context, allocator slack and kernels' workspaces
                 (1 GiB); cpu: the process baseline, python + torch + transformers + lorafit
                 resident before the model loads (measure it, or take `CPU_BASELINE_GB`)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafit.errors import LorafitError
from lorafit.ops.chunked_loss import default_chunk_size

GIB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
METHODS = ("full", "lora", "qlora")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ALL_LINEAR = ATTENTION + MLP

# Optimizer state per trainable parameter, bytes.
#   adamw:     exp_avg + exp_avg_sq in fp32 = 2 * 4
#   adamw8bit: both states in 8 bits (2 * 1) plus one fp32 scale per 256-value block for each
#   sgd:       plain SGD without momentum keeps nothing
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw8bit": 2 * (1 + 4 / 256), "sgd": 0.0}

# NF4 storage per quantized weight, bytes: 4-bit codes + one absmax per 64-weight block.
#   plain:        absmax in fp32                     -> 4/64 B per weight
#   double quant: absmax in 8 bits (1/64 B), plus one fp32 scale per 256 absmax blocks
NF4_BYTES = 0.5 + 4 / 64
NF4_DOUBLE_QUANT_BYTES = 0.5 + 1 / 64 + 4 / (256 * 64)

DEVICES = ("cuda", "cpu")
# Defaults that depend on the device (TrainSetup fields left as None take these).
DEFAULT_DTYPE = {"cuda": "bf16", "cpu": "fp32"}  # lorafit loads fp32 weights on the CPU
CUDA_OVERHEAD_GB = 1.0
# Resident size of `python -c "import torch, transformers, lorafit; <llama modeling imported>"`:
# 424 MiB measured with VmRSS on Linux x86-64 (torch 2.x CPU build). Pass the value measured on
# your machine as `overhead_gb` when it matters.
CPU_BASELINE_GB = 424 / 1024
# The activation formula counts what a fused GPU block saves; eager CPU fp32 blocks save more (likely
# sources, not measured one by one: HF's RMSNorm keeps its fp32 intermediates, RoPE keeps rotate_half
# copies, GQA repeats k/v to all heads, and glibc malloc keeps freed blocks resident). Fitted once
# to the peak RSS (VmHWM) of SmolLM2-135M, LoRA r=16 on all linears, 2 AdamW steps of lorafit's
# Trainer (GatedMLP, chunked loss), seq 256, no gradient checkpointing, fp32 (LoRA) and NF4 (QLoRA)
# base, batch 1 and 2 (2026-11-23): the factor that makes each estimate exact was 1.74 / 1.67 (LoRA)
# and 2.04 / 1.99 (QLoRA); 1.85, from their middle, keeps all four within 7% of the measured peak
# (re-measured after the loss stopped feeding masked tokens to the head: +1.6 / +7.0 / -2.0 / -0.7%).
CPU_ACTIVATION_FACTOR = 1.85


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
        """All parameters: linears, two RMSNorms per block + the final one, embedding (+ LM head)."""
        norms = (2 * self.layers + 1) * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tie_embeddings else 2)
        return self.n_linear_params + norms + embeddings

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """Exact shape from an HF `PretrainedConfig`, a config dict, or a config.json path (file or dir)."""
        where = "config"
        if isinstance(config, str | Path):
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

        heads = need("num_attention_heads")
        return cls(
            hidden=need("hidden_size"),
            intermediate=need("intermediate_size"),
            layers=need("num_hidden_layers"),
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            vocab=need("vocab_size"),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            head_dim=config.get("head_dim") or 0,
        )


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
    "70B": ModelShape(8192, 28672, 80, 64, 8, 128256),  # Llama-3.1-70B
}


def model_shape(model: str | Path | dict | Any) -> ModelShape:
    """A size name from SIZES, a ModelShape, or anything `ModelShape.from_config` reads."""
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, str) and model.upper() in SIZES:
        return SIZES[model.upper()]
    if isinstance(model, str) and not Path(model).exists():
        raise LorafitError(
            f"model size {model!r} is unknown: use one of {', '.join(SIZES)} or a config.json path"
        )
    return ModelShape.from_config(model)


def lora_params(shape: ModelShape, rank: int, targets: tuple[str, ...] = ALL_LINEAR) -> int:
    """LoRA adds A (rank x in) and B (out x rank) to each targeted linear: rank*(in+out) per layer."""
    linears = shape.linears()
    return shape.layers * sum(rank * (linears[t][0] + linears[t][1]) for t in targets)


@dataclass
class TrainSetup:
    """What is being trained and how; everything the estimate depends on."""

    model: Any = "7B"
    """Size name ('135M' .. '70B'), ModelShape, HF config, or config.json path."""
    method: str = "lora"
    """'full' (all weights train), 'lora' (adapters on a frozen 16-bit base), 'qlora' (frozen NF4 base)."""
    rank: int = 16
    """LoRA rank r (ignored for 'full')."""
    targets: tuple[str, ...] = ALL_LINEAR
    """Linear layers that get adapters; default: all of attention and MLP."""
    batch: int = 1
    """Sequences per step (micro-batch; gradient accumulation does not add memory)."""
    seq: int = 512
    """Tokens per sequence."""
    dtype: str | None = None
    """Dtype of the (unquantized) weights and of the activations: 'bf16', 'fp16' or 'fp32'.
    None: 'bf16' on cuda, 'fp32' on cpu."""
    grad_checkpointing: bool = True
    """Keep only each block's input and recompute the block in backward."""
    optimizer: str = "adamw"
    """'adamw' (two fp32 states), 'adamw8bit' (two 8-bit states), or 'sgd' (none)."""
    double_quant: bool = True
    """QLoRA: quantize the NF4 block scales too (~0.127 instead of 0.5 extra bits per weight)."""
    device: str = "cuda"
    """'cuda': accelerator memory of the run; 'cpu': peak RSS of a CPU process (see the module doc)."""
    loss_chunk: int | str | None = None
    """None: the plain loss materializes the full (B*S, vocab) logits; an int: lorafit's chunked loss
    with that many tokens per chunk; "auto": its default chunk for the vocabulary (what the Trainer uses)."""
    fused_mlp: bool = True
    """lorafit's GatedMLP (TrainConfig.fused_mlp): two, not four, (tokens x intermediate) tensors per block."""
    activation_factor: float | None = None
    """Calibration constant multiplying the activation term (fit it to one measured peak).
    None: 1.0 on cuda, CPU_ACTIVATION_FACTOR on cpu."""
    overhead_gb: float | None = None
    """Fixed overhead in GiB. cuda: CUDA context, allocator slack, workspaces (None: 1.0). cpu: the
    process baseline before the model loads (None: CPU_BASELINE_GB)."""
    shape: ModelShape = field(init=False)

    def __post_init__(self) -> None:
        self.shape = model_shape(self.model)
        if self.device not in DEVICES:
            raise LorafitError(f"device={self.device!r} is unknown: use one of {', '.join(DEVICES)}")
        cpu = self.device == "cpu"
        if self.dtype is None:
            self.dtype = DEFAULT_DTYPE[self.device]
        if self.activation_factor is None:
            self.activation_factor = CPU_ACTIVATION_FACTOR if cpu else 1.0
        if self.overhead_gb is None:
            self.overhead_gb = CPU_BASELINE_GB if cpu else CUDA_OVERHEAD_GB
        if self.loss_chunk == "auto":
            self.loss_chunk = default_chunk_size(self.shape.vocab)
        if self.loss_chunk is not None and (not isinstance(self.loss_chunk, int) or self.loss_chunk < 1):
            raise LorafitError(f"loss_chunk={self.loss_chunk!r} must be at least 1 ('auto', or None for full logits)")
        self.targets = tuple(self.targets)
        choices = {"method": METHODS, "dtype": tuple(DTYPE_BYTES), "optimizer": tuple(OPTIMIZER_BYTES)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise LorafitError(
                    f"{name}={getattr(self, name)!r} is unknown: use one of {', '.join(allowed)}"
                )
        unknown = [t for t in self.targets if t not in ALL_LINEAR]
        if unknown or (self.method != "full" and not self.targets):
            raise LorafitError(
                f"targets {unknown or '()'} are not Llama linears: use some of {', '.join(ALL_LINEAR)}"
            )
        for name in ("rank", "batch", "seq"):
            if getattr(self, name) < 1:
                raise LorafitError(f"{name}={getattr(self, name)} must be at least 1")


def activation_bytes(setup: TrainSetup) -> float:
    """Bytes of activations saved for backward across the decoder blocks (logits not included).

    Per token, one Llama block saves (elements, with q = heads*head_dim, kv = kv_heads*head_dim,
    h = hidden, i = intermediate, assuming fused/flash attention that never stores the S x S scores):

        4h       inputs and outputs of its two RMSNorms (the outputs feed the projections)
        2q+2kv   q, k, v after RoPE and the attention output (input of o_proj)
        4i       gate, up, silu(gate) and silu(gate)*up (the input of down_proj); 2i (gate and up)
                 with lorafit's GatedMLP (`fused_mlp`, the Trainer's default), which recomputes the others
        r*n      LoRA only: the rank-r intermediate x@A of each of the n adapted linears

    Without checkpointing all L blocks keep that; with checkpointing each block keeps only its
    input (h) and one block at a time is recomputed in backward:

        no checkpointing:  B*S * (L * per_block + 2h) * bytes
        checkpointing:     B*S * (L * h + per_block + 2h) * bytes

    where 2h is the final norm's input and output, and bytes is the activation dtype's width.
    Not counted (the calibration constant absorbs them when fitted on a setup that has them):
    eager attention (~2*heads*S more per token per block, for scores and probabilities) and LoRA
    dropout > 0 (a dropped copy of each adapted linear's input).
    """
    s = setup.shape
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    per_block = 4 * s.hidden + 2 * q + 2 * kv + (2 if setup.fused_mlp else 4) * s.intermediate
    if setup.method != "full":
        per_block += setup.rank * len(setup.targets)
    kept = s.layers * s.hidden + per_block if setup.grad_checkpointing else s.layers * per_block
    tokens = setup.batch * setup.seq
    return setup.activation_factor * tokens * (kept + 2 * s.hidden) * DTYPE_BYTES[setup.dtype]


@dataclass
class MemoryEstimate:
    """Peak memory of one training step, term by term, in bytes."""

    setup: TrainSetup
    n_params: int
    n_trainable: int
    weights: float
    master: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    overhead: float

    @property
    def total(self) -> float:
        return (
            self.weights
            + self.master
            + self.gradients
            + self.optimizer
            + self.activations
            + self.logits
            + self.overhead
        )

    @property
    def total_gb(self) -> float:
        return self.total / GIB

    def fits(self, gpu_gb: float) -> bool:
        """Whether the estimate fits a device with `gpu_gb` GiB of memory."""
        return self.total <= gpu_gb * GIB

    def breakdown(self) -> str:
        """Multi-line, human-readable breakdown in GiB."""
        terms = ("weights", "master", "gradients", "optimizer", "activations", "logits", "overhead")
        lines = [f"{t:<12} {getattr(self, t) / GIB:8.2f} GiB" for t in terms]
        lines.append(
            f"{'total':<12} {self.total_gb:8.2f} GiB  ({self.n_trainable:,} of {self.n_params:,} params train)"
        )
        return "\n".join(lines)


def logits_bytes(setup: TrainSetup) -> int:
    """fp32 (tokens x vocab) buffers alive at the loss: the full logits and their gradient with the
    plain loss; with the chunked loss one chunk's buffer (logits, then softmax, then gradient, in place)."""
    tokens = setup.batch * setup.seq
    if setup.loss_chunk is None:
        return 2 * tokens * setup.shape.vocab * 4
    return min(tokens, setup.loss_chunk) * setup.shape.vocab * 4


def estimate(setup: TrainSetup) -> MemoryEstimate:
    """The memory breakdown of `setup` (see the module docstring for what each term counts)."""
    s, dtype_b = setup.shape, DTYPE_BYTES[setup.dtype]
    n_params = s.n_params
    if setup.method == "full":
        n_trainable = n_params
        weights = n_params * dtype_b
        master = n_params * 4 if dtype_b < 4 else 0  # fp32 master copy for mixed precision
        gradients = n_params * dtype_b  # same dtype as the weights they belong to
    else:
        n_trainable = lora_params(s, setup.rank, setup.targets)
        if setup.method == "qlora":  # linears in NF4; embeddings, LM head and norms stay in dtype
            nf4 = NF4_DOUBLE_QUANT_BYTES if setup.double_quant else NF4_BYTES
            weights = s.n_linear_params * nf4 + (n_params - s.n_linear_params) * dtype_b
        else:
            weights = n_params * dtype_b
        master = n_trainable * 4  # adapters are kept in fp32
        gradients = n_trainable * 4
    return MemoryEstimate(
        setup=setup,
        n_params=n_params,
        n_trainable=n_trainable,
        weights=weights,
        master=master,
        gradients=gradients,
        optimizer=n_trainable * OPTIMIZER_BYTES[setup.optimizer],
        activations=activation_bytes(setup),
        logits=logits_bytes(setup),
        overhead=setup.overhead_gb * GIB,
    )


TABLE_SIZES = ("1B", "3B", "7B", "8B", "13B", "34B", "70B")
TABLE_RANKS = (8, 16, 32, 64)


def format_table(
    method: str = "lora",
    batch: int = 1,
    seq: int = 512,
    sizes: tuple[str, ...] = TABLE_SIZES,
    ranks: tuple[int, ...] = TABLE_RANKS,
    gpu_gb: float = 16,
    **setup: Any,
) -> str:
    """A plain-text table of estimates over model sizes x LoRA ranks (one row per size for 'full').

    Extra keyword arguments go to `TrainSetup` (dtype, grad_checkpointing, optimizer, ...).
    Columns: size, rank, params (billions), trainable params (exact), weights, grads+optimizer
    (incl. fp32 master copies), activations+logits, total (all GiB), and whether it fits `gpu_gb`.
    """
    first = TrainSetup(model=sizes[0], method=method, batch=batch, seq=seq, **setup)
    title = (
        f"{method} | batch {batch} x seq {seq} | {first.dtype} | "
        f"grad checkpointing {'on' if first.grad_checkpointing else 'off'} | {first.optimizer} | GiB"
    )
    fits_col = f"fits {gpu_gb:g} GB?"
    header = (
        "model",
        "rank",
        "params",
        "trainable",
        "weights",
        "grads+optim",
        "activations",
        "total",
        fits_col,
    )
    rows = []
    for size in sizes:
        for rank in ranks if method != "full" else (None,):
            e = estimate(TrainSetup(model=size, method=method, rank=rank or 1, batch=batch, seq=seq, **setup))
            rows.append(
                (
                    size,
                    "-" if rank is None else str(rank),
                    f"{e.n_params / 1e9:.2f}B",
                    f"{e.n_trainable:,}",
                    f"{e.weights / GIB:.2f}",
                    f"{(e.master + e.gradients + e.optimizer) / GIB:.2f}",
                    f"{(e.activations + e.logits) / GIB:.2f}",
                    f"{e.total_gb:.2f}",
                    "yes" if e.fits(gpu_gb) else "no",
                )
            )
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if c < 2 else f"{{:>{w}}}" for c, w in enumerate(widths))
    lines = [title, fmt.format(*header), "  ".join("-" * w for w in widths)]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(lines)
