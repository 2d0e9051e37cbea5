"""`TrainSetup`: what is trained and how, everything an estimate depends on, plus the byte constants.

Units: bytes everywhere, except names ending in `_gb`, which are GiB (2**30 bytes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorafit.errors import LorafitError
from lorafit.ops.loss_chunk import default_chunk_size
from lorafit.train.estimate.shapes import ALL_LINEAR, ModelShape, model_shape

GIB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
METHODS = ("full", "lora", "qlora", "ternary")
# Optimizer state per trainable parameter, bytes.
#   adamw:     exp_avg + exp_avg_sq in fp32 = 2 * 4
#   adamw8bit: both states in 8 bits (2 * 1) plus one fp32 scale per 256-value block for each
#   sgd:       plain SGD without momentum keeps nothing
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw8bit": 2 * (1 + 4 / 256), "sgd": 0.0}

# NF4 storage per quantized weight, bytes (what lorafit.quant.linear.NF4Linear keeps, as bitsandbytes):
#   codes:        4 bits                             -> 1/2 B per weight
#   plain:        one fp32 absmax per 64-weight block -> 4/64 B per weight          (0.5625 B in all)
#   double quant: absmax in 8 bits (1/64 B), plus one fp32 scale per 256 absmax blocks (0.5159 B)
# (plus one fp32 offset per layer, and the 256-entry code table shared by all: nothing per weight)
NF4_BYTES = 0.5 + 4 / 64
NF4_DOUBLE_QUANT_BYTES = 0.5 + 1 / 64 + 4 / (256 * 64)
# Ternary storage (what lorafit.quant.ternary.TernaryLinear keeps; lorafit.train.estimate.weights adds it up):
#   packed: (out, ceil(in / 4)) uint8, four 2-bit codes a byte        -> 1/4 B per weight (rows padded)
#   scale:  (out, in / group_size) fp32, one per row by default       -> 4 / group_size B per weight
TERNARY_CODES_PER_BYTE = 4
TERNARY_SCALE_BYTES = 4

DEVICES = ("cuda", "cpu")
# Defaults that depend on the device (TrainSetup fields left as None take these).
DEFAULT_DTYPE = {"cuda": "bf16", "cpu": "fp32"}  # lorafit loads fp32 weights on the CPU
# CUDA memory torch.cuda.max_memory_allocated() does not see: the CUDA context (driver state and the
# code of the kernels loaded) and blocks the caching allocator holds but has not handed out. An
# allowance, not a measurement: it depends on the driver, the GPU and the allocator's history. The
# GPU check (tests/train/test_estimate_gpu.py) prints both as measured on the GPU it runs on.
CUDA_OVERHEAD_GB = 1.0
# Resident size of `python -c "import torch, transformers, lorafit; <llama modeling imported>"`:
# 424 MiB measured with VmRSS on Linux x86-64 (torch 2.x CPU build). Pass the value measured on
# your machine as `overhead_gb` when it matters.
CPU_BASELINE_GB = 424 / 1024
# The CPU activation formula (`lorafit.train.estimate.cpu`) counts what a fused block saves; eager CPU
# fp32 blocks save more (likely sources, not measured one by one: HF's RMSNorm keeps its fp32
# intermediates, RoPE keeps rotate_half copies, GQA repeats k/v to all heads, and glibc malloc keeps
# freed blocks resident). Fitted once to the peak RSS (VmHWM) of SmolLM2-135M, LoRA r=16 on all
# linears, 2 AdamW steps of lorafit's Trainer (GatedMLP, chunked loss), seq 256, no gradient
# checkpointing, fp32 (LoRA) and NF4 (QLoRA) base, batch 1 and 2 (2026-11-23): the factor that makes
# each estimate exact was 1.74 / 1.67 (LoRA) and 2.04 / 1.99 (QLoRA); 1.85, from their middle, keeps
# all four within 7% of the measured peak (re-measured after the loss stopped feeding masked tokens to
# the head: +1.6 / +7.0 / -2.0 / -0.7%).
CPU_ACTIVATION_FACTOR = 1.85


@dataclass
class TrainSetup:
    """What is being trained and how; everything the estimate depends on."""

    model: Any = "7B"
    """Size name ('135M' .. '70B'), ModelShape, HF config, or config.json path."""
    method: str = "lora"
    """'full' (all weights train), 'lora' (adapters on a frozen 16-bit base), 'qlora' (frozen NF4 base),
    'ternary' (frozen packed ternary base: 2-bit codes + fp32 scales, lorafit.quant.ternary)."""
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
    """Keep only each block's input and recompute the block in backward (what a CUDA run should use)."""
    optimizer: str = "adamw"
    """'adamw' (two fp32 states), 'adamw8bit' (two 8-bit states), or 'sgd' (none)."""
    double_quant: bool = True
    """QLoRA: quantize the NF4 block scales too (~0.127 instead of 0.5 extra bits per weight)."""
    group_size: int | None = None
    """Ternary: input columns sharing one fp32 scale (TernaryLinear's group_size); None: one scale per
    row, what `load_model(quantize="ternary")` stores. Must divide every linear's in_features."""
    device: str = "cuda"
    """'cuda': the GPU memory of lorafit's trainer on CUDA (lorafit.train.estimate.cuda); 'cpu': the
    peak RSS of a CPU process running it (lorafit.train.estimate.cpu)."""
    loss_chunk: int | str | None = "auto"
    """Tokens per chunk of lorafit's chunked loss: "auto" is its default for the vocabulary (what the
    Trainer uses), an int a chosen chunk; None: a plain loss on the full (B*S, vocab) logits."""
    fused_mlp: bool = True
    """lorafit's GatedMLP (TrainConfig.fused_mlp): two, not four, (tokens x intermediate) tensors per block."""
    activation_factor: float | None = None
    """Calibration constant multiplying the activation term (fit it to one measured peak).
    None: 1.0 on cuda, CPU_ACTIVATION_FACTOR on cpu."""
    overhead_gb: float | None = None
    """Fixed overhead in GiB. cuda: CUDA context and the allocator's cached blocks (None: CUDA_OVERHEAD_GB).
    cpu: the process baseline before the model loads (None: CPU_BASELINE_GB)."""
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
        if self.group_size is not None:
            self._check_group_size()

    def _check_group_size(self) -> None:
        if self.method != "ternary":
            raise LorafitError(f"group_size={self.group_size} applies to method='ternary' only, not {self.method!r}")
        widths = sorted({i for i, _ in self.shape.linears().values()})
        if self.group_size < 1 or any(w % self.group_size for w in widths):
            raise LorafitError(
                f"group_size={self.group_size} must divide every linear's in_features ({', '.join(map(str, widths))})"
            )

    @property
    def tokens(self) -> int:
        """Tokens per micro-batch, B * S."""
        return self.batch * self.seq

    @property
    def adapted(self) -> int:
        """Adapted linear layers per block (0 for full fine-tuning)."""
        return 0 if self.method == "full" else len(self.targets)
