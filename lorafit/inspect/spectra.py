"""The analysis math of `lorafit inspect`, on plain tensors: norms, spectra, ranks, intruders.

For one adapted weight W (out, in) and its update ΔW (LoRA: ΔW = s·B·A with s = alpha/r):

* ‖ΔW‖_F and ‖ΔW‖_F / ‖W‖_F: how large the update is, absolutely and against the weight it moves.
* The singular values σ_1 ≥ σ_2 ≥ ... of ΔW (`torch.linalg.svdvals`); a rank-r update has at most r
  non-zero ones.
* Effective rank (Roy & Vetterli 2007, "The effective rank: a measure of effective dimensionality"):
  p_i = σ_i / Σ_j σ_j, erank = exp(-Σ_i p_i log p_i). It is k for k equal non-zero values, 1 for one.
* Stable rank: ‖ΔW‖_F² / ‖ΔW‖_2² = Σ σ_i² / σ_1², never above the rank, insensitive to tiny values.
* Energy rank: the fewest leading singular values holding a share e of Σ σ_i² (the "energy");
  `suggest_rank_pattern` turns these into a LoraConfig rank_pattern (every module's energy kept ≥ e).
* Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of
  Equivalence"): of the top-k left singular vectors of the fine-tuned W + ΔW, those whose largest
  |cosine| with every left singular vector of W stays below ε. Fine-tuning that only re-weights what W
  already has scores 0; an update that writes a new, large direction scores > 0.
"""

from __future__ import annotations

import math
import re

import torch

__all__ = ["effective_rank", "energy_rank", "frobenius", "intruder_dimensions", "left_singular_vectors",
           "lowrank_singular_values", "relative_norm", "singular_values", "stable_rank", "suggest_rank_pattern"]


def frobenius(M: torch.Tensor) -> float:
    """‖M‖_F = sqrt(Σ m_ij²), computed in float64."""
    return float(torch.linalg.matrix_norm(M.double(), "fro"))


def relative_norm(dW: torch.Tensor, W: torch.Tensor) -> float:
    """‖ΔW‖_F / ‖W‖_F (inf for a zero W)."""
    base = frobenius(W)
    return frobenius(dW) / base if base > 0 else math.inf


def singular_values(M: torch.Tensor) -> torch.Tensor:
    """σ_1 ≥ ... ≥ σ_min(out, in) of M (float64, on the CPU). M: (out, in) -> (min(out, in),)"""
    return torch.linalg.svdvals(M.detach().double().cpu())


def lowrank_singular_values(B: torch.Tensor, A: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Singular values of scale·B·A without forming it: with B = Q_B R_B and Aᵀ = Q_A R_A (thin QR),
    B·A = Q_B (R_B R_Aᵀ) Q_Aᵀ, so they are those of the r x r matrix R_B R_Aᵀ. B: (out, r), A: (r, in)
    -> (r,) in float64."""
    _, R_B = torch.linalg.qr(B.detach().double().cpu())  # (r, r)
    _, R_A = torch.linalg.qr(A.detach().double().cpu().T)  # (r, r)
    return torch.linalg.svdvals(abs(scale) * (R_B @ R_A.T))


def left_singular_vectors(M: torch.Tensor) -> torch.Tensor:
    """The left singular vectors of M (out, in) with a non-zero singular value, by decreasing value,
    as columns (out, m), float32. From the eigenvectors of the smaller Gram matrix (M Mᵀ, or MᵀM and
    U = M V / σ): an eigh of min(out, in)², several times faster than an SVD on a CPU; directions are
    exact to float32 rounding for all but the smallest singular values, which a cosine test tolerates."""
    M = M.detach().float().cpu()
    if M.shape[0] <= M.shape[1]:
        power, U = torch.linalg.eigh(M @ M.T)  # ascending
        keep = power > power.max().clamp_min(0) * 1e-10
        return U[:, keep].flip(1)
    power, V = torch.linalg.eigh(M.T @ M)
    keep = power > power.max().clamp_min(0) * 1e-10
    U = (M @ V[:, keep]) / power[keep].sqrt()  # (out, m)
    return U.flip(1)


def effective_rank(s: torch.Tensor) -> float:
    """exp of the Shannon entropy of σ / Σσ (Roy & Vetterli 2007); 0.0 for a zero matrix."""
    s = s.double().clamp_min(0)
    total = float(s.sum())
    if total == 0:
        return 0.0
    p = s[s > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def stable_rank(s: torch.Tensor) -> float:
    """Σ σ_i² / σ_1² = ‖M‖_F² / ‖M‖_2²; 0.0 for a zero matrix."""
    s = s.double()
    top = float(s.max()) if s.numel() else 0.0
    return float((s * s).sum()) / top**2 if top > 0 else 0.0


def energy_rank(s: torch.Tensor, energy: float = 0.9) -> int:
    """The fewest leading singular values whose squares hold at least `energy` of Σ σ_i² (0 for a
    zero matrix). s must be sorted in decreasing order, as `singular_values` returns it."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    power = s.double() ** 2
    total = float(power.sum())
    if total == 0:
        return 0
    share = torch.cumsum(power, 0) / total
    # the first index whose cumulative share reaches `energy` (a hair of slack for rounding at 1.0)
    return int(torch.searchsorted(share, torch.tensor(energy - 1e-12, dtype=share.dtype))) + 1


def suggest_rank_pattern(spectra: dict[str, torch.Tensor], energy: float = 0.9, r: int | None = None) -> dict:
    """A LoraConfig excerpt {"r": R, "rank_pattern": {regex: r_i}} that gives every module the rank
    holding `energy` of its update's spectrum: R is the most common of those ranks and rank_pattern
    lists the modules that differ, each key the module's escaped path (it matches that module only).
    Ranks are at least 1 (a module whose update is zero keeps rank 1). With `r` (the adapter's rank,
    when only some of its modules were analysed), R is `r`, so the modules not analysed keep theirs
    and the suggestion covers the analysed ones only."""
    ranks = {path: max(1, energy_rank(s, energy)) for path, s in spectra.items()}
    if not ranks:
        return {"r": r or 1, "rank_pattern": {}}
    counts: dict[int, int] = {}
    for rank in ranks.values():
        counts[rank] = counts.get(rank, 0) + 1
    common = r or max(sorted(counts), key=lambda rank: counts[rank])
    return {"r": common, "rank_pattern": {re.escape(p): rank for p, rank in ranks.items() if rank != common}}


def intruder_dimensions(W: torch.Tensor, dW: torch.Tensor, k: int = 10, eps: float = 0.5) -> int:
    """How many of the top-k left singular vectors of W + ΔW have |cos| < eps with every left singular
    vector of W (Shuttleworth et al. 2024). 0 when ΔW = 0 (each is one of W's own, up to sign).
    W, dW: (out, in)."""
    W = W.detach().float().cpu()
    U = left_singular_vectors(W)  # (out, m)
    top = left_singular_vectors(W + dW.detach().float().cpu())[:, :k]  # (out, k): unit columns, as are U's
    best = (U.T @ top).abs().max(dim=0).values  # (k,): each new vector's closest old one
    return int((best < eps).sum())
