"""KTO on unpaired examples (method kto): desirable and undesirable completions, no pairs needed.

Each example (x, y, label) gets a mismatched completion y' for the KL term (`prepare`): in groups of
batch_size examples in file order, example i takes example i-1's completion (the first takes the
last's), exactly as TRL 1.16 builds its KL dataset; the trainer's shuffling then mixes the groups.
With h = log pi(y|x) - log pi_ref(y|x), the batch's KL estimate is

    z0 = max(0, mean over the batch of [log pi(y'|x) - log pi_ref(y'|x)])     (no gradient; over all
                                                                              processes of the batch)

and each example's loss is lorafit.train.objectives.losses.kto (desirable: w_D (1 - sigma(beta (h - z0))),
undesirable: w_U (1 - sigma(beta (z0 - h)))), averaged over the examples of the accumulated batch.
The policy's y' forward and both reference forwards keep no activations (no_grad); the two reference
rows of an example go in one forward.

Metrics (TRL's names): kl, rewards/chosen and logps/chosen (desirable examples: beta h and log pi),
rewards/rejected and logps/rejected (undesirable), rewards/margins (their difference), logits/chosen,
logits/rejected (mean logit per completion token), entropy.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lorafit.train.config import PreferenceConfig
from lorafit.train.data import UnpairedSample
from lorafit.train.objectives import metric
from lorafit.train.objectives.logps import reference, token_logps
from lorafit.train.objectives.losses import kto


def pair_kl_completions(samples: list[UnpairedSample], group: int) -> list[UnpairedSample]:
    """Each sample with its mismatched completion: the previous one's within its group of `group`."""
    out = []
    for start in range(0, len(samples), group):
        part = samples[start:start + group]
        shifted = [part[-1].completion_ids] + [s.completion_ids for s in part[:-1]]
        out += [dataclasses.replace(s, kl_completion_ids=kl) for s, kl in zip(part, shifted)]
    return out


def collate_unpaired(samples: list[UnpairedSample], pad_id: int) -> dict[str, torch.Tensor]:
    """2B right-padded host rows, the completions first and their KL completions after them:
    input_ids, attention_mask, position_ids, completion_mask; label (B,) bool, weight (B,), and ref
    (B, 2) when every sample carries precomputed reference log-probs."""
    rows = [s.rows() for s in samples]
    ordered = [r[0] for r in rows] + [r[-1] for r in rows]
    n, width = len(ordered), max(len(ids) for ids, _ in ordered)
    host = torch.device("cpu")
    input_ids = torch.full((n, width), pad_id, dtype=torch.long, device=host)
    attention = torch.zeros((n, width), dtype=torch.long, device=host)
    completion = torch.zeros((n, width), dtype=torch.long, device=host)
    for i, (ids, mask) in enumerate(ordered):
        input_ids[i, :len(ids)] = torch.tensor(ids, device=host)
        attention[i, :len(ids)] = 1
        completion[i, :len(ids)] = torch.tensor(mask, device=host)
    batch = {"input_ids": input_ids, "attention_mask": attention,
             "position_ids": torch.arange(width, device=host).repeat(n, 1), "completion_mask": completion,
             "label": torch.tensor([s.label for s in samples], dtype=torch.bool, device=host),
             "weight": torch.tensor([s.weight for s in samples], dtype=torch.float32, device=host)}
    if all(s.ref_logps is not None for s in samples):
        batch["ref"] = torch.tensor([s.ref_logps for s in samples], dtype=torch.float32, device=host)  # (B, 2)
    return batch


def rows(batch: dict[str, torch.Tensor], part: slice) -> dict[str, torch.Tensor]:
    return {k: batch[k][part] for k in ("input_ids", "attention_mask", "position_ids", "completion_mask")}


class KTO:
    """The objective of method kto (see the module docstring)."""

    name = "kto"
    metrics = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
               "logits/chosen", "logits/rejected", "entropy")
    progress = ("rewards/margins", "margin")

    def __init__(self, config: PreferenceConfig, group: int, reference_adapter: str | None = None,
                 world=None) -> None:
        self.config, self.group, self.reference_adapter, self.world = config, group, reference_adapter, world
        self.loss_type = config.loss_type[0]

    def prepare(self, samples: list[UnpairedSample]) -> list[UnpairedSample]:
        return pair_kl_completions(samples, self.group)

    def empty(self, sample: UnpairedSample) -> UnpairedSample:
        return dataclasses.replace(sample, weight=0.0)

    def collate(self, samples: list[UnpairedSample], pad_id: int) -> dict[str, torch.Tensor]:
        return collate_unpaired(samples, pad_id)

    def batches(self, model: nn.Module, micro: list[list[UnpairedSample]], pad_id: int) -> list[dict[str, torch.Tensor]]:
        return [collate_unpaired(samples, pad_id) for samples in micro]

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["weight"].sum())

    def reference_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, 2): each example's completion and KL completion log-probs under the reference."""
        completion = batch["completion_mask"]
        with torch.no_grad(), reference(model, self.reference_adapter):
            seq = (token_logps(model, batch, completion).logp * completion).sum(1)  # (2B,)
        return seq.view(2, -1).t()

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.config
        weight, label = batch["weight"], batch["label"]
        b = weight.shape[0]
        main = rows(batch, slice(0, b))
        cm = main["completion_mask"].float()
        out = token_logps(model, main, main["completion_mask"], stats=True)
        seq = (out.logp * cm).sum(1)  # (B,)
        predicted = cm.clone()
        predicted[:, 0] = 0  # the tokens with a prediction (position 0 has none: an empty prompt)
        ref = batch["ref"] if "ref" in batch else self.reference_logps(model, batch)  # (B, 2)
        kl = torch.zeros((), device=seq.device)
        if self.loss_type == "kto":
            mismatched = rows(batch, slice(b, 2 * b))
            with torch.no_grad():
                kl_seq = (token_logps(model, mismatched, mismatched["completion_mask"]).logp
                          * mismatched["completion_mask"]).sum(1)
            total, n = ((kl_seq - ref[:, 1]) * weight).sum(), weight.sum()
            if self.world is not None and self.world.distributed:
                total, n = (torch.tensor(v, device=seq.device) for v in self.world.sum([total.item(), n.item()]))
            kl = (total / n.clamp(min=1)).clamp(min=0).float()
        logratio = seq - ref[:, 0]
        per = kto(logratio, label, kl, cfg.beta, self.loss_type, cfg.desirable_weight, cfg.undesirable_weight)
        rewards = cfg.beta * logratio.detach()
        good, bad = weight * label, weight * ~label
        tokens = predicted * weight[:, None]
        logits = (out.mean_logit * tokens).detach()
        metrics = {"kl": metric(kl, 1.0),
                   "rewards/chosen": metric((rewards * good).sum(), good.sum()),
                   "rewards/rejected": metric((rewards * bad).sum(), bad.sum()),
                   "logps/chosen": metric((seq * good).sum(), good.sum()),
                   "logps/rejected": metric((seq * bad).sum(), bad.sum()),
                   "logits/chosen": metric((logits * label[:, None]).sum(), (tokens * label[:, None]).sum()),
                   "logits/rejected": metric((logits * ~label[:, None]).sum(), (tokens * ~label[:, None]).sum()),
                   "entropy": metric((out.entropy * tokens).sum(), tokens.sum())}
        return (per * weight).sum(), metrics

    def finish(self, values: dict[str, float], eval: bool) -> dict[str, float]:
        if "rewards/chosen" in values and "rewards/rejected" in values:
            values = {**values, "rewards/margins": values["rewards/chosen"] - values["rewards/rejected"]}
        return values

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
