"""Preference losses as small pure functions of log-probability tensors, one value per pair (or example).

Inputs are per-sequence sums of completion-token log-probabilities, fp32, shape (B,):

    pi_c, pi_r     the policy's log p(chosen | prompt), log p(rejected | prompt)
    ref_c, ref_r   the reference's
    h_c = pi_c - ref_c,  h_r = pi_r - ref_r              log-ratios ("implicit rewards" / beta)
    d = h_c - h_r                                         the DPO logit (beta * d is the reward margin)

and the hyperparameters of `lorafit.train.config.PreferenceConfig` (TRL 1.16's names and defaults:
beta 0.1, label_smoothing eps 0, discopop_tau 0.05, simpo_gamma 0.5, cpo_alpha 1.0). Each function
states its formula and paper; each reproduces TRL 1.16's `DPOTrainer._compute_loss` / `CPOTrainer.cpo_loss`
/ `ORPOTrainer.odds_ratio_loss` / `KTOTrainer._compute_loss` (tests/parity/test_trl_preference.py).
The objectives (lorafit.train.objectives.preference, .kto) sum them over the pairs of a batch.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


class PairLogps(NamedTuple):
    """Sequence log-probabilities of a batch of pairs, and their completion lengths in tokens."""

    chosen: torch.Tensor  # (B,)
    rejected: torch.Tensor  # (B,)
    ref_chosen: torch.Tensor  # (B,)
    ref_rejected: torch.Tensor  # (B,)
    chosen_len: torch.Tensor  # (B,) tokens (float)
    rejected_len: torch.Tensor  # (B,)

    @property
    def margin(self) -> torch.Tensor:
        """d = (pi_c - ref_c) - (pi_r - ref_r)."""
        return (self.chosen - self.ref_chosen) - (self.rejected - self.ref_rejected)


def sigmoid(x: PairLogps, beta: float, **_) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, "Direct Preference Optimization"): -log sigma(beta d)."""
    return -F.logsigmoid(beta * x.margin)


def hinge(x: PairLogps, beta: float, **_) -> torch.Tensor:
    """SLiC-HF (Zhao et al. 2023, "Calibrating Sequence Likelihood..."): max(0, 1 - beta d)."""
    return torch.relu(1 - beta * x.margin)


def ipo(x: PairLogps, beta: float, **_) -> torch.Tensor:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm...", eq. 17), on per-token averages as TRL
    (and the IPO authors) compute it: (h_c / |y_c| - h_r / |y_r| - 1 / (2 beta))^2, beta being tau."""
    delta = (x.chosen - x.ref_chosen) / x.chosen_len.clamp(min=1) - (x.rejected - x.ref_rejected) / x.rejected_len.clamp(min=1)
    return (delta - 1 / (2 * beta)) ** 2


def exo_pair(x: PairLogps, beta: float, label_smoothing: float, **_) -> torch.Tensor:
    """EXO-pref (Ji et al. 2024, "Towards Efficient Exact Optimization...", eq. 16): KL(q || p) with
    q = (sigma(beta d), sigma(-beta d)) and p = (1 - eps, eps):
    q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps)."""
    z = beta * x.margin
    eps = torch.tensor(label_smoothing, device=z.device)
    return (torch.sigmoid(z) * (F.logsigmoid(z) - torch.log1p(-eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - torch.log(eps)))


def nca_pair(x: PairLogps, beta: float, **_) -> torch.Tensor:
    """NCA (Chen et al. 2024, "Noise Contrastive Alignment"), with r = beta h:
    -log sigma(r_c) - 1/2 log sigma(-r_c) - 1/2 log sigma(-r_r)."""
    rc, rr = beta * (x.chosen - x.ref_chosen), beta * (x.rejected - x.ref_rejected)
    return -F.logsigmoid(rc) - 0.5 * F.logsigmoid(-rc) - 0.5 * F.logsigmoid(-rr)


def robust(x: PairLogps, beta: float, label_smoothing: float, **_) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO"), labels flipped with probability eps:
    [-(1 - eps) log sigma(beta d) + eps log sigma(-beta d)] / (1 - 2 eps)."""
    z, eps = beta * x.margin, label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def bco_pair(x: PairLogps, beta: float, **_) -> torch.Tensor:
    """BCO, paired form (Jung et al. 2024, "Binary Classifier Optimization"): -log sigma(r_c) - log sigma(-r_r),
    r = beta h."""
    return -F.logsigmoid(beta * (x.chosen - x.ref_chosen)) - F.logsigmoid(-beta * (x.rejected - x.ref_rejected))


def sppo_hard(x: PairLogps, beta: float, **_) -> torch.Tensor:
    """SPPO with hard labels (Wu et al. 2024, "Self-Play Preference Optimization", eq. 4.7 with P = 1 for
    the winner): (h_c - 1/(2 beta))^2 + (h_r + 1/(2 beta))^2."""
    return (x.chosen - x.ref_chosen - 0.5 / beta) ** 2 + (x.rejected - x.ref_rejected + 0.5 / beta) ** 2


def aot(x: PairLogps, beta: float, label_smoothing: float, **_) -> torch.Tensor:
    """AOT, paired (Melnyk et al. 2024, "Distributional Preference Alignment via Optimal Transport"):
    the batch's policy log-ratios pi_c - pi_r and reference ones ref_c - ref_r are each sorted, and
    delta = sorted(pi) - sorted(ref) enters -(1 - eps) log sigma(beta delta) - eps log sigma(-beta delta).
    The sort spans the (micro-)batch, as in TRL."""
    delta = torch.sort(x.chosen - x.rejected, dim=0)[0] - torch.sort(x.ref_chosen - x.ref_rejected, dim=0)[0]
    return -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing


