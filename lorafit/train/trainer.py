"""The training loop: adapter parameters only, exact accumulation, exact resume, one loop for every objective.

What a batch is and what its loss is belong to the objective (lorafit.train.objectives: SFT, DPO and its
family, ORPO, SimPO, KTO); the loop asks it for the step's batches, each batch's loss sum and metric
sums, and the count that normalises them. The loss of an optimizer step is the sum of the losses over
*all* its micro-batches divided by the count of the whole accumulated batch (its target tokens for SFT,
its pairs or examples for the preference objectives), so k micro-batches of b samples give exactly the
gradient of one batch of k*b (averaging per micro-batch, as many trainers do, weights the tokens of
short samples more). Metrics are averaged the same way, each over its own weight.

A checkpoint (adapter + optimizer + RNG + data position) is written to a temporary folder and
renamed into place, so a run killed mid-save still has its previous checkpoint, and `resume=True`
continues with the same losses the uninterrupted run would have had. Ctrl-C ends the current step and
writes one too (lorafit.train.interrupt), `save_steps` or not. What output_dir may hold when a run
starts (no earlier run unless `resume` or `overwrite`) and checkpoint rotation: lorafit.train.outdir.
The RNG state is the CPU generator's and, when CUDA is in use, every CUDA device's (dropout masks on a
GPU draw from those).

Devices: the model stays where the caller put it. Batches are built on the host (`collate`), their
target tokens counted there (no device sync), then moved to the model's device (`lorafit.device.
to_device`: pinned memory, non-blocking copies on CUDA); every tensor made here takes its device from
the model or the batch. The loss is accumulated on the device and read back once per step.

Several processes (torchrun; lorafit.train.distributed): each takes its share of every micro-batch
(`lorafit.train.distributed.share`), the target tokens are counted over all of them, and the model runs
under DDP or FSDP2 (`lorafit.train.distributed.wrap.Parallel`), so N processes give the losses and adapter of
one. Rank 0 alone prints, writes metrics, checkpoints and the adapter (gathered whole from the
shards), and reads checkpoints back, sending what every rank needs; each rank keeps its own RNG
stream (dropout), saved and restored per rank.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lorafit.config import DEFAULT_ADAPTER, AdaLoraConfig
from lorafit.device import model_device, to_device
from lorafit.errors import LorafitError
from lorafit.io import read_adapter, save_adapter
from lorafit.lora.adalora import orthogonality_regularizer
from lorafit.lora.allocator import RankAllocator
from lorafit.lora.inject import adapter_configs, adapter_parameters
from lorafit.lora.state import set_adapter_state
from lorafit.paths import write_folder
from lorafit.prompt import PromptFormat, default_format
from lorafit.train.config import TrainConfig
from lorafit.train.curves import plot_losses, plot_rewards
from lorafit.train.data import Sample, pad_id_for
from lorafit.train.distributed.share import check_batch, local_samples
from lorafit.train.distributed.strategy import choose_strategy, quantization_of
from lorafit.train.distributed.world import init_world
from lorafit.train.distributed.wrap import Parallel
from lorafit.train.evaluate import add_metrics, averages, evaluate
from lorafit.train.full import MODEL_DIR, load_model_weights, save_model_folder
from lorafit.train.interrupt import StopRequest
from lorafit.train.loraplus import loraplus_param_groups
from lorafit.train.loss import loss_sum, n_targets, token_loss_sum
from lorafit.train.objectives import Objective, check_samples, make_objective
from lorafit.train.objectives.precompute import model_fingerprint, precompute_reference
from lorafit.train.order import EpochOrder
from lorafit.train.outdir import (
    STATE_NAME,
    latest_checkpoint,
    prepare_output_dir,
    resume_mismatch,
    rotate_checkpoints,
)
from lorafit.train.prepare import prepare_model, reference_slot
from lorafit.train.trackers import Trackers

__all__ = ["EpochOrder", "TrainConfig", "Trainer", "evaluate", "latest_checkpoint", "loss_sum", "lr_factor",
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


def make_optimizer(name: str, params: list[nn.Parameter] | list[dict], lr: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer `TrainConfig.optimizer` names, over `params` (parameters, or parameter groups).

    "adamw" is torch's AdamW; when every parameter is on CUDA it runs fused (`fused=True`): the same
    update, written by one kernel over all parameters instead of a chain of elementwise ones per step.
    "adamw8bit" / "paged_adamw8bit" are bitsandbytes' (8-bit states, ~2 B per parameter instead of 8).
    """
    if name == "adamw":
        flat = [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) else params
        fused = bool(flat) and all(p.is_cuda for p in flat)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True if fused else None)
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise LorafitError(f"optimizer {name!r} needs bitsandbytes: `pip install bitsandbytes`, "
                           "or use optimizer: adamw") from None
    cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=lr, weight_decay=weight_decay)


