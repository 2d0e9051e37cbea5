"""Weighted combinations of adapters (task arithmetic, TIES, DARE), computed in ΔW space.

Each input adapter i contributes, per layer, its update as the model applies it:

    ΔW_i = s_i · B_i A_i        s_i = alpha/r or alpha/sqrt(r) (rsLoRA), rank and alpha patterns applied,
                                times any `set_adapter_scale` factor (`LoraLayer.effective_scaling`)

and the new adapter holds, per layer, a factorisation of:

    linear           Σ w_i ΔW_i, exactly, at its numerical rank (≤ Σ r_i)
    cat              Σ w_i ΔW_i as the literal concatenation  A = [A_1; …; A_n],  B = [w_1 s_1 B_1 | … | w_n s_n B_n]
    svd              the best rank-k approximation of Σ w_i ΔW_i (Eckart–Young), k = svd_rank
    magnitude_prune  Σ w_i trim(ΔW_i)                         trim: keep the top `density` share by |value|
    dare_linear      Σ w_i dare(ΔW_i)                         dare: keep each entry with probability
                                                              `density`, survivors divided by `density`
    ties             disjoint_mean(w_i trim(ΔW_i))            (Yadav et al. 2023)
    dare_ties        disjoint_mean(w_i dare(ΔW_i))            (Yu et al. 2023, with TIES' sign election)

disjoint_mean(τ_1..τ_n): per entry, the elected sign γ = +1 where Σ τ_i ≥ 0, else -1; the mean of the
τ_i whose sign is γ (0 where none is). The weights multiply before the election, as in PEFT, so a
negative weight negates a task vector (task negation, Ilharco et al. 2023).

The pruning combinations (and svd) give a dense matrix; the adapter stores its best rank-k
approximation, k = `svd_rank` (default: the largest input rank of that layer, as PEFT does). A
`svd_rank` of at least min(out, in) keeps the dense result exactly. DARE's masks come from one
`torch.Generator` seeded with `seed`: one `torch.rand(out, in, dtype=float64) < density` per adapter
present in a layer, layers in the model's module order, adapters in the order given.

Every result is a plain LoRA adapter with scaling exactly 1 (alpha = r on every layer, the scalings
and weights folded into B), written with per-layer `rank_pattern` / `alpha_pattern` entries where
ranks differ, so it saves, reloads and loads in PEFT with the same numbers.

Refused with one line (the model unchanged): DoRA inputs (the magnitude renormalises W + ΔW per row,
so DoRA updates do not add in ΔW space), inputs with modules_to_save (whole modules, not updates), PiSSA
adapters not yet saved (their base weights changed), and for `cat` inputs on different layers. Trained
biases (bias="lora_only"/"all") are base parameters in lorafit, shared by every adapter of a model: the
combined adapter takes the widest bias mode of its inputs, so its files hold the biases the model has.

References: Ilharco et al. 2023 (task arithmetic); Yadav et al. 2023 (TIES-Merging); Yu et al. 2023
(DARE); PEFT's `add_weighted_adapter`, whose cross-term-dropping `linear` this does not copy.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torch import nn

from lorafit.config import BIAS_MODES, LoraConfig, check_adapter_name
from lorafit.errors import LorafitError
from lorafit.lora.inject import adapter_configs, add_adapter, lora_layers

COMBINATIONS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")  # need `density`
DENSE = ("svd", *PRUNING)  # computed on dense ΔW, stored at rank `svd_rank`

Factors = tuple[torch.Tensor, torch.Tensor]  # (A (r, in), B (out, r))


def add_weighted_adapter(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], name: str,
                         combination: str = "linear", *, density: float | None = None,
                         svd_rank: int | None = None, seed: int = 0) -> nn.Module:
    """Add adapter `name`: the `combination` of `adapters` with `weights` (see the module docstring).

    The new adapter is added inactive and frozen (`set_adapter(model, name)` uses it). Everything is
    checked and computed before the model changes: a bad call raises LorafitError, model unchanged."""
    adapters, weights = list(adapters), [float(w) for w in _checked_weights(weights)]
    _check_inputs(model, adapters, weights, name, combination, density, svd_rank)
    configs = adapter_configs(model)
    layers = {path: layer for path, layer in lora_layers(model) if any(a in layer.lora_A for a in adapters)}
    if combination == "cat":
        spans = {a: sorted(p for p, layer in layers.items() if a in layer.lora_A) for a in adapters}
        first = spans[adapters[0]]
        for a in adapters[1:]:
            if spans[a] != first:
                odd = sorted(set(spans[a]) ^ set(first))[0]
                raise LorafitError(f"add_weighted_adapter: combination='cat' needs adapters on the same layers; "
                                   f"{odd} has {adapters[0]!r} or {a!r} but not both; use 'linear' instead")
    generator = torch.Generator().manual_seed(seed)
    factors: dict[str, Factors] = {}
    for path, layer in layers.items():
        terms = [(w, a) for w, a in zip(weights, adapters) if a in layer.lora_A]
        factors[path] = combine_layer(layer, terms, combination, density, svd_rank, generator)

    ranks = {path: A.shape[0] for path, (A, _) in factors.items()}
    bias = max((configs[a].bias for a in adapters), key=BIAS_MODES.index)
    config = unit_scaling_config(ranks, bias=bias, dropout=configs[adapters[0]].dropout)
    add_adapter(model, LoraConfig(**{**config.to_dict(), "init": "zeros"}), name, ranks=ranks, activate=False)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for path, (A, B) in factors.items():
            layer = modules[path]
            layer.lora_A[name].copy_(A)
            layer.lora_B[name].copy_(B)
    configs[name] = config
    return model


def unit_scaling_config(ranks: dict[str, int], **fields) -> LoraConfig:
    """A LoraConfig for exactly these module paths and ranks whose scaling is 1.0 on every one:
    alpha = r, the most common rank as `r`, the others as exact-path `rank_pattern` / `alpha_pattern`
    entries (PEFT matches them the same way). Used for adapters whose scalings are folded into B."""
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r = max(sorted(counts), key=counts.__getitem__)
    pattern = {re.escape(p): rank for p, rank in sorted(ranks.items()) if rank != r}
    return LoraConfig(r=r, alpha=float(r), target_modules=sorted(ranks), rank_pattern=pattern,
                      alpha_pattern={k: float(v) for k, v in pattern.items()}, **fields)


@torch.no_grad()
def combine_layer(layer: nn.Module, terms: list[tuple[float, str]], combination: str, density: float | None,
                  svd_rank: int | None, generator: torch.Generator) -> Factors:
    """(A, B) of one layer's combined update, in the adapters' dtype and device (math in fp64)."""
    A0 = layer.lora_A[terms[0][1]]
    dtype, device = A0.dtype, A0.device
    As = [layer.lora_A[a].detach().double() for _, a in terms]  # (r_i, in)
    Bs = [w * layer.effective_scaling(a) * layer.lora_B[a].detach().double() for w, a in terms]  # (out, r_i)
    if combination == "cat":
        A, B = torch.cat(As, dim=0), torch.cat(Bs, dim=1)
    elif combination in ("linear", "svd"):
        k = None if combination == "linear" else svd_rank or max(a.shape[0] for a in As)
        A, B = low_rank_of_product(torch.cat(Bs, dim=1), torch.cat(As, dim=0), k)
    else:
        tasks = torch.stack([layer.effective_scaling(a) * (layer.lora_B[a].detach().double() @ A)
                             for (_, a), A in zip(terms, As)])  # (n, out, in)
        w = torch.tensor([w for w, _ in terms], dtype=torch.float64)
        dense = prune_and_merge(tasks, w, combination, density, generator)  # (out, in)
        k = min(svd_rank or max(a.shape[0] for a in As), min(dense.shape))
        A, B = best_rank_k(dense, k)
    return A.to(device=device, dtype=dtype).contiguous(), B.to(device=device, dtype=dtype).contiguous()


def prune_and_merge(tasks: torch.Tensor, weights: torch.Tensor, combination: str, density: float,
                    generator: torch.Generator) -> torch.Tensor:
    """The dense merged update of task vectors `tasks` (n, out, in) with `weights` (n,) (fp64)."""
    if combination in ("ties", "magnitude_prune"):
        pruned = torch.stack([magnitude_trim(t, density) for t in tasks])
    else:  # DARE: drop with probability 1 - density, rescale the survivors
        keep = torch.stack([torch.rand(t.shape, generator=generator, dtype=torch.float64) < density for t in tasks])
        pruned = tasks * keep.to(tasks.device) / density
    weighted = weights.to(tasks.device)[:, None, None] * pruned  # (n, out, in)
    if combination in ("magnitude_prune", "dare_linear"):
        return weighted.sum(dim=0)
    elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(weighted.dtype)  # (out, in)
    agree = weighted.sign() == elected  # (n, out, in); zeros never agree
    return (weighted * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1)


def magnitude_trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """`t` with all but its int(density * numel) largest-magnitude entries set to zero."""
    k = int(density * t.numel())
    keep = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
    keep[torch.topk(t.abs().flatten(), k).indices] = True
    return t * keep.view_as(t)


def low_rank_of_product(B: torch.Tensor, A: torch.Tensor, k: int | None) -> Factors:
    """(A', B') with B'A' the best rank-k approximation of B @ A (B (out, R), A (R, in)), from QR of
    both factors and an SVD of the small (R, R) core; never forms the (out, in) product. k=None: the
    numerical rank (singular values above σ_max · max(out, in) · fp32 eps), i.e. B @ A exactly. A k
    above what B @ A holds is padded with zero rows, so the stated rank is the rank stored."""
    Qb, Rb = torch.linalg.qr(B)  # (out, m), (m, R)
    Qa, Ra = torch.linalg.qr(A.t())  # (in, n), (n, R)
    U, sigma, Vh = torch.linalg.svd(Rb @ Ra.t())  # (m, p), (p,), (p, n)
    if k is None:
        threshold = sigma.max() * max(B.shape[0], A.shape[1]) * torch.finfo(torch.float32).eps
        k = max(1, int((sigma > threshold).sum()))
    k = min(k, min(B.shape[0], A.shape[1]))
    kept = min(k, sigma.shape[0])
    root = sigma[:kept].sqrt()
    B_new = torch.zeros(B.shape[0], k, dtype=B.dtype, device=B.device)
    A_new = torch.zeros(k, A.shape[1], dtype=A.dtype, device=A.device)
    B_new[:, :kept] = (Qb @ U[:, :kept]) * root  # (out, k)
    A_new[:kept] = root[:, None] * (Vh[:kept] @ Qa.t())  # (k, in)
    return A_new, B_new


def best_rank_k(M: torch.Tensor, k: int) -> Factors:
    """(A, B) with B A the best rank-k approximation of M (out, in), the singular values split evenly."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    root = S[:k].sqrt()
    return root[:, None] * Vh[:k], U[:, :k] * root


