"""Pairwise preference objectives: DPO and its loss family, ORPO, SimPO (method dpo, orpo, simpo).

A batch of B pairs is 2B rows, the chosen completions first and the rejected after them, in ONE
forward (as TRL does); each row is prompt + completion, truncated (lorafit.train.data.preference), and
only completion tokens are scored, through the chunked head (lorafit.train.objectives.logps). With
pi = sum of a completion's token log-probs under the policy and ref the same under the reference:

    dpo     per pair: sum_k w_k loss_k(pi_c, pi_r, ref_c, ref_r) (lorafit.train.objectives.losses);
            the reference: precomputed log-probs carried by the batch, or a no-grad forward of the same
            rows under `reference` (base with adapters disabled, or the frozen reference adapter slot)
    orpo    per pair: NLL(chosen) - beta log sigma(log odds(a_c, a_r)), a = pi / |y| (no reference)
    simpo   per pair: SimPO(a_c, a_r) + cpo_alpha NLL(chosen) (no reference)

NLL(chosen) is the mean next-token loss over the chosen rows' completion tokens of the micro-batch, the
same value added for every pair, as TRL's CPO and ORPO trainers add it. TRL's ORPO takes that NLL over
the prompt and the completion; lorafit over the completion only, like every other objective here (the
prompt is not what the model should learn to write), unless the data sets `train_on_prompt: true`,
which gives TRL's ORPO exactly.

Metrics (TRL's names): rewards/chosen, rewards/rejected (dpo: beta (pi - ref); orpo, simpo: beta a),
rewards/accuracies (share of pairs with the chosen reward higher), rewards/margins, logps/chosen,
logps/rejected (what the loss uses: sums for dpo, averages for orpo and simpo), logits/chosen,
logits/rejected (the mean logit over the completions' tokens: TRL's DPOTrainer definition, used for
ORPO and SimPO too, where TRL's older trainers average over every position of the padded batch), and
dpo: entropy, mean_token_accuracy; orpo: nll_loss, log_odds_ratio, log_odds_chosen; simpo: nll_loss.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lorafit.train.config import PreferenceConfig
from lorafit.train.data import PairSample
from lorafit.train.objectives import metric
from lorafit.train.objectives.logps import reference, token_logps
from lorafit.train.objectives.losses import PairLogps, dpo_loss, orpo_odds_ratio, simpo

REWARDS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "logits/chosen", "logits/rejected")
EXTRA = {"dpo": ("entropy", "mean_token_accuracy"), "orpo": ("nll_loss", "log_odds_ratio", "log_odds_chosen"),
         "simpo": ("nll_loss",)}


def collate_pairs(samples: list[PairSample], pad_id: int) -> dict[str, torch.Tensor]:
    """2B right-padded host rows, chosen first: input_ids, attention_mask, position_ids,
    completion_mask (1 on completion tokens), nll_mask (the tokens an NLL term covers), weight (B,),
    and ref (B, 2) when every sample carries precomputed reference log-probs."""
    rows = [s.rows() for s in samples]
    ordered = [r[0] for r in rows] + [r[1] for r in rows]
    prompts = [s.train_on_prompt for s in samples] * 2
    n, width = len(ordered), max(len(ids) for ids, _ in ordered)
    host = torch.device("cpu")
    input_ids = torch.full((n, width), pad_id, dtype=torch.long, device=host)
    attention = torch.zeros((n, width), dtype=torch.long, device=host)
    completion = torch.zeros((n, width), dtype=torch.long, device=host)
    for i, (ids, mask) in enumerate(ordered):
        input_ids[i, :len(ids)] = torch.tensor(ids, device=host)
        attention[i, :len(ids)] = 1
        completion[i, :len(ids)] = torch.tensor(mask, device=host)
    on_prompt = torch.tensor(prompts, device=host)[:, None]
    batch = {"input_ids": input_ids, "attention_mask": attention,
             "position_ids": torch.arange(width, device=host).repeat(n, 1), "completion_mask": completion,
             "nll_mask": torch.where(on_prompt, attention, completion),
             "weight": torch.tensor([s.weight for s in samples], dtype=torch.float32, device=host)}
    if all(s.ref_logps is not None for s in samples):
        batch["ref"] = torch.tensor([s.ref_logps for s in samples], dtype=torch.float32, device=host)  # (B, 2)
    return batch


class Pairwise:
    """The objective of method dpo, orpo or simpo (see the module docstring)."""

    def __init__(self, method: str, config: PreferenceConfig, reference_adapter: str | None = None) -> None:
        self.name, self.config, self.reference_adapter = method, config, reference_adapter
        self.metrics = REWARDS + EXTRA[method]
        self.progress = ("rewards/accuracies", "acc")

    def prepare(self, samples: list[PairSample]) -> list[PairSample]:
        return samples

    def empty(self, sample: PairSample) -> PairSample:
        return dataclasses.replace(sample, weight=0.0)

    def collate(self, samples: list[PairSample], pad_id: int) -> dict[str, torch.Tensor]:
        return collate_pairs(samples, pad_id)

    def batches(self, model: nn.Module, micro: list[list[PairSample]], pad_id: int) -> list[dict[str, torch.Tensor]]:
        return [collate_pairs(samples, pad_id) for samples in micro]

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["weight"].sum())

    def reference_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, 2): each pair's chosen and rejected log-probs under the reference policy, no graph kept."""
        completion = batch["completion_mask"]
        with torch.no_grad(), reference(model, self.reference_adapter):
            logp = token_logps(model, batch, completion).logp
        return (logp * completion).sum(1).view(2, -1).t()

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.config
        completion, nll_mask = batch["completion_mask"], batch["nll_mask"]
        weight = batch["weight"]  # (B,)
        b = weight.shape[0]
        out = token_logps(model, batch, torch.maximum(completion, nll_mask), stats=True)
        cm = completion.float()  # (2B, T)
        predicted = cm.clone()
        predicted[:, 0] = 0  # completion tokens with a prediction (position 0 has none: an empty prompt)
        seq = (out.logp * cm).sum(1)  # (2B,) sequence log-probs
        nm = nll_mask[:b].float() * weight[:, None]  # the chosen rows' NLL tokens
        nm[:, 0] = 0
        nll = -(out.logp[:b] * nm).sum() / nm.sum().clamp(min=1)  # mean over the micro-batch's tokens
        extra: dict[str, torch.Tensor] = {}
        if self.name == "dpo":
            pairs = batch["ref"] if "ref" in batch else self.reference_logps(model, batch)  # (B, 2)
            ref = torch.cat([pairs[:, 0], pairs[:, 1]])  # (2B,) as the rows
            lengths = cm.sum(1)  # ipo, sigmoid_norm: the completion's tokens, as TRL counts them
            x = PairLogps(seq[:b], seq[b:], ref[:b], ref[b:], lengths[:b], lengths[b:])
            per_pair = dpo_loss(x, cfg.loss_type, cfg.loss_weights, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                                discopop_tau=cfg.discopop_tau, chosen_nll=nll)
            logps = seq
            rewards = cfg.beta * (seq - ref).detach()
            tokens = predicted * torch.cat([weight, weight])[:, None]
            chosen_tokens = tokens[:b]
            extra["entropy"] = metric((out.entropy * tokens).sum(), tokens.sum())
            extra["mean_token_accuracy"] = metric((out.top1[:b] * chosen_tokens).sum(), chosen_tokens.sum())
        else:
            logps = seq / predicted.sum(1).clamp(min=1)  # per-token averages
            if self.name == "orpo":
                odds_loss, log_odds = orpo_odds_ratio(logps[:b], logps[b:], cfg.beta)
                per_pair = nll + odds_loss
                ratio = torch.nn.functional.logsigmoid(log_odds)
                extra["log_odds_ratio"] = metric((ratio * weight).sum(), weight.sum())
                extra["log_odds_chosen"] = metric((log_odds * weight).sum(), weight.sum())
            else:
                per_pair = simpo(logps[:b], logps[b:], cfg.beta, cfg.simpo_gamma, cfg.label_smoothing)
                if cfg.cpo_alpha:
                    per_pair = per_pair + cfg.cpo_alpha * nll
            if self.name == "orpo" or cfg.cpo_alpha:  # (pure SimPO has no NLL term to report)
                extra["nll_loss"] = metric(nll * weight.sum(), weight.sum())
            rewards = cfg.beta * logps.detach()
        metrics = pair_metrics(rewards, logps, out.mean_logit, predicted, weight)
        return (per_pair * weight).sum(), {**metrics, **extra}

    def finish(self, values: dict[str, float], eval: bool) -> dict[str, float]:
        return values

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def pair_metrics(rewards: torch.Tensor, logps: torch.Tensor, mean_logit: torch.Tensor, completion: torch.Tensor,
                 weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """rewards/*, logps/* (per pair) and logits/* (per completion token) as (sum, weight) pairs; rows
    (2B,) chosen first, `weight` (B,) per pair."""
    b = weight.shape[0]
    rc, rr = rewards[:b], rewards[b:]
    n = weight.sum()
    tokens = completion * torch.cat([weight, weight])[:, None]  # (2B, T)
    logits = (mean_logit * tokens).detach()
    return {"rewards/chosen": metric((rc * weight).sum(), n), "rewards/rejected": metric((rr * weight).sum(), n),
            "rewards/accuracies": metric(((rc > rr).float() * weight).sum(), n),
            "rewards/margins": metric(((rc - rr) * weight).sum(), n),
            "logps/chosen": metric((logps[:b] * weight).sum(), n), "logps/rejected": metric((logps[b:] * weight).sum(), n),
            "logits/chosen": metric(logits[:b].sum(), tokens[:b].sum()),
            "logits/rejected": metric(logits[b:].sum(), tokens[b:].sum())}
