"""How far a path's next-token distributions are from the reference's, and whether that is within tolerance.

The reference (an adapter's fingerprint, lorafit.fingerprint) keeps the top-k tokens of each probe
position. A path gives either its whole distribution (a local model, llama.cpp) or its own top-k (a
server). Per position, with R the reference's top-k tokens:

    max |Δ logprob|   max over t in R of |log p_ref(t) - log p_path(t)|
    KL                KL(p_ref || p_path) over R plus one bucket for the rest of the vocabulary
                      (a lower bound of the full KL; exact when the top-k hold the mass)
    greedy agreement  the path's most likely token is the reference's, or one the reference gives within
                      TIE nats of its best (a near-tie is a coin flip, not a changed answer)

A server that does not list a token of R among its own top-k gives it at most its k-th log-prob:
that bound is used (the distance is then a lower bound too). Reported: the max over positions of the
first, the mean of KL, the share of agreeing positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TopK = list[tuple[int, float]]  # (token, log-prob), most likely first
TIE = 0.05  # nats: reference log-probs this close to its best count as the same greedy answer


@dataclass(frozen=True)
class Tolerance:
    """The bounds of one kind of path; `label` says which kind in the table."""

    label: str
    max_dlogp: float
    mean_kl: float
    agreement: float


# The same computation in fp32 (the adapter again, PEFT, an fp32 merge, an f32 GGUF, a server): summation
# order and kernels differ, nothing else.
EXACT = Tolerance("exact", max_dlogp=0.02, mean_kl=1e-4, agreement=1.0)
# The same computation where either side ran in 16 bits (bf16 / fp16 activations or weights).
CLOSE = Tolerance("16-bit", max_dlogp=0.5, mean_kl=0.02, agreement=0.9)
# A lossy conversion users choose knowingly (requantizing a merge to NF4, a q8_0 / q4_0 GGUF): the
# distribution may move, the answers should not.
LOSSY = Tolerance("lossy", max_dlogp=math.inf, mean_kl=0.1, agreement=0.8)


@dataclass
class Distance:
    max_dlogp: float
    mean_kl: float
    agreement: float
    n: int  # positions compared

    def within(self, tol: Tolerance) -> bool:
        return self.max_dlogp <= tol.max_dlogp and self.mean_kl <= tol.mean_kl and self.agreement >= tol.agreement

    def beyond(self, tol: Tolerance) -> list[str]:
        """The bounds this distance breaks, as words."""
        out = []
        if self.max_dlogp > tol.max_dlogp:
            out.append(f"max |Δ logprob| {self.max_dlogp:.3g} > {tol.max_dlogp:g}")
        if self.mean_kl > tol.mean_kl:
            out.append(f"mean KL {self.mean_kl:.3g} > {tol.mean_kl:g}")
        if self.agreement < tol.agreement:
            out.append(f"greedy agreement {100 * self.agreement:.0f}% < {100 * tol.agreement:.0f}%")
        return out


def _one(ref: TopK, lookup, argmax: int) -> tuple[float, float, bool]:
    """(max |Δ logprob|, KL, agreement) at one position; lookup(t) -> the path's log-prob of t."""
    ref_lp = torch.tensor([lp for _, lp in ref], dtype=torch.float64)
    path_lp = torch.tensor([lookup(t) for t, _ in ref], dtype=torch.float64)
    p, q = ref_lp.exp(), path_lp.exp()
    p_rest, q_rest = (1 - p.sum()).clamp_min(0), (1 - q.sum()).clamp_min(1e-12)
    kl = float((p * (ref_lp - path_lp)).sum() + (p_rest * (p_rest.clamp_min(1e-300).log() - q_rest.log())
                                                  if p_rest > 1e-12 else 0.0))
    agrees = argmax == ref[0][0] or dict(ref).get(argmax, -math.inf) >= ref[0][1] - TIE
    return float((ref_lp - path_lp).abs().max()), max(kl, 0.0), agrees


def distance_full(reference: list[list[TopK]], logprobs: list[torch.Tensor]) -> Distance:
    """`logprobs[i]`: the path's (positions, vocab) log-probs of probe i."""
    stats = []
    for ref_probe, lp in zip(reference, logprobs):
        lp = lp.double()
        for ref, row in zip(ref_probe, lp):
            stats.append(_one(ref, lambda t, row=row: float(row[t]) if t < row.numel() else -math.inf,
                              int(row.argmax())))
    return _summary(stats)


def distance_top(reference: list[list[TopK]], tops: list[list[TopK]]) -> Distance:
    """`tops[i][j]`: the path's own top-k at position j of probe i (a server's answer)."""
    stats = []
    for ref_probe, path_probe in zip(reference, tops):
        for ref, path in zip(ref_probe, path_probe):
            given = dict(path)
            floor = min(given.values()) if given else -math.inf
            stats.append(_one(ref, lambda t, given=given, floor=floor: given.get(t, floor),
                              path[0][0] if path else -1))
    return _summary(stats)


def _summary(stats: list[tuple[float, float, bool]]) -> Distance:
    if not stats:
        return Distance(0.0, 0.0, 1.0, 0)
    return Distance(max(s[0] for s in stats), sum(s[1] for s in stats) / len(stats),
                    sum(s[2] for s in stats) / len(stats), len(stats))
