"""The CUDA model: what lorafit's trainer holds in GPU memory at the peak of a training step.

What is modelled is the Trainer's CUDA run: compute in `setup.dtype` (bf16; d bytes per element), the
base's linear layers frozen in that dtype (LoRA), in NF4 (QLoRA) or packed ternary, fp32 LoRA master weights, their
fp32 gradients and fp32 AdamW states (the persistent terms, lorafit.train.estimate.memory), every
adapted linear run by the fused LoRA Function with its 16-bit low-rank path, SiLU-gated MLPs as
GatedMLP with the Triton SwiGLU, per-layer gradient checkpointing (`grad_checkpointing`, what a CUDA
run should use), SDPA flash attention (rows without padding tokens, so no mask and no S x S matrix),
and the chunked loss on the last hidden states. Every constant below is derived from first principles,
from what that code keeps alive, not fitted; the measured check is the GPU test
tests/train/test_estimate_gpu.py (`pytest -m gpu`), which compares `peak_allocated` with
torch.cuda.max_memory_allocated() over real Trainer steps.

Per token, with h = hidden, q = heads * head_dim, kv = kv_heads * head_dim, i = intermediate, n adapted
linears per block of rank r, and every token assumed a target (the upper bound):

  one block keeps for backward (`block_saved`)
      8h + 8        HF's LlamaRMSNorm: each of the two norms saves the fp32 copy of its input and 1/rms
      2h d          the two norms' outputs, the inputs of q/k/v and of gate/up: one tensor each, saved
                    once by the fused LoRA Functions that share it
      (q + 2kv) d   q and k after RoPE, and v: what flash attention saves (k and v not repeated: GQA)
      q d           the attention output, saved by flash attention and as o_proj's input (one tensor)
      4 heads       flash attention's fp32 log-sum-exp
      2i d          gate and up outputs; the SwiGLU product is recomputed (4i d for a plain MLP: also
                    silu(gate) and the product)
      n r d         each fused LoRA Function's thin v = s x A^T (16-bit on CUDA)
  the backward of one block needs besides, at its widest moment, the MLP's (`block_working`)
      h d           the recomputed block's output (checkpointing only)
      h d           the gradient coming into the block (the residual branch passes it on as it is)
      3i d          down_proj's recomputed input, the gradient from its LoRA path and its d(input); then
                    SwiGLU's incoming gradient and the two it returns
      + QLoRA: one (out x in) weight dequantized in d (the largest linear), not per token
      + ternary: the same weight at the widest moment of TernaryLinear.dequantize, which is PyTorch code:
                    the int8 values (1) and the output in d, scaled in place: 1 + d bytes per weight
                    (the table lookup before holds its int32 index and result, 2 bytes per weight)
                    (the attention's backward, later, holds less: the MLP's 2i d are freed by then)
  kept across the whole step (`step_saved`)
      L h d         with checkpointing, each block's input; without, L * block_saved
      2 head_dim d  RoPE's cos and sin for the batch, shared by all blocks
      32            the batch itself: input_ids, labels, attention_mask, position_ids in int64
  the loss (`loss_working`), when it runs no block is being recomputed
      4h + 4        the final norm's fp32 input copy and 1/rms
      h d           its output, the last hidden states
      2h d          the target tokens' hidden states (gathered) and their gradient, formed in forward
      + (`loss_logits`) one (C x vocab) fp32 chunk buffer and one (C x vocab) d-wide product alive
        with it, C = setup.loss_chunk; not per token. (A plain loss on full logits instead keeps three
        (tokens x vocab) fp32 buffers at its peak: the log-probabilities and two gradients.)

The peak is then weights + master + gradients + optimizer + workspace + step_saved + the larger of the
two phases: a block's backward (block_saved + block_working + dequantized weight) or the loss
(loss_working + loss_logits). The gradients are counted whole although only the current block's exist
early in backward (an overestimate of at most 4 bytes per trainable parameter). `workspace` is cuBLAS's:
PyTorch gives each (handle, stream) pair CUBLAS_WORKSPACE_CONFIG's default, 32 MiB on Hopper (compute
capability 9.x; 4096 KiB x 2 + 16 KiB x 8 = 8.125 MiB on older GPUs), and keeps one handle per thread:
forward runs in the caller's thread and backward in autograd's device thread, so two workspaces. They
come from the caching allocator, so max_memory_allocated counts them. The CUDA context and the
allocator's cached blocks are not counted there: they are the setup's `overhead_gb`.

Not modelled: padded batches (transformers then passes a mask, SDPA leaves flash attention and k, v are
repeated to all heads: about 2(q - kv) d more per token per block, plus the (B, 1, S, S) mask), LoRA
dropout > 0 (a boolean mask of each adapted input), eager attention, and triton missing (the PyTorch
SwiGLU backward holds two more (tokens x i) tensors).
"""

