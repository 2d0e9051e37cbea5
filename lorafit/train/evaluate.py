"""The validation numbers of a set of samples under an objective: its loss and metrics, "val_" prefixed.

Sums over batches divided by the objective's count (target tokens for SFT, pairs or examples for the
preference objectives), as in training, so the numbers do not depend on the batch size; with several
processes each batch is shared among them as the training batches are and the sums are all-reduced.
SFT returns {"val_loss", "val_ppl"}; a preference objective its metrics too (val_rewards/accuracies...).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lorafit.device import model_device, to_device
from lorafit.train.distributed.share import local_samples
from lorafit.train.distributed.world import SINGLE, World
from lorafit.train.objectives import Objective
from lorafit.train.objectives.sft import SFT


def extreme(name: str) -> str | None:
    """"max" / "min" for a metric reduced by its largest / smallest value (its name ends so, as TRL's
    clip_ratio/high_max or sampling/sampling_logp_difference/max), else None: a (sum, weight) average."""
    return "max" if name.endswith("max") else "min" if name.endswith("min") else None


def add_metrics(sums: dict[str, torch.Tensor], metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Element-wise sums of (sum, weight) metric pairs; for an `extreme` metric, (value, weight) pairs
    reduced by max / min (weight 0: nothing to reduce, the value is -inf / inf)."""
    for name, value in metrics.items():
        kind = extreme(name)
        if name not in sums:
            sums[name] = value
        elif kind is None:
            sums[name] = sums[name] + value
        else:
            pick = torch.maximum if kind == "max" else torch.minimum
            sums[name] = torch.stack([pick(sums[name][0], value[0]), torch.maximum(sums[name][1], value[1])])
    return sums


def averages(names: list[str], values: list[float]) -> dict[str, float]:
    """{name: sum / weight} from the flattened [sum, weight, sum, weight, ...] of `names` (no entry
    where the weight is 0: a metric with nothing to average over, e.g. no desirable example)."""
    out = {}
    for i, name in enumerate(names):
        total, weight = values[2 * i], values[2 * i + 1]
        if weight > 0:
            out[name] = total / weight
    return out


@torch.no_grad()
def evaluate(model: nn.Module, samples: list, pad_id: int, batch_size: int = 8, *,
             step: Callable[[dict[str, torch.Tensor]], tuple] | None = None, world: World = SINGLE,
             objective: Objective | None = None) -> dict[str, float]:
    """Validation loss (and metrics) of `samples` under `objective` (default: SFT's loss and perplexity).

    `step(batch)` computes a batch's (loss sum, metrics) (the trainer passes its DDP / FSDP wrapper's);
    by default `objective.loss(model, batch)`."""
    objective = objective or SFT()
    was_training = model.training
    model.eval()
    device = model_device(model)
    total, count, sums = None, 0, {}  # total: an fp32 scalar on the model's device, read back once
    for i in range(0, len(samples), batch_size):
        batch = objective.collate(local_samples(samples[i:i + batch_size], world.rank, world.size, objective.empty),
                                  pad_id)
        count += objective.count(batch)
        batch = to_device(batch, device)
        loss, metrics = step(batch) if step is not None else objective.loss(model, batch)
        total = loss if total is None else total + loss
        sums = add_metrics(sums, metrics)
    model.train(was_training)
    names = sorted(sums)
    flat = [float(v) for name in names for v in sums[name].tolist()]
    values = world.sum([0.0 if total is None else total.item(), count, *flat])
    mean = values[0] / max(values[1], 1)
    result = objective.finish({"loss": mean, **averages(names, values[2:])}, eval=True)
    return {f"val_{k}": v for k, v in result.items()}
