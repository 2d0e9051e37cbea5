"""The training loop: adapter parameters only, token-normalised gradient accumulation.

The loss of an optimizer step is the sum of per-token losses over *all* micro-batches divided by
the number of target tokens of the whole accumulated batch, so k micro-batches of b samples give
exactly the gradient of one batch of k*b (averaging per micro-batch, as many trainers do, weights
short samples more).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lorafit.config import LoraConfig
from lorafit.errors import LorafitError
from lorafit.io import save_adapter
from lorafit.lora.inject import adapter_configs, adapter_parameters, apply_lora
from lorafit.train.data import IGNORE, Sample, collate, pad_id_for

SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainConfig:
    """The knobs of one fine-tuning run (data handling lives in `lorafit.train.data.DataConfig`)."""

    output_dir: str = "runs/lorafit"
    """Where the adapter, metrics.jsonl and the loss curve are written."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """The adapter to train."""
    epochs: float = 1.0
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Optimizer steps to run; overrides epochs."""
    batch_size: int = 8
    """Samples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (effective batch = batch_size * grad_accum)."""
    learning_rate: float = 2e-4
    """Peak learning rate; 1e-4 to 3e-4 is usual for LoRA, small tasks tolerate more."""
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    """Share of the steps spent warming the learning rate up linearly from 0."""
    schedule: str = "cosine"
    """Decay after warmup: "cosine", "linear" or "constant"."""
    max_grad_norm: float | None = 1.0
    """Clip the adapter gradients' global norm (None: no clipping)."""
    eval_steps: int | None = None
    """Evaluate on the validation samples every N steps (and at the end)."""
    logging_steps: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise LorafitError(f"TrainConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in ("batch_size", "grad_accum", "logging_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise LorafitError(f"TrainConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise LorafitError(f"TrainConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.learning_rate <= 0:
            raise LorafitError(f"TrainConfig.learning_rate must be positive, got {self.learning_rate!r}")


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1 - progress
    return 1.0


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of next-token losses over target tokens, number of target tokens) for one batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits  # (B, T, V)
    targets = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                           reduction="sum")
    return loss, int((targets != IGNORE).sum())


@torch.no_grad()
def evaluate(model: nn.Module, samples: list[Sample], pad_id: int, batch_size: int = 8) -> dict[str, float]:
    """Mean per-token validation loss and perplexity."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(samples), batch_size):
        loss, n = token_loss_sum(model, collate(samples[i:i + batch_size], pad_id))
        total, count = total + loss.item(), count + n
    model.train(was_training)
    mean = total / max(count, 1)
    return {"val_loss": mean, "val_ppl": math.exp(min(mean, 50))}


class Trainer:
    """Train one LoRA adapter on tokenized samples. Call `train()`; results land in output_dir."""

    def __init__(self, config: TrainConfig, model: nn.Module, tokenizer, train: list[Sample],
                 val: list[Sample] | None = None) -> None:
        if not train:
            raise LorafitError("no training samples: the data file yielded nothing to train on")
        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.train_samples, self.val_samples = train, val or []
        self.pad_id = pad_id_for(tokenizer)
        self.out = Path(config.output_dir)
        if "default" not in adapter_configs(model):
            apply_lora(model, config.lora)
        self.params = adapter_parameters(model)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        per_epoch = math.ceil(len(train) / (config.batch_size * config.grad_accum))
        self.total_steps = config.max_steps or max(1, math.ceil(per_epoch * config.epochs))
        self.warmup = int(config.warmup_ratio * self.total_steps)
        self.history: list[dict] = []

    def _micro_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Shuffled micro-batches, epoch after epoch, reproducible from the seed."""
        rng = random.Random(self.config.seed)
        collate_fn = partial(collate, pad_id=self.pad_id)
        while True:
            order = list(range(len(self.train_samples)))
            rng.shuffle(order)
            for i in range(0, len(order), self.config.batch_size):
                yield collate_fn([self.train_samples[j] for j in order[i:i + self.config.batch_size]])

    def train(self) -> list[dict]:
        cfg, model = self.config, self.model
        self.out.mkdir(parents=True, exist_ok=True)
        metrics_path = self.out / "metrics.jsonl"
        torch.manual_seed(cfg.seed)
        model.train()
        batches = self._micro_batches()
        bar = tqdm(range(self.total_steps), desc="training", unit="step", dynamic_ncols=True)
        for step in bar:
            start = time.perf_counter()
            micro = [next(batches) for _ in range(cfg.grad_accum)]
            n_target = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
            loss_total = 0.0
            for batch in micro:
                loss_sum, _ = token_loss_sum(model, batch)
                (loss_sum / max(n_target, 1)).backward()
                loss_total += loss_sum.item()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
            lr = cfg.learning_rate * lr_factor(step, self.total_steps, self.warmup, cfg.schedule)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - start
            tokens = sum(int(b["attention_mask"].sum()) for b in micro)
            record = {"step": step + 1, "loss": loss_total / max(n_target, 1), "lr": lr,
                      "tokens_per_s": tokens / elapsed}
            if cfg.eval_steps and self.val_samples and ((step + 1) % cfg.eval_steps == 0 or step + 1 == self.total_steps):
                record.update(evaluate(model, self.val_samples, self.pad_id, cfg.batch_size))
            self.history.append(record)
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if (step + 1) % cfg.logging_steps == 0:
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}))
        bar.close()
        model.eval()
        save_adapter(model, self.out / "adapter")
        plot_losses(self.history, self.out / "loss.png")
        return self.history


def plot_losses(history: list[dict], path: Path) -> Path:
    """Training (and validation) loss over steps as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss", lw=1)
    val = [h for h in history if "val_loss" in h]
    if val:
        ax.plot([h["step"] for h in val], [h["val_loss"] for h in val], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
