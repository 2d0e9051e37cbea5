"""GRPO's math as pure functions of tensors: group-relative advantages and the clipped policy loss.

References: GRPO (Shao et al. 2024, "DeepSeekMath"), PPO's clipped surrogate (Schulman et al. 2017),
DAPO (Yu et al. 2025: clip-higher, token-level normalisation, overlong filtering), Dr. GRPO (Liu et al.
2025, "Understanding R1-Zero-Like Training"), GSPO (Zheng et al. 2025: sequence-level ratios), two-sided
clipping (INTELLECT-2, 2025), the k3 KL estimator (Schulman 2020, "Approximating KL divergence").
Each function reproduces TRL 1.16's `GRPOTrainer` (`_generate_and_score_completions` for the advantages,
`_compute_loss` for the loss and its metrics), which tests/parity/test_trl_grpo.py checks in fp32.

Advantages, for a generation batch of N completions in groups of G (one prompt each), K reward functions:

    r_i = sum_k w_k r_{i,k}              None rewards (NaN) left out; a completion no function scored is NaN
    A_i = r_i - mean_group(r)            means and stds ignore NaN; std with Bessel's correction
    A_i = A_i / (std + 1e-4)             std over the group ("group") or the whole batch ("batch"); not
                                         divided with "none"
    A_i = 0 where it is NaN              an unscorable completion, or a group with a single scored one

The loss, per completion token t of completion i (m_{i,t} its mask), with log-ratio
d_{i,t} = log pi_theta - log pi_old:

    rho_{i,t} = exp(d_{i,t})                                 importance_sampling_level token
    rho_i     = exp(sum_t m d / max(sum_t m, 1))             importance_sampling_level sequence (GSPO)
    l_{i,t}   = -min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i)      rho capped at delta first
                                                                              (two-sided), when set
    l_{i,t}  += beta rho k3_{i,t}                            k3 = exp(ref - logp) - (ref - logp) - 1, the KL
                                                              to the reference, when beta > 0; rho (uncapped)
                                                              only with use_bias_correction_kl (DeepSeek-V3.2)

and `aggregate` turns l into the micro-batch's loss by loss_type (lorafit.train.grpo_config.GRPOConfig).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

EPS_STD = 1e-4


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Standard deviation ignoring NaN, with Bessel's correction (NaN where fewer than 2 values)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True) if dim is not None else torch.nanmean(x)
    variance = torch.nanmean((x - mean) ** 2, dim=dim)
    count = (~torch.isnan(x)).sum(dim=dim) if dim is not None else (~torch.isnan(x)).sum()
    correction = torch.where(count > 1, count / (count - 1).clamp(min=1), torch.full_like(variance, float("nan")))
    return torch.sqrt(variance * correction)


class Advantages(NamedTuple):
    advantages: torch.Tensor  # (N,)
    rewards: torch.Tensor  # (N,) weighted sums, NaN where no function scored the completion
    std_zero: torch.Tensor  # (N,) bool: the std it was scaled by is 0 (a group of equal rewards)


def group_advantages(rewards_per_func: torch.Tensor, weights: torch.Tensor, group: int,
                     scale: str) -> Advantages:
    """A_i of every completion (see the module docstring) from rewards (N, K), NaN = None, and weights (K,);
    completions in groups of `group` consecutive rows."""
    unscorable = torch.isnan(rewards_per_func).all(dim=1)  # (N,)
    rewards = (rewards_per_func * weights[None, :]).nansum(dim=1)
    rewards[unscorable] = torch.nan
    grouped = rewards.view(-1, group)  # (N / G, G)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group)
    if scale == "batch":
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:  # group (and none, where the std only feeds the zero-std count)
        std = nanstd(grouped, dim=1).repeat_interleave(group)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + EPS_STD)
    std_zero = torch.isclose(std, torch.zeros_like(std))
    return Advantages(torch.nan_to_num(advantages, nan=0.0), rewards, std_zero)


class PolicyLoss(NamedTuple):
    per_token: torch.Tensor  # (B, T) l_{i,t} (broadcast from (B, 1) at sequence level)
    ratio: torch.Tensor  # (B, T) or (B, 1): rho before clipping (capped at delta when set, as TRL logs it)
    kl: torch.Tensor | None  # (B, T) the k3 term (beta > 0)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
                eps_low: float, eps_high: float, delta: float | None, level: str, beta: float,
                ref_logp: torch.Tensor | None = None, kl_correction: bool = True) -> PolicyLoss:
    """l_{i,t} (see the module docstring) from per-token log-probs (B, T) under the policy (with its graph),
    pi_old and (beta > 0) the reference, advantages (B,) and the loss mask (B, T)."""
    adv = advantages[:, None]  # (B, 1)
    log_ratio = logp - old_logp
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0))[:, None]  # (B, 1)
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    capped = torch.clamp(ratio, max=delta) if delta is not None else ratio
    per_token = -torch.min(capped * adv, clipped * adv)
    kl = None
    if beta != 0.0:
        diff = ref_logp - logp
        kl = torch.exp(diff) - diff - 1
        if kl_correction:  # the unbiased reverse-KL gradient off-policy; changes the gradient even at rho = 1
            kl = kl * ratio
        per_token = per_token + beta * kl
    return PolicyLoss(per_token.expand_as(logp), capped, kl)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str, norm: float) -> torch.Tensor:
    """The micro-batch's share of the step's loss: the numerator of `loss_type` over `norm`, the
    denominator that makes the trainer's mean over micro-batches TRL's loss (see GRPO.loss):

        grpo      sum_i [sum_t l m / max(sum_t m, 1)] / norm    norm = completions of the micro-batch
        bnpo      sum_{i,t} l m / norm                          norm = its loss tokens (every process)
        dr_grpo   sum_{i,t} l m / norm                          norm = its completions * max_completion_length
        dapo      sum_{i,t} l m / norm                          norm = loss tokens of the generation batch
                                                                       / steps_per_generation
    """
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / norm
    return (per_token * mask).sum() / norm


def clip_stats(ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(low, high, region): where the clip bound is the active one (ratio below 1 - eps_low with a negative
    advantage, above 1 + eps_high with a positive one), as floats shaped like `ratio`."""
    adv = advantages[:, None]
    low = ((ratio < 1 - eps_low) & (adv < 0)).float()
    high = ((ratio > 1 + eps_high) & (adv > 0)).float()
    return low, high, torch.maximum(low, high)
