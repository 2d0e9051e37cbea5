"""Distances between next-token distributions (lorafit.verify.compare)."""

from __future__ import annotations

import math

import pytest
import torch

from lorafit.fingerprint import top_k
from lorafit.verify.compare import EXACT, LOSSY, distance_full, distance_top


def _logprobs(seed: int, n: int = 3, vocab: int = 50, scale: float = 3.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.log_softmax(torch.randn(n, vocab, generator=g) * scale, -1)]


def test_a_path_equal_to_the_reference_is_at_distance_zero():
    lp = _logprobs(0)
    d = distance_full(top_k(lp, 5), lp)
    assert d.max_dlogp == 0 and d.mean_kl == pytest.approx(0, abs=1e-12) and d.agreement == 1 and d.n == 3
    assert d.within(EXACT)
    top = distance_top(top_k(lp, 5), top_k(lp, 10))  # a server's answer: its own top-k
    assert top.max_dlogp == 0 and top.agreement == 1


def test_kl_over_the_top_k_and_the_rest_is_the_coarsened_kl():
    p = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]), -1)
    q = torch.log_softmax(torch.tensor([[2.0, 3.0, 1.0, 0.5, -1.0]]), -1)
    d = distance_full(top_k([p], 2), [q])
    pk, qk = p[0, :2].exp(), q[0, :2].exp()
    want = float((pk * (pk.log() - qk.log())).sum() + (1 - pk.sum()) * math.log((1 - pk.sum()) / (1 - qk.sum())))
    assert d.mean_kl == pytest.approx(want, rel=1e-6)
    assert d.agreement == 0 and d.max_dlogp == pytest.approx(float((p - q)[0, :2].abs().max()))
    assert not d.within(LOSSY) and "greedy agreement 0% < 80%" in d.beyond(LOSSY)


def test_a_near_tie_is_the_same_greedy_answer_and_a_missing_token_is_bounded():
    p = torch.log_softmax(torch.tensor([[2.0, 1.99, -5.0, -5.0]]), -1)
    q = torch.log_softmax(torch.tensor([[1.99, 2.0, -5.0, -5.0]]), -1)
    assert distance_full(top_k([p], 2), [q]).agreement == 1
    server = [[[(1, -0.1), (0, -2.5)]]]  # lists neither token 2 nor 3: bounded by its lowest, -2.5
    d = distance_top(top_k([p], 3), server)
    assert d.max_dlogp >= abs(float(p[0, 2]) + 2.5) - 1e-9
