"""The training loop: adapter parameters only, token-normalised accumulation, exact resume.

The loss of an optimizer step is the sum of per-token losses over *all* its micro-batches divided
by the number of target tokens of the whole accumulated batch, so k micro-batches of b samples give
exactly the gradient of one batch of k*b (averaging per micro-batch, as many trainers do, weights
the tokens of short samples more).

A checkpoint (adapter + optimizer + RNG + data position) is written to a temporary folder and
renamed into place, so a run killed mid-save still has its previous checkpoint, and `resume=True`
continues with the same losses the uninterrupted run would have had.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lorafit.config import DEFAULT_ADAPTER
from lorafit.device import model_device, to_device
from lorafit.errors import LorafitError
from lorafit.io import read_adapter, save_adapter
from lorafit.lora.inject import adapter_parameters
from lorafit.lora.state import set_adapter_state
from lorafit.ops.chunked_loss import causal_lm_loss
from lorafit.train.config import TrainConfig
from lorafit.train.data import IGNORE, Sample, collate, pad_id_for
from lorafit.train.prepare import prepare_model

__all__ = ["TrainConfig", "Trainer", "evaluate", "latest_checkpoint", "lr_factor", "token_loss_sum"]

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
    """(sum of next-token losses over target tokens, number of target tokens) for one batch.

    When the output head is a plain nn.Linear, the loss is computed from the last hidden states in
    chunks of tokens (lorafit.ops.chunked_loss), so the (B, T, V) fp32 logits never exist at once.
    """
    targets = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
    n_target = int((targets != IGNORE).sum())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    plain_head = (isinstance(head, nn.Linear) and getattr(config, "final_logit_softcapping", None) is None
                  and getattr(config, "logit_scale", None) is None and hasattr(model, "base_model"))
    if plain_head:
        hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  position_ids=batch["position_ids"]).last_hidden_state  # (B, T, H)
        loss = causal_lm_loss(hidden, head.weight, batch["labels"], bias=head.bias, reduction="sum",
                              ignore_index=IGNORE)
        return loss, n_target
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits  # (B, T, V)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                           reduction="sum")
    return loss, n_target


@torch.no_grad()
def evaluate(model: nn.Module, samples: list[Sample], pad_id: int, batch_size: int = 8) -> dict[str, float]:
    """Mean per-token validation loss and perplexity."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(samples), batch_size):
        loss, n = token_loss_sum(model, to_device(collate(samples[i:i + batch_size], pad_id), model_device(model)))
        total, count = total + loss.item(), count + n
    model.train(was_training)
    mean = total / max(count, 1)
    return {"val_loss": mean, "val_ppl": math.exp(min(mean, 50))}