class Trainer:
    """Train one LoRA adapter (or, with `method: full`, every weight) on tokenized samples under the
    objective of `config.method` (or `objective`). Call `train()`; results land in output_dir (adapter/,
    or model/ for a full fine-tune).

    `model` is the base as `lorafit.model.load_model` returns it (quantized or not); the Trainer
    applies `config.lora` itself unless the model already has an adapter. `train` and `val` are the
    tokenized samples of `lorafit.train.data.load_data` (`Splits.train`, `Splits.val`), and
    `prompt_format` how their prompts were rendered (`Splits.prompt_format`; saved beside the adapter so
    generation and serving prompt as training did). Under torchrun it joins the process group itself.
    """

    def __init__(self, config: TrainConfig, model: nn.Module, tokenizer, train: list[Sample],
                 val: list[Sample] | None = None, prompt_format: PromptFormat | None = None,
                 objective: Objective | None = None) -> None:
        if not train:
            raise LorafitError("no training samples: the data file yielded nothing to train on")
        check_samples(config.method, train)
        self.world = world = init_world(model_device(model), config.collective_timeout)
        check_batch(config.batch_size, world.size)
        if world.distributed and any(isinstance(c, AdaLoraConfig)
                                     for c in (config.lora, adapter_configs(model).get(DEFAULT_ADAPTER))):
            raise LorafitError("lora: AdaLoRA trains in one process (its rank allocator reads every layer's whole "
                               "gradients); run it without torchrun / --nproc-per-node, or train LoRA")
        self.config, self.model, self.tokenizer = config, model, tokenizer
        # how the samples' prompts were rendered (`Splits.prompt_format`), saved next to the adapter
        self.prompt_format = prompt_format or default_format(tokenizer)
        self.pad_id = pad_id_for(tokenizer)
        self.out = Path(config.output_dir)
        torch.manual_seed(config.seed)
        strategy = "single"
        if world.distributed:
            strategy, why = choose_strategy(
                config.distributed, world.size, getattr(model, "config", None), quantize=quantization_of(model), rank=config.lora.r,
                batch_size=config.batch_size, seq=max(len(s) for s in train), device=world.device,
                dtype=next(model.parameters()).dtype, checkpointing=config.gradient_checkpointing)
            if world.is_main and config.distributed == "auto":  # (lorafit train decides and says so itself)
                print(f"lorafit: {world.size} processes ({world.device.type}), distributed: {strategy} ({why})")
        prepare_model(model, config, device=world.device if strategy == "fsdp" else None)
        self.objective = objective or make_objective(config, reference_slot(model), world)
        self.train_samples, self.val_samples = self.objective.prepare(train), self.objective.prepare(val or [])
        self.fingerprint = model_fingerprint(model) if config.precompute_ref_log_probs else ""  # before sharding
        self.parallel = Parallel(model, self.objective.loss, world, strategy)
        if world.rank:  # each rank its own random stream (dropout masks); rank 0 keeps the seed's
            torch.manual_seed(config.seed + world.rank)
        self.params = adapter_parameters(model)  # after wrapping: FSDP replaced them by their shards
        groups = self.params if config.loraplus_lr_ratio is None else loraplus_param_groups(model, config.loraplus_lr_ratio)
        self.optimizer = make_optimizer(config.optimizer, groups, config.learning_rate, config.weight_decay)
        self.order = EpochOrder(len(train), config.batch_size, config.seed)
        self.batches_per_epoch = self.order.batches_per_epoch
        per_epoch = math.ceil(self.batches_per_epoch / config.grad_accum)
        self.total_steps = config.max_steps or max(1, math.ceil(per_epoch * config.epochs))
        self.warmup = int(config.warmup_ratio * self.total_steps)
        self.allocator = None  # AdaLoRA: regularizer in the loss, rank allocation after each optimizer step
        adapter_config = adapter_configs(model).get(DEFAULT_ADAPTER)
        if isinstance(adapter_config, AdaLoraConfig):
            adapter_config.total_step = adapter_config.total_step or self.total_steps
            self.allocator = RankAllocator(model, adapter_config, DEFAULT_ADAPTER, adapter_config.total_step)
        self.step = 0  # optimizer steps done
        self.micro = 0  # micro-batches consumed (the data position)
        self.history: list[dict] = []
        self.metrics: dict[str, float] = {}  # the objective's metrics of the last step (`accumulate`)
        self.best_val, self.bad_evals = math.inf, 0
        self.grad_norm: float | None = None  # of the last optimizer step, when clipping is on

    # -- data order -------------------------------------------------------------------------
    def _micro_samples(self, index: int) -> list:
        """This rank's share of the samples of micro-batch number `index` of the run (see `EpochOrder`;
        one process: the whole micro-batch)."""
        samples = [self.train_samples[j] for j in self.order.indices(index)]
        return local_samples(samples, self.world.rank, self.world.size, self.objective.empty)

    def _micro_batch(self, index: int) -> dict[str, torch.Tensor]:
        """This rank's share of micro-batch number `index`, collated on the host."""
        return self.objective.collate(self._micro_samples(index), self.pad_id)

    # -- one optimizer step -----------------------------------------------------------------
    def accumulate(self, micro: list[dict[str, torch.Tensor]]) -> float:
        """Backward over micro-batches with the loss normalised by the objective's count of all of them
        (target tokens, pairs, examples); returns that mean loss, and leaves the step's averaged metrics
        in `self.metrics`. Gradients are left in .grad (no optimizer step).

        The batches may be on the host: they are counted there, then all of them are sent to the
        model's device at once (non-blocking on CUDA, so later copies overlap the first backward).
        With several processes `micro` is this rank's share, the count, the loss and the metric sums
        are summed over all ranks, and each rank's loss is divided by count / N
        (lorafit.train.distributed.share)."""
        world = self.world
        n_target = max(int(world.sum([sum(self.objective.count(b) for b in micro)])[0]), 1)
        share = n_target / world.size  # DDP / FSDP average the ranks' gradients: N / n_target each
        device = model_device(self.model)
        total, sums = None, {}  # fp32 sums on the device: one sync per step, at the end
        for i, batch in enumerate([to_device(b, device) for b in micro]):
            with self.parallel.accumulating(last=i == len(micro) - 1):
                loss, metrics = self.parallel.loss(batch)
                (loss / share).backward()
            total = loss.detach() if total is None else total + loss.detach()
            sums = add_metrics(sums, metrics)
        if self.allocator is not None and self.allocator.config.orth_reg_weight > 0:  # AdaLoRA: once per step
            (self.allocator.config.orth_reg_weight * orthogonality_regularizer(self.model, DEFAULT_ADAPTER)).backward()
        names = sorted(sums)
        values = world.sum(torch.cat([total.reshape(1), *(sums[n] for n in names)]).tolist())
        self.metrics = averages(names, values[1:])
        return values[0] / n_target

    def _optimizer_step(self) -> float:
        cfg = self.config
        if cfg.max_grad_norm:  # the norm before clipping, logged as grad_norm (a DTensor under FSDP)
            norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
            self.grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        lr = cfg.learning_rate * lr_factor(self.step, self.total_steps, self.warmup, cfg.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_ratio", 1.0)  # LoRA+: B's group runs at a multiple
        self.optimizer.step()
        if self.allocator is not None:  # importance from these gradients, before they are cleared
            self.allocator.update_and_allocate(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    # -- the loop ---------------------------------------------------------------------------
    def train(self, resume: bool = False, overwrite: bool = False) -> list[dict]:
        """Run the loop to `max_steps` (or `epochs`), then write the adapter (or model/), loss.png and the
        model card to output_dir; returns the per-step records also written to metrics.jsonl (step,
        loss, lr, tokens_per_s, grad_norm, epoch; val_loss and val_ppl at evaluations).

        `resume=True` continues from the newest checkpoint in output_dir (there must be one: the adapter,
        the optimizer's states, the RNG states and the data position), so the run goes on as if it had
        never stopped; `overwrite=True` deletes an earlier run's files there first (without either,
        output_dir must hold no earlier run: lorafit.train.outdir). Ctrl-C ends the current step, writes a
        checkpoint and raises KeyboardInterrupt."""
        cfg, model, world = self.config, self.model, self.world
        main = world.is_main
        metrics_path = self.out / "metrics.jsonl"
        try:  # rank 0 decides, every rank learns the outcome (an error on rank 0 alone would hang the others)
            prepared = ("ok", prepare_output_dir(self.out, resume, overwrite)) if main else None
        except LorafitError as e:
            prepared = ("error", str(e))
        outcome, checkpoint = world.broadcast(prepared)
        if outcome == "error":
            raise LorafitError(checkpoint)
        if checkpoint is not None and self.allocator is not None:
            raise LorafitError(f"{self.out}: resuming an AdaLoRA run is not supported (the rank allocator's importance "
                               "averages are not checkpointed); start it again, or load its checkpoint's adapter")
        if checkpoint is not None:
            self._load_checkpoint(checkpoint)
            if main:
                print(f"lorafit: resumed from {checkpoint} (step {self.step} of {self.total_steps})")
        elif main:
            metrics_path.write_text("")  # a fresh run starts a fresh log
        if cfg.precompute_ref_log_probs:
            self._precompute_reference()
        trackers = Trackers(cfg.report_to if main else [], self.out, self.run_info())  # rank 0's dashboards
        model.train()
        bar = tqdm(total=self.total_steps, initial=self.step, desc="training", unit="step", dynamic_ncols=True,
                   disable=not main)
        with StopRequest() as interrupt:
            try:
                self._loop(bar, interrupt, trackers)
            finally:  # an interrupt too: the bar ends its line, the trackers flush what they have
                bar.close()
                trackers.close()
        model.eval()
        with self.parallel.full_params():  # every rank takes part in gathering the shards; rank 0 writes
            if main:
                self._save_weights(self.out, tokenizer=self.tokenizer)
                plot_losses(self.history, self.out / "loss.png")
                if self.history and any(k.startswith("rewards/") for k in self.history[-1]):
                    plot_rewards(self.history, self.out / "rewards.png")
        return self.history

    def _loop(self, bar, interrupt: StopRequest, trackers: Trackers) -> None:
        """Optimizer steps until the last one, an early stop or an interrupt (checkpoint, then
        KeyboardInterrupt)."""
        cfg, model, world, main = self.config, self.model, self.world, self.world.is_main
        metrics_path = self.out / "metrics.jsonl"
        saved = None  # the step of the newest checkpoint written
        while self.step < self.total_steps:
            start = time.perf_counter()
            indices = range(self.micro, self.micro + cfg.grad_accum)
            micro = self.objective.batches(model, [self._micro_samples(i) for i in indices], self.pad_id)
            loss = self.accumulate(micro)
            lr = self._optimizer_step()
            tokens = sum(len(self.train_samples[j]) for i in indices for j in self.order.indices(i))  # all ranks'
            self.step, self.micro = self.step + 1, self.micro + cfg.grad_accum
            record = {"step": self.step, **self.objective.finish({"loss": loss, **self.metrics}, eval=False),
                      "lr": lr, "tokens_per_s": tokens / (time.perf_counter() - start),
                      **({"grad_norm": self.grad_norm} if self.grad_norm is not None else {}),
                      "epoch": self.micro / self.batches_per_epoch}
            stop = False
            if self.val_samples and ((cfg.eval_steps and self.step % cfg.eval_steps == 0) or self.step == self.total_steps):
                record.update(evaluate(model, self.val_samples, self.pad_id, cfg.eval_batch_size or cfg.batch_size,
                                       step=self.parallel.loss, world=world, objective=self.objective))
                self.parallel.after_eval()
                stop = self._early_stop(record["val_loss"])  # the same all-reduced loss on every rank
            self.history.append(record)
            if main:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                trackers.log(record)
            if self.step % cfg.logging_steps == 0:
                shown = self.objective.progress
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                **({shown[1]: f"{record[shown[0]]:.2f}"} if shown and shown[0] in record else {}),
                                **({"val": f"{record['val_loss']:.3f}"} if "val_loss" in record else {}))
            bar.update(1)
            if cfg.save_steps and self.step % cfg.save_steps == 0:
                self._save_checkpoint()
                saved = self.step
            if interrupt.requested if not world.distributed else world.sum([float(interrupt.requested)])[0] > 0:
                folder = self._save_checkpoint() if saved != self.step else latest_checkpoint(self.out)
                if main:
                    print(f"lorafit: interrupted after step {self.step} of {self.total_steps}; checkpoint {folder} "
                          "written: run the same command with --resume to continue", flush=True)
                raise KeyboardInterrupt
            if stop:
                if main:
                    print(f"lorafit: early stop at step {self.step}: no better validation loss in "
                          f"{cfg.early_stopping_patience} evaluations (best {self.best_val:.4f})")
                break

    def _precompute_reference(self) -> None:
        """Reference log-probs of every training and validation sample, once (objectives.precompute)."""
        cfg = self.config
        key = f"{self.objective.name}:{reference_slot(self.model)}:{self.fingerprint}"
        size = cfg.eval_batch_size or cfg.batch_size

        def run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            out = self.parallel.call(self.objective.reference_logps, batch)
            self.parallel.after_eval()
            return out

        for name in ("train", "val"):
            samples = getattr(self, f"{name}_samples")
            setattr(self, f"{name}_samples", precompute_reference(
                samples, run, self.objective, self.model, self.pad_id, size, self.out / "reference", key,
                self.world, name))

    def _early_stop(self, val_loss: float) -> bool:
        if val_loss < self.best_val:
            self.best_val, self.bad_evals = val_loss, 0
            return False
        self.bad_evals += 1
        patience = self.config.early_stopping_patience
        return patience is not None and self.bad_evals >= patience

    def run_info(self) -> dict:
        """The run's resolved configuration (the trackers' hyperparameters, the model card's): this
        TrainConfig, the objective (the card's method tag), the base and its quantization, the data's size and
        the steps."""
        return {**asdict(self.config), "objective": self.objective.name,
                "model": getattr(getattr(self.model, "config", None), "_name_or_path", None),
                "quantize": quantization_of(self.model), "train_samples": len(self.train_samples),
                "val_samples": len(self.val_samples), "total_steps": self.total_steps}

    # -- checkpoints ------------------------------------------------------------------------
    def _save_weights(self, folder: Path, tokenizer=None) -> Path:
        """What trained: the adapter (folder/adapter) or, for a full fine-tune, the model (folder/model)."""
        if self.config.method == "full":
            return save_model_folder(self.model, folder / MODEL_DIR, tokenizer)
        return save_adapter(self.model, folder / "adapter", prompt_format=self.prompt_format,
                            training={**self.run_info(), "history": self.history})

    def _save_checkpoint(self) -> Path | None:
        """Every rank calls it (the optimizer states, RNG states and adapter shards are gathered);
        rank 0 writes the checkpoint and returns its folder, the others return None."""
        optimizer = self.parallel.optimizer_state(self.optimizer)  # whole, keyed by name, on rank 0
        rngs = self.world.gather((torch.get_rng_state(), _cuda_rng_states()))
        with self.parallel.full_params():
            if not self.world.is_main:
                return None
            root = self.out / "checkpoints"
            state = {"step": self.step, "micro": self.micro, "optimizer": optimizer, "torch_rng": rngs[0][0],
                     "cuda_rng": rngs[0][1], "rank_rng": rngs, "world_size": self.world.size,
                     "history": self.history, "best_val": self.best_val, "bad_evals": self.bad_evals,
                     "config": asdict(self.config), "objective": self.objective.state_dict()}

            def write(folder: Path) -> None:
                self._save_weights(folder)
                torch.save(state, folder / STATE_NAME)
            # atomic: a checkpoint folder is either complete or absent
            final = write_folder(root / f"step-{self.step:08d}", write)
        rotate_checkpoints(self.out, final, self.config.save_total_limit)  # never `final`, never a later step
        return final

    def _load_checkpoint(self, path: Path) -> None:
        """Rank 0 reads the checkpoint and sends every rank its part: the adapter (into each rank's
        shard or replica), the optimizer states, its own RNG state and the loop's position. A checkpoint
        of another number of processes resumes too (everything in it is whole, and the global batches
        do not depend on the number of processes); only ranks beyond the saved ones start new RNG streams."""
        main, world = self.world.is_main, self.world
        # on the host first: the optimizer moves its states to its parameters' devices itself
        state = torch.load(path / STATE_NAME, weights_only=False, map_location="cpu") if main else {}
        differ = resume_mismatch(state.get("config") or {}, asdict(self.config)) if main else None
        differ = world.broadcast(differ)  # every rank stops, not rank 0 alone
        if differ:
            raise LorafitError(f"{path}: this checkpoint was written with {differ}; resume with the settings it "
                               "was trained with, or start over with --overwrite (or another output_dir)")
        with self.parallel.full_params(write_back=True):
            if main and self.config.method == "full":
                load_model_weights(self.model, path / MODEL_DIR)
            elif main:
                _, adapter_state = read_adapter(path / "adapter")
                set_adapter_state(self.model, DEFAULT_ADAPTER, adapter_state)
        self.parallel.load_optimizer_state(self.optimizer, state.pop("optimizer", None))
        rngs = state.get("rank_rng") or [(state.get("torch_rng"), state.get("cuda_rng"))]
        mine = world.scatter([rngs[r] if r < len(rngs) else None for r in range(world.size)] if main else None)
        if mine is not None:
            torch.set_rng_state(mine[0])
            _set_cuda_rng_states(mine[1])
        self.objective.load_state_dict(world.broadcast(state.get("objective", {}) if main else None))
        keys = ("step", "micro", "history", "best_val", "bad_evals")
        meta = world.broadcast({**{k: state[k] for k in keys}, "world_size": state.get("world_size", 1)} if main else None)
        self.step, self.micro, self.history = meta["step"], meta["micro"], meta["history"]
        self.best_val, self.bad_evals = meta["best_val"], meta["bad_evals"]
        if main:
            metrics = self.out / "metrics.jsonl"  # drop lines written after the checkpoint by the dead run
            metrics.write_text("".join(json.dumps(r) + "\n" for r in self.history))
            if meta["world_size"] != world.size:
                print(f"lorafit: {path} was written by {meta['world_size']} process(es), resuming on {world.size}: "
                      "adapter, optimizer states and data position carry over")


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


