"""The analysis math of lorafit inspect on constructed matrices whose answers are known in closed form."""

import math
import re

import pytest
import torch

from lorafit.inspect.spectra import (
    effective_rank,
    energy_rank,
    frobenius,
    intruder_dimensions,
    left_singular_vectors,
    lowrank_singular_values,
    relative_norm,
    singular_values,
    stable_rank,
    suggest_rank_pattern,
)


def orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q[:, :k]


def with_spectrum(values: list[float], out: int = 48, inp: int = 32, seed: int = 0) -> torch.Tensor:
    """U diag(values) Vᵀ with random orthonormal U (out, k), V (in, k)."""
    k = len(values)
    return orthonormal(out, k, seed) @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ orthonormal(inp, k, seed + 1).T


def test_norms_equal_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    W, dW = torch.randn(20, 30, generator=g), 0.01 * torch.randn(20, 30, generator=g)
    direct = math.sqrt(sum(float(x) ** 2 for x in dW.flatten()))
    assert frobenius(dW) == pytest.approx(direct, rel=1e-6)
    assert relative_norm(dW, W) == pytest.approx(direct / math.sqrt(sum(float(x) ** 2 for x in W.flatten())), rel=1e-6)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_a_rank_k_product_has_k_non_zero_singular_values(k):
    g = torch.Generator().manual_seed(k)
    B, A = torch.randn(40, k, generator=g, dtype=torch.float64), torch.randn(k, 24, generator=g, dtype=torch.float64)
    s = singular_values(B @ A)
    assert s.shape == (24,)
    assert int((s > 1e-9 * s[0]).sum()) == k
    # the factored computation gives the same k values without forming B·A
    torch.testing.assert_close(lowrank_singular_values(B, A, scale=0.5), 0.5 * s[:k], rtol=1e-9, atol=1e-12)


def test_effective_and_stable_rank_equal_their_closed_forms():
    values = [4.0, 2.0, 1.0, 1.0]
    s = singular_values(with_spectrum(values))
    p = [v / sum(values) for v in values]
    assert effective_rank(s) == pytest.approx(math.exp(-sum(q * math.log(q) for q in p)), rel=1e-9)
    assert stable_rank(s) == pytest.approx(sum(v * v for v in values) / 16.0, rel=1e-9)
    flat = singular_values(with_spectrum([3.0] * 5))  # k equal values: both ranks are k
    assert effective_rank(flat) == pytest.approx(5.0, rel=1e-9)
    assert stable_rank(flat) == pytest.approx(5.0, rel=1e-9)
    assert effective_rank(torch.zeros(4)) == stable_rank(torch.zeros(4)) == 0.0


def test_rank_pattern_suggestion_keeps_the_stated_energy():
    spectra = {"model.layers.0.self_attn.q_proj": singular_values(with_spectrum([8.0, 4.0, 2.0, 1.0, 0.5], seed=1)),
               "model.layers.0.mlp.up_proj": singular_values(with_spectrum([5.0, 0.1], seed=2)),
               "model.layers.1.mlp.up_proj": singular_values(with_spectrum([5.0, 0.2], seed=3)),
               "model.layers.1.self_attn.q_proj": singular_values(with_spectrum([1.0] * 6, seed=4))}
    for energy in (0.5, 0.9, 0.99):
        suggestion = suggest_rank_pattern(spectra, energy)
        for path, s in spectra.items():
            key = next((k for k in suggestion["rank_pattern"] if re.fullmatch(rf"(.*\.)?(?:{k})", path)), None)
            r = suggestion["rank_pattern"][key] if key is not None else suggestion["r"]
            power = (s**2).tolist()
            assert sum(power[:r]) / sum(power) >= energy - 1e-9  # the energy is kept...
            assert r == 1 or sum(power[:r - 1]) / sum(power) < energy  # ...by the fewest values that keep it
            assert r == energy_rank(s, energy)
    # the two up_proj keep one value each at 90%: the common rank; the others are listed
    suggestion = suggest_rank_pattern(spectra, 0.9)
    assert suggestion["r"] == 1 and len(suggestion["rank_pattern"]) == 2


def test_intruder_score_is_zero_without_an_update_and_positive_for_a_planted_direction():
    n = 32
    U, V = orthonormal(n, n, 5), orthonormal(n, n, 6)
    W = U @ torch.diag(torch.linspace(2.0, 0.1, n, dtype=torch.float64)) @ V.T
    assert intruder_dimensions(W, torch.zeros_like(W), k=8) == 0
    assert intruder_dimensions(W, 1e-4 * torch.randn(n, n, dtype=torch.float64), k=8) == 0  # small noise: none
    u = U.sum(dim=1) / math.sqrt(n)  # equally far from every singular vector of W: |cos| = 1/sqrt(32)
    planted = 10.0 * torch.outer(u, V[:, 0])
    assert intruder_dimensions(W, planted, k=8) == 1


def test_left_singular_vectors_match_an_svd_on_both_shapes():
    for shape in ((12, 30), (30, 12)):
        M = torch.randn(*shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        U_svd = torch.linalg.svd(M, full_matrices=False).U
        U = left_singular_vectors(M).double()
        assert U.shape == U_svd.shape
        torch.testing.assert_close((U * U_svd).sum(0).abs(), torch.ones(12, dtype=torch.float64), atol=1e-4, rtol=0)