def _make_optimizer(name: str, params: list[nn.Parameter], lr: float, weight_decay: float):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise LorafitError(f"optimizer {name!r} needs bitsandbytes: `pip install bitsandbytes`, "
                           "or use optimizer: adamw") from None
    cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=lr, weight_decay=weight_decay)


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
        torch.manual_seed(config.seed)
        prepare_model(model, config)
        self.params = adapter_parameters(model)
        self.optimizer = _make_optimizer(config.optimizer, self.params, config.learning_rate, config.weight_decay)
        self.batches_per_epoch = math.ceil(len(train) / config.batch_size)
        per_epoch = math.ceil(self.batches_per_epoch / config.grad_accum)
        self.total_steps = config.max_steps or max(1, math.ceil(per_epoch * config.epochs))
        self.warmup = int(config.warmup_ratio * self.total_steps)
        self.step = 0  # optimizer steps done
        self.micro = 0  # micro-batches consumed (the data position)
        self.history: list[dict] = []
        self.best_val, self.bad_evals = math.inf, 0

    # -- data order -------------------------------------------------------------------------
    def _micro_batch(self, index: int) -> dict[str, torch.Tensor]:
        """Micro-batch number `index` of the run: epoch e shuffles with seed+e, so any position
        can be rebuilt on resume without replaying the ones before it."""
        epoch, pos = divmod(index, self.batches_per_epoch)
        order = list(range(len(self.train_samples)))
        random.Random(self.config.seed + epoch).shuffle(order)
        chosen = order[pos * self.config.batch_size:(pos + 1) * self.config.batch_size]
        return collate([self.train_samples[j] for j in chosen], self.pad_id)

    # -- one optimizer step -----------------------------------------------------------------
    def accumulate(self, micro: list[dict[str, torch.Tensor]]) -> float:
        """Backward over micro-batches with the loss normalised by the target tokens of all of
        them; returns that mean loss. Gradients are left in .grad (no optimizer step)."""
        n_target = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
        device = model_device(self.model)  # batches are built on the CPU and follow the model
        total = 0.0
        for batch in micro:
            loss_sum, _ = token_loss_sum(self.model, to_device(batch, device))
            (loss_sum / max(n_target, 1)).backward()
            total += loss_sum.item()
        return total / max(n_target, 1)

    def _optimizer_step(self) -> float:
        cfg = self.config
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        lr = cfg.learning_rate * lr_factor(self.step, self.total_steps, self.warmup, cfg.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    # -- the loop ---------------------------------------------------------------------------
    def train(self, resume: bool = False) -> list[dict]:
        cfg, model = self.config, self.model
        self.out.mkdir(parents=True, exist_ok=True)
        metrics_path = self.out / "metrics.jsonl"
        if resume and (checkpoint := latest_checkpoint(self.out)) is not None:
            self._load_checkpoint(checkpoint)
            print(f"lorafit: resumed from {checkpoint} (step {self.step} of {self.total_steps})")
        else:
            metrics_path.write_text("")  # a fresh run starts a fresh log
        model.train()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step", dynamic_ncols=True)
        while self.step < self.total_steps:
            start = time.perf_counter()
            micro = [self._micro_batch(self.micro + i) for i in range(cfg.grad_accum)]
            loss = self.accumulate(micro)
            lr = self._optimizer_step()
            self.step, self.micro = self.step + 1, self.micro + cfg.grad_accum
            tokens = sum(int(b["attention_mask"].sum()) for b in micro)
            record = {"step": self.step, "loss": loss, "lr": lr,
                      "tokens_per_s": tokens / (time.perf_counter() - start)}
            stop = False
            if cfg.eval_steps and self.val_samples and (self.step % cfg.eval_steps == 0 or self.step == self.total_steps):
                record.update(evaluate(model, self.val_samples, self.pad_id, cfg.batch_size))
                stop = self._early_stop(record["val_loss"])
            self.history.append(record)
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if self.step % cfg.logging_steps == 0:
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}))
            bar.update(1)
            if cfg.save_steps and self.step % cfg.save_steps == 0:
                self._save_checkpoint()
            if stop:
                print(f"lorafit: early stop at step {self.step}: no better validation loss in "
                      f"{cfg.early_stopping_patience} evaluations (best {self.best_val:.4f})")
                break
        bar.close()
        model.eval()
        save_adapter(model, self.out / "adapter")
        plot_losses(self.history, self.out / "loss.png")
        return self.history

    def _early_stop(self, val_loss: float) -> bool:
        if val_loss < self.best_val:
            self.best_val, self.bad_evals = val_loss, 0
            return False
        self.bad_evals += 1
        patience = self.config.early_stopping_patience
        return patience is not None and self.bad_evals >= patience

    # -- checkpoints ------------------------------------------------------------------------
    def _save_checkpoint(self) -> Path:
        root = self.out / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{self.step:08d}"
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
        try:
            save_adapter(self.model, tmp / "adapter")
            state = {"step": self.step, "micro": self.micro, "optimizer": self.optimizer.state_dict(),
                     "torch_rng": torch.get_rng_state(), "history": self.history,
                     "best_val": self.best_val, "bad_evals": self.bad_evals, "config": asdict(self.config)}
            torch.save(state, tmp / "trainer_state.pt")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)  # atomic: a checkpoint folder is either complete or absent
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in sorted(root.glob("step-*"))[:-self.config.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _load_checkpoint(self, path: Path) -> None:
        _, adapter_state = read_adapter(path / "adapter")
        set_adapter_state(self.model, DEFAULT_ADAPTER, adapter_state)
        state = torch.load(path / "trainer_state.pt", weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.micro, self.history = state["step"], state["micro"], state["history"]
        self.best_val, self.bad_evals = state["best_val"], state["bad_evals"]
        metrics = self.out / "metrics.jsonl"  # drop lines written after the checkpoint by the dead run
        metrics.write_text("".join(json.dumps(r) + "\n" for r in self.history))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (temporary folders of an interrupted save are ignored)."""
    done = sorted(p for p in (Path(output_dir) / "checkpoints").glob("step-*") if (p / "trainer_state.pt").is_file())
    return done[-1] if done else None


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
