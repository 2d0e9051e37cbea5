"""The running batch: its rows, their cache and attention mask, and how batches merge and shrink.

Rows are left-padded and right-aligned: every row's real tokens end at the last KV column. Merging
two batches is then a left pad of the shorter one's KV and mask, and dropping finished rows can
trim the KV columns that have become padding in every remaining row. Per-row position ids keep
each row's rotary positions independent of the padding (a shared-prefix prefill also leaves
masked padding between a row's prefix and the rest of its prompt).

Recurrent layers (kvcache.py) keep one state per row, which merges and shrinks with the rows and needs
no padding. Left padding does not reach such a state: transformers zeroes the inputs at masked positions
of these layers, so a state that starts at zero stays zero through the padding in front of a row.

Every tensor is made on the device of the tensors it comes from (or the one passed in); only
small index lists are built in Python first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafit.serve.kvcache import AppendCache, left_pad
from lorafit.serve.requests import Request


@dataclass
class Batch:
    """Running rows and their KV cache: mask (B, L) with each row's real tokens right-aligned."""

    rows: list[Request]
    cache: AppendCache
    mask: torch.Tensor  # (B, L) long
    positions: torch.Tensor  # (B,) the position id of each row's next token
    last: torch.Tensor  # (B,) each row's last sampled token, the next step's input


def kv(cache: AppendCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per attention layer (keys, values), each (B, heads, L, head_dim)."""
    return cache.kv()


def left_padded(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), each (len(seqs), longest) on `device`, every sequence right-aligned."""
    length = max(len(s) for s in seqs)
    ids = [[pad_id] * (length - len(s)) + list(s) for s in seqs]
    mask = [[0] * (length - len(s)) + [1] * len(s) for s in seqs]
    return (torch.tensor(ids, dtype=torch.long, device=device),
            torch.tensor(mask, dtype=torch.long, device=device))


def adapter_order(rows: list[Request]) -> list[int]:
    """Row indices with the rows of each adapter together, adapters in order of first appearance
    (stable within one adapter). Per-row routing needs no gather for rows laid out this way
    (lorafit.ops.multi_lora: the identity plan), so merged batches keep that layout."""
    first: dict[str | None, int] = {}
    for i, r in enumerate(rows):
        first.setdefault(r.internal, i)
    return sorted(range(len(rows)), key=lambda i: first[rows[i].internal])


def merge_batches(a: Batch, b: Batch) -> Batch:
    """One batch from two: the shorter is left-padded (masked out) to the longer's KV length, and the
    rows are put in `adapter_order` (one gather of every tensor, only when the order changes)."""
    length = max(a.mask.shape[1], b.mask.shape[1])
    rows = a.rows + b.rows
    order = adapter_order(rows)
    index = None if order == list(range(len(rows))) else torch.tensor(order, device=a.mask.device)

    def cat(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = torch.cat([x, y])
        return out if index is None else out.index_select(0, index)

    return Batch([rows[i] for i in order], a.cache.join(b.cache, length, index),
                 cat(left_pad(a.mask, length, 1), left_pad(b.mask, length, 1)),
                 cat(a.positions, b.positions), cat(a.last, b.last))


def select_rows(batch: Batch, keep: list[int]) -> Batch | None:
    """The batch without finished rows, its KV trimmed of columns that are padding in every row."""
    if not keep:
        return None
    index = torch.tensor(keep, device=batch.mask.device)
    mask = batch.mask.index_select(0, index)
    start = int((mask.sum(0) > 0).nonzero()[0])  # rows are right-aligned: padding is a prefix
    return Batch([batch.rows[i] for i in keep], batch.cache.select(index, start), mask[:, start:],
                 batch.positions.index_select(0, index), batch.last.index_select(0, index))
