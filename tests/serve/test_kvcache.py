"""AppendCache holds exactly what transformers' concatenating DynamicCache holds, across growths."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from lorafit.serve import kvcache
from lorafit.serve.kvcache import AppendCache


def test_appends_match_dynamic_cache_across_growth():
    g = torch.Generator().manual_seed(0)
    ours, theirs = AppendCache(), DynamicCache()
    for step, new in enumerate([5, 1, kvcache.GROW, 1, 2 * kvcache.GROW + 3, 1]):  # forces several regrowths
        for layer in range(2):
            k, v = torch.randn(3, 2, new, 4, generator=g), torch.randn(3, 2, new, 4, generator=g)
            got, want = ours.update(k, v, layer), theirs.update(k, v, layer)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (step, layer)
    assert ours.get_seq_length() == theirs.get_seq_length()


def test_from_kv_then_append():
    kv = [(torch.randn(2, 1, 7, 4), torch.randn(2, 1, 7, 4)) for _ in range(3)]
    cache = AppendCache.from_kv(kv)
    assert cache.get_seq_length() == 7
    k, v = torch.randn(2, 1, 1, 4), torch.randn(2, 1, 1, 4)
    keys, values = cache.update(k, v, 1)
    assert torch.equal(keys, torch.cat([kv[1][0], k], dim=2)) and torch.equal(values, torch.cat([kv[1][1], v], dim=2))
