"""`estimate(setup)`: the peak memory of one training step as a sum of terms, on CUDA or on the CPU.

Terms (bytes; `MemoryEstimate` holds them and their sum, `total`):

    weights      base model: dtype bytes/param (full, LoRA), or the linear layers in NF4 (QLoRA) or as
                 packed ternary codes + fp32 scales (ternary) and the rest in dtype
                 (lorafit.train.estimate.weights; `MemoryEstimate.base` holds the three parts)
    master       fp32 copies of what is trained: LoRA adapters live in fp32 (this term is the
                 adapters themselves); full fine-tuning in a 16-bit dtype keeps an fp32 master copy
                 of every weight, and none when the weights already are fp32 (no duplicate)
    gradients    one per trainable param, in the dtype of that param (fp32 adapters; 16-bit weights)
    optimizer    AdamW: two fp32 states = 8 B per trainable param; 8-bit AdamW ~2 B
    activations  what backward needs at the peak: the CUDA model's saved tensors plus the working set
                 of the phase the peak falls in (lorafit.train.estimate.cuda), or the CPU formula
                 scaled by its fitted factor (lorafit.train.estimate.cpu)
    logits       (tokens x vocab) buffers of the loss: the chunked loss's one (chunk x vocab) buffer,
                 or the plain loss's full logits; on CUDA counted only when the loss phase is the peak
    workspace    CUDA: cuBLAS's workspace, and the largest linear dequantized (QLoRA, ternary: with the
                 ternary dequantizer's fp32 intermediates) when a block's backward is the peak; 0 on the CPU
    overhead     cuda: CUDA context and the caching allocator's cached blocks (an allowance);
                 cpu: the process baseline, python + torch + transformers + lorafit resident

On CUDA everything but `overhead` is what torch.cuda.max_memory_allocated() reports (`allocated`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorafit.train.estimate.cpu import activation_bytes, logits_bytes
from lorafit.train.estimate.cuda import cuda_peak
from lorafit.train.estimate.setup import DTYPE_BYTES, GIB, OPTIMIZER_BYTES, TrainSetup
from lorafit.train.estimate.shapes import ALL_LINEAR, lora_params
from lorafit.train.estimate.weights import BaseWeights, base_weights

TERMS = ("weights", "master", "gradients", "optimizer", "activations", "logits", "workspace", "overhead")


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
    workspace: float = 0.0
    peak_phase: str = ""
    """CUDA: where the peak falls, "backward" (of one block) or "loss"; "" on the CPU."""
    base: BaseWeights | None = None
    """`weights` in its parts: quantized codes, their scales, and what stays in the compute dtype."""

    @property
    def total(self) -> float:
        return sum(getattr(self, t) for t in TERMS)

    @property
    def allocated(self) -> float:
        """Everything but the overhead: on CUDA, what torch.cuda.max_memory_allocated() reports."""
        return self.total - self.overhead

    @property
    def total_gb(self) -> float:
        return self.total / GIB

    def fits(self, gpu_gb: float) -> bool:
        """Whether the estimate fits a device with `gpu_gb` GiB of memory."""
        return self.total <= gpu_gb * GIB

    def terms(self) -> dict[str, float]:
        """The terms by name, in bytes; they sum to `total`."""
        return {t: getattr(self, t) for t in TERMS}

    def breakdown(self) -> str:
        """Multi-line, human-readable breakdown in GiB."""
        lines = [f"{t:<12} {b / GIB:8.2f} GiB" for t, b in self.terms().items()]
        if self.base is not None and self.base.codes:
            b = self.base
            codes = "packed" if self.setup.method == "ternary" else "codes"
            lines[0] += (f"  ({codes} {b.codes / GIB:.2f} + scales {b.scales / GIB:.2f} + "
                         f"{self.setup.dtype} parts {b.dense / GIB:.2f})")
        lines.append(
            f"{'total':<12} {self.total_gb:8.2f} GiB  ({self.n_trainable:,} of {self.n_params:,} params train)"
        )
        if self.peak_phase:
            lines.append(f"peak during: {'the loss' if self.peak_phase == 'loss' else 'the backward of a block'}; "
                         f"torch.cuda.max_memory_allocated() ~ {self.allocated / GIB:.2f} GiB")
        return "\n".join(lines)


def estimate(setup: TrainSetup) -> MemoryEstimate:
    """The memory breakdown of `setup` (see the module docstring for what each term counts)."""
    s, dtype_b = setup.shape, DTYPE_BYTES[setup.dtype]
    n_params, base = s.n_params, base_weights(setup)
    if setup.method == "full":
        n_trainable = n_params
        master = n_params * 4 if dtype_b < 4 else 0  # fp32 master copy for mixed precision
        gradients = n_params * dtype_b  # same dtype as the weights they belong to
    else:  # lora, qlora, ternary: the same fp32 adapters on a frozen base
        n_trainable = lora_params(s, setup.rank, setup.targets)
        master = n_trainable * 4  # adapters are kept in fp32
        gradients = n_trainable * 4
    if setup.device == "cuda":
        peak = cuda_peak(setup)
        loss = peak.phase == "loss"
        step = {"activations": peak.activations, "logits": peak.logits if loss else 0.0,
                "workspace": peak.workspace + (0.0 if loss else peak.dequantized), "peak_phase": peak.phase}
    else:
        step = {"activations": activation_bytes(setup), "logits": logits_bytes(setup)}
    return MemoryEstimate(setup=setup, n_params=n_params, n_trainable=n_trainable, weights=base.total,
                          master=master, gradients=gradients, optimizer=n_trainable * OPTIMIZER_BYTES[setup.optimizer],
                          overhead=setup.overhead_gb * GIB, base=base, **step)


def peak_allocated(model: Any, batch: int, seq: int, rank: int, method: str = "qlora",
                   targets: tuple[str, ...] = ALL_LINEAR, **setup: Any) -> int:
    """Bytes torch.cuda.max_memory_allocated() should report over steps of lorafit's Trainer on CUDA.

    `model` is anything `TrainSetup.model` takes (an HF config, a config.json path, a size name);
    `setup` the other TrainSetup fields (dtype, grad_checkpointing, loss_chunk, ...). The CUDA context
    and the allocator's cached blocks are not included (they are not allocated tensors).
    """
    return round(estimate(TrainSetup(model=model, method=method, rank=rank, targets=targets, batch=batch,
                                     seq=seq, device="cuda", **setup)).allocated)
