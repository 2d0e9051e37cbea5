"""The training loop: adapter parameters only, token-normalised accumulation, exact resume.

The loss of an optimizer step is the sum of per-token losses over *all* its micro-batches divided
by the number of target tokens of the whole accumulated batch, so k micro-batches of b samples give
exactly the gradient of one batch of k*b (averaging per micro-batch, as many trainers do, weights
the tokens of short samples more).

A checkpoint (adapter + optimizer + RNG + data position) is written to a temporary folder and
renamed into place, so a run killed mid-save still has its previous checkpoint, and `resume=True`
continues with the same losses the uninterrupted run would have had. The RNG state is the CPU
generator's and, when CUDA is in use, every CUDA device's (dropout masks on a GPU draw from those).

Devices: the model stays where the caller put it. Batches are built on the host (`collate`), their
target tokens counted there (no device sync), then moved to the model's device (`lorafit.device.
to_device`: pinned memory, non-blocking copies on CUDA); every tensor made here takes its device from
the model or the batch. The loss is accumulated on the device and read back once per step.
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
from lorafit.train.full import MODEL_DIR, load_model_weights, save_model_folder
from lorafit.train.prepare import prepare_model

__all__ = ["EpochOrder", "TrainConfig", "Trainer", "evaluate", "latest_checkpoint", "lr_factor",
           "make_optimizer", "n_targets", "token_loss_sum"]


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


def n_targets(batch: dict[str, torch.Tensor]) -> int:
    """Target tokens of a batch: labels[:, 1:] that are not IGNORE (position t predicts token t+1).
    Count them on the host batch: on a device batch `int()` would wait for the device."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of next-token losses over target tokens, number of target tokens) for one batch.

    The batch may be on the host: its targets are counted there and it is moved to the model's
    device. The loss is an fp32 scalar on that device whatever the model's dtype.
    """
    n_target = n_targets(batch)
    return loss_sum(model, to_device(batch, model_device(model))), n_target


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token losses over the target tokens of a batch already on the model's device (fp32).

    When the output head is a plain nn.Linear, the loss is computed from the last hidden states in
    chunks of tokens (lorafit.ops.chunked_loss), so the (B, T, V) fp32 logits never exist at once;
    otherwise from the model's logits, upcast to fp32 before the cross-entropy.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    plain_head = (isinstance(head, nn.Linear) and getattr(config, "final_logit_softcapping", None) is None
                  and getattr(config, "logit_scale", None) is None and hasattr(model, "base_model"))
    if plain_head:
        hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  position_ids=batch["position_ids"]).last_hidden_state  # (B, T, H)
        return causal_lm_loss(hidden, head.weight, batch["labels"], bias=head.bias, reduction="sum",
                              ignore_index=IGNORE)  # fp32: the chunks' logits are upcast before the softmax
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits  # (B, T, V)
    targets = batch["labels"][:, 1:]  # (B, T-1)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                           reduction="sum")


@torch.no_grad()
def evaluate(model: nn.Module, samples: list[Sample], pad_id: int, batch_size: int = 8) -> dict[str, float]:
    """Mean per-token validation loss and perplexity."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    total, count = None, 0  # total: an fp32 scalar on the model's device, read back once
    for i in range(0, len(samples), batch_size):
        batch = collate(samples[i:i + batch_size], pad_id)
        count += n_targets(batch)
        loss = loss_sum(model, to_device(batch, device))
        total = loss if total is None else total + loss
    model.train(was_training)
    mean = (0.0 if total is None else total.item()) / max(count, 1)
    return {"val_loss": mean, "val_ppl": math.exp(min(mean, 50))}


