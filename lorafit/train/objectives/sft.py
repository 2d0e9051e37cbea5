"""Supervised fine-tuning (method lora and full): the next-token loss on the trained tokens.

    loss = sum over target tokens of -log p(token | tokens before it)     (lorafit.train.loss.loss_sum)
    count = target tokens (labels[:, 1:] != IGNORE), so an accumulated batch is token-normalised

No metric besides the loss; on validation, the perplexity exp(val_loss).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorafit.train.data import Sample, collate
from lorafit.train.distributed.share import masked
from lorafit.train.loss import loss_sum, n_targets


class SFT:
    name = "sft"
    metrics: tuple[str, ...] = ()
    progress = None

    def prepare(self, samples: list[Sample]) -> list[Sample]:
        return samples

    def empty(self, sample: Sample) -> Sample:
        return masked(sample)

    def collate(self, samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
        return collate(samples, pad_id)

    def batches(self, model: nn.Module, micro: list[list[Sample]], pad_id: int) -> list[dict[str, torch.Tensor]]:
        return [collate(samples, pad_id) for samples in micro]

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return n_targets(batch)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return loss_sum(model, batch), {}

    def finish(self, values: dict[str, float], eval: bool) -> dict[str, float]:
        return {**values, "ppl": math.exp(min(values["loss"], 50))} if eval else values

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