def _checked_weights(weights: Sequence[float]) -> list[float]:
    if isinstance(weights, (str, bytes)) or not all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                                    and math.isfinite(w) for w in weights):
        raise LorafitError(f"add_weighted_adapter: weights must be a list of finite numbers, got {weights!r}")
    return list(weights)


def _check_inputs(model: nn.Module, adapters: list[str], weights: list[float], name: str, combination: str,
                  density: float | None, svd_rank: int | None) -> None:
    """Everything add_weighted_adapter can refuse, before anything is computed or changed."""
    where = "add_weighted_adapter"
    configs = adapter_configs(model)
    if combination not in COMBINATIONS:
        raise LorafitError(f"{where}: unknown combination {combination!r}; use one of {', '.join(COMBINATIONS)}")
    check_adapter_name(name)
    if name in configs:
        raise LorafitError(f"{where}: an adapter named {name!r} is already loaded; pick another name")
    if not adapters or len(adapters) != len(weights):
        raise LorafitError(f"{where}: give one weight per adapter ({len(adapters)} adapters, {len(weights)} weights)")
    unknown = [a for a in adapters if a not in configs]
    if unknown:
        raise LorafitError(f"{where}: no adapter named {unknown[0]!r}; loaded adapters: {sorted(configs) or 'none'}")
    for a in adapters:
        config = configs[a]
        if config.use_dora:
            raise LorafitError(f"{where}: {a!r} is a DoRA adapter; its magnitude renormalises W + ΔW per row, so it "
                               "does not combine in ΔW space (merge it into the base instead)")
        if config.modules_to_save:
            raise LorafitError(f"{where}: {a!r} has modules_to_save (whole modules, not low-rank updates); "
                               "only LoRA updates combine")
    for path, layer in lora_layers(model):
        if any(a in layer.pissa_init for a in adapters):
            raise LorafitError(f"{where}: a PiSSA adapter changed the base weights of {path}; save and reload it "
                               "first (saving turns it into a plain update of the original base)")
    if combination in PRUNING:
        if not isinstance(density, (int, float)) or isinstance(density, bool) or not 0 < density <= 1:
            raise LorafitError(f"{where}: combination={combination!r} needs density in (0, 1], got {density!r}")
    elif density is not None:
        raise LorafitError(f"{where}: density is used by {', '.join(PRUNING)} only, not {combination!r}")
    if svd_rank is not None:
        if combination not in DENSE:
            raise LorafitError(f"{where}: svd_rank is used by {', '.join(DENSE)} only, not {combination!r}")
        if not isinstance(svd_rank, int) or isinstance(svd_rank, bool) or svd_rank < 1:
            raise LorafitError(f"{where}: svd_rank must be a positive integer, got {svd_rank!r}")