def aot_unpaired(x: PairLogps, beta: float, label_smoothing: float, **_) -> torch.Tensor:
    """AOT, unpaired: delta = sorted(h_c) - sorted(h_r) over the batch, then as `aot`."""
    delta = torch.sort(x.chosen - x.ref_chosen, dim=0)[0] - torch.sort(x.rejected - x.ref_rejected, dim=0)[0]
    return -F.logsigmoid(beta * delta) * (1 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing


def apo_zero(x: PairLogps, beta: float, **_) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization", eq. 7): chosen up,
    rejected down: (1 - sigma(beta h_c)) + sigma(beta h_r)."""
    return (1 - torch.sigmoid(beta * (x.chosen - x.ref_chosen))) + torch.sigmoid(beta * (x.rejected - x.ref_rejected))


def apo_down(x: PairLogps, beta: float, **_) -> torch.Tensor:
    """APO-down (eq. 8): both down, rejected more: sigma(beta h_c) + (1 - sigma(beta d))."""
    return torch.sigmoid(beta * (x.chosen - x.ref_chosen)) + (1 - torch.sigmoid(beta * x.margin))


def discopop(x: PairLogps, beta: float, discopop_tau: float, **_) -> torch.Tensor:
    """DiscoPOP (Chris Lu et al. 2024, "Discovering Preference Optimization Algorithms", eq. 5), with
    z = beta d and m = sigma(z / tau): (1 - m)(-log sigma(z)) + m exp(-z)."""
    z = beta * x.margin
    m = torch.sigmoid(z / discopop_tau)
    return -F.logsigmoid(z) * (1 - m) + torch.exp(-z) * m


def sigmoid_norm(x: PairLogps, beta: float, **_) -> torch.Tensor:
    """Length-normalised DPO: -log sigma(beta (h_c / |y_c| - h_r / |y_r|))."""
    delta = (x.chosen - x.ref_chosen) / x.chosen_len.clamp(min=1) - (x.rejected - x.ref_rejected) / x.rejected_len.clamp(min=1)
    return -F.logsigmoid(beta * delta)


def sft(x: PairLogps, beta: float, chosen_nll: torch.Tensor, **_) -> torch.Tensor:
    """The NLL of the chosen completions (RPO / MPO's SFT term, Pang et al. 2024): their mean per-token
    negative log-likelihood over the batch, the same value for every pair (TRL's form)."""
    return chosen_nll.expand(x.chosen.shape[0])


DPO_LOSSES = {f.__name__: f for f in (sigmoid, hinge, ipo, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot,
                                      aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm)}


def dpo_loss(x: PairLogps, loss_types: list[str], loss_weights: list[float] | None, *, beta: float,
             label_smoothing: float = 0.0, discopop_tau: float = 0.05,
             chosen_nll: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair loss of `loss_types` summed with `loss_weights` (1.0 each by default), (B,):
    L = sum_k w_k loss_k. `chosen_nll` (a scalar) is needed by "sft" only."""
    weights = loss_weights or [1.0] * len(loss_types)
    total = None
    for name, w in zip(loss_types, weights):
        value = w * DPO_LOSSES[name](x, beta=beta, label_smoothing=label_smoothing, discopop_tau=discopop_tau,
                                     chosen_nll=chosen_nll)
        total = value if total is None else total + value
    return total


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_odds_ratio(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", eqs.
    4-7) on per-token average log-probs a_c, a_r (no reference):
    log odds = (a_c - a_r) - (log(1 - e^a_c) - log(1 - e^a_r)); the odds-ratio loss per pair is
    -beta log sigma(log odds) (beta is the paper's lambda), added to the NLL of the chosen completion.
    Returns (loss per pair, log odds)."""
    log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
    return -beta * F.logsigmoid(log_odds), log_odds


def simpo(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor, beta: float, simpo_gamma: float,
          label_smoothing: float = 0.0) -> torch.Tensor:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    eq. 6), in TRL's CPO form: with average log-probs a and z = beta (a_c - a_r) - gamma,
    -(1 - eps) log sigma(z) - eps log sigma(-z). The CPO objective (Xu et al. 2024) adds cpo_alpha x
    the NLL of the chosen completion; cpo_alpha 0 is pure SimPO."""
    z = beta * ((chosen_avg - rejected_avg) - simpo_gamma / beta)
    return -F.logsigmoid(z) * (1 - label_smoothing) - F.logsigmoid(-z) * label_smoothing


def kto(logratio: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor, beta: float, loss_type: str,
        desirable_weight: float, undesirable_weight: float) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 7)
    per example, h = log pi(y|x) - log pi_ref(y|x), z0 = the batch's KL estimate (detached, >= 0):
        desirable:    w_D (1 - sigma(beta (h - z0)))
        undesirable:  w_U (1 - sigma(beta (z0 - h)))
    "apo_zero_unpaired" (APO-zero, unpaired; D'Oosterlinck et al. 2024): w_D (1 - sigma(beta h)) and
    w_U sigma(beta h), no KL term."""
    if loss_type == "kto":
        loss = torch.where(desirable, 1 - torch.sigmoid(beta * (logratio - kl)), 1 - torch.sigmoid(beta * (kl - logratio)))
    else:
        loss = torch.where(desirable, 1 - torch.sigmoid(beta * logratio), torch.sigmoid(beta * logratio))
    return loss * torch.where(desirable, desirable_weight, undesirable_weight)