from __future__ import annotations

from dataclasses import dataclass

from lorafit.train.estimate.setup import DTYPE_BYTES, TrainSetup

FP32 = 4
CUBLAS_WORKSPACE_BYTES = 2 * (32 << 20)  # two threads' workspaces at Hopper's default (module docstring)
BATCH_BYTES_PER_TOKEN = 4 * 8  # input_ids, labels, attention_mask, position_ids: int64


def _dims(setup: TrainSetup) -> tuple[int, int, int, int, int]:
    s = setup.shape
    return s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim, s.intermediate, DTYPE_BYTES[setup.dtype]


def block_saved(setup: TrainSetup) -> float:
    """Bytes per token one block keeps for its backward (see the module docstring)."""
    h, q, kv, i, d = _dims(setup)
    norms = 2 * (h * FP32 + FP32) + 2 * h * d
    attention = (q + 2 * kv) * d + q * d + FP32 * setup.shape.heads
    mlp = (2 if setup.fused_mlp else 4) * i * d
    lora = setup.adapted * setup.rank * d
    return norms + attention + mlp + lora


def block_working(setup: TrainSetup) -> float:
    """Bytes per token the backward of one block needs besides what the block saved."""
    h, _, _, i, d = _dims(setup)
    recomputed_output = h * d if setup.grad_checkpointing else 0
    return recomputed_output + h * d + 3 * i * d


def step_saved(setup: TrainSetup) -> float:
    """Bytes per token kept across the whole step: checkpointed block inputs (or every block's saved
    tensors without checkpointing), RoPE's cos and sin, the batch."""
    s, d = setup.shape, DTYPE_BYTES[setup.dtype]
    blocks = s.layers * (s.hidden * d if setup.grad_checkpointing else block_saved(setup))
    return blocks + 2 * s.head_dim * d + BATCH_BYTES_PER_TOKEN


def loss_working(setup: TrainSetup) -> float:
    """Bytes per token alive while the loss runs, its (chunk x vocab) buffers aside."""
    h, d = setup.shape.hidden, DTYPE_BYTES[setup.dtype]
    return h * FP32 + FP32 + h * d + 2 * h * d


def loss_logits(setup: TrainSetup) -> float:
    """Bytes of (tokens x vocab) buffers alive at the loss's peak (not per token)."""
    v, d = setup.shape.vocab, DTYPE_BYTES[setup.dtype]
    if setup.loss_chunk is None:
        return 3 * setup.tokens * v * FP32
    return min(setup.tokens, setup.loss_chunk) * v * (FP32 + d)


def dequantized_weight(setup: TrainSetup) -> float:
    """Quantized bases: the bytes that dequantizing the largest linear for one matmul holds at its widest.

    QLoRA: the weight in the compute dtype (the NF4 kernel writes it directly), d bytes per weight.
    Ternary: max(2, 1 + d) bytes per weight (see the module docstring).
    """
    d = DTYPE_BYTES[setup.dtype]
    per_weight = {"qlora": d, "ternary": max(2, 1 + d)}.get(setup.method, 0)
    return max(a * b for a, b in setup.shape.linears().values()) * per_weight


@dataclass(frozen=True)
class CudaPeak:
    """The step-dependent part of the CUDA peak, in bytes, already scaled by `activation_factor`."""

    saved: float
    """Kept across the step (step_saved x tokens)."""
    block: float
    """A block's backward: (block_saved + block_working) x tokens with checkpointing (the block is
    recomputed); block_working x tokens without (its saved tensors are part of `saved`)."""
    dequantized: float
    """QLoRA's dequantized weight during that backward."""
    loss: float
    """The loss phase's tensors (loss_working x tokens)."""
    logits: float
    """The loss phase's (tokens x vocab) buffers."""
    workspace: float = CUBLAS_WORKSPACE_BYTES
    """cuBLAS's workspace."""

    @property
    def phase(self) -> str:
        """Where the peak falls: "backward" (of one block) or "loss"."""
        return "loss" if self.loss + self.logits > self.block + self.dequantized else "backward"

    @property
    def activations(self) -> float:
        """Token-proportional bytes at the peak."""
        return self.saved + (self.loss if self.phase == "loss" else self.block)


def cuda_peak(setup: TrainSetup) -> CudaPeak:
    """The CUDA step's terms besides the weights, master weights, gradients and optimizer states."""
    n, f = setup.tokens, setup.activation_factor
    recomputed = block_saved(setup) if setup.grad_checkpointing else 0.0
    return CudaPeak(saved=f * n * step_saved(setup), block=f * n * (recomputed + block_working(setup)),
                    dequantized=dequantized_weight(setup), loss=f * n * loss_working(setup),
                    logits=loss_logits(setup))
