"""Merging running batches: rows of one adapter end up together, and each row keeps its own KV."""

from __future__ import annotations

import torch

from lorafit.ops.multi_lora import plan_rows
from lorafit.serve.batch import Batch, adapter_order, merge_batches
from lorafit.serve.kvcache import AppendCache
from lorafit.serve.requests import Request, SamplingParams


def batch(adapters: list[str | None], length: int, tag: float) -> Batch:
    """Rows on `adapters`; row i's KV, mask width, position and last token all carry tag + i."""
    rows = [Request([1], None, SamplingParams(), print, internal=a) for a in adapters]
    n = len(rows)
    marks = tag + torch.arange(n, dtype=torch.float32)
    keys = marks.view(n, 1, 1, 1).expand(n, 2, length, 4).clone()  # (B, heads, L, head_dim)
    cache = AppendCache.from_kv([(keys, -keys), (2 * keys, -2 * keys)])
    mask = torch.ones(n, length, dtype=torch.long)
    return Batch(rows, cache, mask, marks.long(), marks.long())


def test_adapter_order_is_stable_and_by_first_appearance():
    rows = [Request([1], None, SamplingParams(), print, internal=a) for a in ["b", "a", "b", None, "a", "b"]]
    assert adapter_order(rows) == [0, 2, 5, 1, 4, 3]


def test_a_merged_batch_is_grouped_by_adapter_and_rows_keep_their_kv():
    a = batch(["x", "y", "z"], length=5, tag=0)  # the running batch: one row per adapter
    b = batch(["x", "y", "z"], length=3, tag=10)  # newcomers on the same adapters, shorter KV
    merged = merge_batches(a, b)
    assert [r.internal for r in merged.rows] == ["x", "x", "y", "y", "z", "z"]
    tags = [0, 10, 1, 11, 2, 12]  # each row's own tag, wherever it went
    assert merged.last.tolist() == tags and merged.positions.tolist() == tags
    for layer, scale in zip(merged.cache.layers, (1, 2)):
        assert layer.keys.shape == (6, 2, 5, 4)
        assert layer.keys[:, 0, -1, 0].tolist() == [scale * t for t in tags]
        assert layer.values[:, 0, -1, 0].tolist() == [-scale * t for t in tags]
    # the shorter batch was left-padded: its rows' first two columns are masked out and zero
    assert merged.mask[:, :2].tolist() == [[1, 1], [0, 0]] * 3
    assert merged.cache.layers[0].keys[1, :, :2].abs().sum() == 0
    # and per-row routing needs no gather for it
    index = {"x": 0, "y": 1, "z": 2}
    assert plan_rows([index[r.internal] for r in merged.rows], n=3, zero_slot=False).identity


def test_merging_batches_already_in_order_keeps_them():
    merged = merge_batches(batch(["x", "x"], 4, 0), batch(["y"], 4, 5))
    assert [r.internal for r in merged.rows] == ["x", "x", "y"] and merged.last.tolist() == [0, 1, 5]