def make_optimizer(name: str, params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer `TrainConfig.optimizer` names, over `params`.

    "adamw" is torch's AdamW; when every parameter is on CUDA it runs fused (`fused=True`): the same
    update, written by one kernel over all parameters instead of a chain of elementwise ones per step.
    "adamw8bit" / "paged_adamw8bit" are bitsandbytes' (8-bit states, ~2 B per parameter instead of 8).
    """
    if name == "adamw":
        fused = bool(params) and all(p.is_cuda for p in params)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True if fused else None)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise LorafitError(f"optimizer {name!r} needs bitsandbytes: `pip install bitsandbytes`, "
                           "or use optimizer: adamw") from None
    cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=lr, weight_decay=weight_decay)


class Trainer:
    """Train one LoRA adapter (or, with `method: full`, every weight) on tokenized samples. Call
    `train()`; results land in output_dir (adapter/, or model/ for a full fine-tune)."""

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
        self.optimizer = make_optimizer(config.optimizer, self.params, config.learning_rate, config.weight_decay)
        self.order = EpochOrder(len(train), config.batch_size, config.seed)
        self.batches_per_epoch = self.order.batches_per_epoch
        per_epoch = math.ceil(self.batches_per_epoch / config.grad_accum)
        self.total_steps = config.max_steps or max(1, math.ceil(per_epoch * config.epochs))
        self.warmup = int(config.warmup_ratio * self.total_steps)
        self.step = 0  # optimizer steps done
        self.micro = 0  # micro-batches consumed (the data position)
        self.history: list[dict] = []
        self.best_val, self.bad_evals = math.inf, 0

    # -- data order -------------------------------------------------------------------------
    def _micro_batch(self, index: int) -> dict[str, torch.Tensor]:
        """Micro-batch number `index` of the run, collated on the host (see `EpochOrder`)."""
        return collate([self.train_samples[j] for j in self.order.indices(index)], self.pad_id)

    # -- one optimizer step -----------------------------------------------------------------
    def accumulate(self, micro: list[dict[str, torch.Tensor]]) -> float:
        """Backward over micro-batches with the loss normalised by the target tokens of all of
        them; returns that mean loss. Gradients are left in .grad (no optimizer step).

        The batches may be on the host: targets are counted there, then all of them are sent to the
        model's device at once (non-blocking on CUDA, so later copies overlap the first backward)."""
        n_target = max(sum(n_targets(b) for b in micro), 1)
        device = model_device(self.model)
        total = None  # fp32 scalar on the device: one sync per step, at the end
        for batch in [to_device(b, device) for b in micro]:
            loss = loss_sum(self.model, batch)
            (loss / n_target).backward()
            total = loss.detach() if total is None else total + loss.detach()
        return total.item() / n_target

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
        self._save_weights(self.out, tokenizer=self.tokenizer)
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
    def _save_weights(self, folder: Path, tokenizer=None) -> Path:
        """What trained: the adapter (folder/adapter) or, for a full fine-tune, the model (folder/model)."""
        if self.config.method == "full":
            return save_model_folder(self.model, folder / MODEL_DIR, tokenizer)
        return save_adapter(self.model, folder / "adapter")

    def _save_checkpoint(self) -> Path:
        root = self.out / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{self.step:08d}"
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
        try:
            self._save_weights(tmp)
            state = {"step": self.step, "micro": self.micro, "optimizer": self.optimizer.state_dict(),
                     "torch_rng": torch.get_rng_state(), "cuda_rng": _cuda_rng_states(), "history": self.history,
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
        if self.config.method == "full":
            load_model_weights(self.model, path / MODEL_DIR)
        else:
            _, adapter_state = read_adapter(path / "adapter")
            set_adapter_state(self.model, DEFAULT_ADAPTER, adapter_state)
        # on the host first: the optimizer moves its states to its parameters' devices itself
        state = torch.load(path / "trainer_state.pt", weights_only=False, map_location="cpu")
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        _set_cuda_rng_states(state.get("cuda_rng"))
        self.step, self.micro, self.history = state["step"], state["micro"], state["history"]
        self.best_val, self.bad_evals = state["best_val"], state["bad_evals"]
        metrics = self.out / "metrics.jsonl"  # drop lines written after the checkpoint by the dead run
        metrics.write_text("".join(json.dumps(r) + "\n" for r in self.history))


def _cuda_rng_states() -> list[torch.Tensor] | None:
    """Every CUDA device's generator state, or None when this process has not initialised CUDA (a CPU
    run on a machine with a GPU must not create a CUDA context just to save an unused state)."""
    return torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None


def _set_cuda_rng_states(states: list[torch.Tensor] | None) -> None:
    """Restore what `_cuda_rng_states` saved, on the devices this process sees (a checkpoint of a CPU
    run has none, and a CPU-only process resuming a GPU run has nothing to restore them to)."""
    if not states or not torch.cuda.is_available():
        return
    for index, rng in enumerate(states[:torch.cuda.device_count()]):
        torch.cuda.set_rng_state(rng, index)


class EpochOrder:
    """Which samples micro-batch `index` of a run holds.

    Epoch e is the permutation `random.Random(seed + e).shuffle(range(n_samples))`, cut into batches of
    `batch_size` (the last one of an epoch may be shorter), so any position can be rebuilt on resume
    without replaying the ones before it. The permutation is computed once per epoch and kept (a
    micro-batch costs O(batch_size), not a shuffle of the whole data set).
    """

    def __init__(self, n_samples: int, batch_size: int, seed: int) -> None:
        self.n_samples, self.batch_size, self.seed = n_samples, batch_size, seed
        self.batches_per_epoch = math.ceil(n_samples / batch_size)
        self._epoch, self._order = -1, []

    def epoch(self, epoch: int) -> list[int]:
        """The order of all samples in epoch `epoch` (the cached list: do not modify it)."""
        if epoch != self._epoch:
            order = list(range(self.n_samples))
            random.Random(self.seed + epoch).shuffle(order)
            self._epoch, self._order = epoch, order
        return self._order

    def indices(self, index: int) -> list[int]:
        """Sample indices of micro-batch `index` (counted from the start of the run)."""
        epoch, pos = divmod(index, self.batches_per_epoch)
        return self.epoch(epoch)[pos * self.batch_size:(pos + 1) * self.batch_size]


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
