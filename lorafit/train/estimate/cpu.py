"""The CPU model: peak resident memory (RSS) of a CPU process running lorafit's trainer in fp32.

An activation formula of what a fused block saves, scaled by `CPU_ACTIVATION_FACTOR` (fitted to
measured peaks, see lorafit.train.estimate.setup), the loss's logits buffers, and the process baseline
(python + torch + transformers + lorafit resident before the model loads) as the overhead. Checked
against measured peaks by tests/train/test_estimate_measured.py.
"""

from __future__ import annotations

from lorafit.train.estimate.setup import DTYPE_BYTES, TrainSetup


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


def logits_bytes(setup: TrainSetup) -> int:
    """fp32 (tokens x vocab) buffers alive at the loss: the full logits and their gradient with the
    plain loss; with the chunked loss one chunk's buffer (logits, then softmax, then gradient, in place)."""
    tokens = setup.batch * setup.seq
    if setup.loss_chunk is None:
        return 2 * tokens * setup.shape.vocab * 4
    return min(tokens, setup.loss_chunk) * setup.shape.vocab * 4
