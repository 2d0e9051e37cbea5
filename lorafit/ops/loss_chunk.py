"""How many tokens the chunked loss (`lorafit.ops.chunked_loss`) sends through the output head at once.

Plain arithmetic, no torch: the memory estimator (`lorafit.train.estimate`) sizes the loss's buffer
with it and must run where torch is not installed.

A chunk of C tokens needs one (C, V) fp32 logits block; C is chosen so that block is about
`CHUNK_BYTES` = 64 MiB (C = 341 for a 49152-token vocabulary). Each chunk streams the whole head W
through the cache twice, so chunks much smaller than this pay for memory traffic (CPU, V = 49152,
1024 tokens: C = 85 took 1.4x as long as C = 512); larger ones only add memory. One buffer serves
every chunk, so its pages are faulted in once.
"""

from __future__ import annotations

CHUNK_BYTES = 64 << 20


def default_chunk_size(vocab: int) -> int:
    """Tokens per chunk for a `vocab`-wide head: CHUNK_BYTES of fp32 logits, at least 16."""
    return max(16, CHUNK_BYTES // (4 * vocab))
