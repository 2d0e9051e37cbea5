"""The training loop: adapter parameters only, exact accumulation, exact resume, one loop for every objective.

What a batch is and what its loss is belong to the objective (lorafit.train.objectives: SFT, DPO and its
family, ORPO, SimPO, KTO, GRPO); the loop asks it for the step's batches, each batch's loss sum and metric
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
GPU draw from those). Its files are safetensors and JSON only (`lorafit.train.state_files`): resuming runs no code from
them. Rotation keeps the newest `save_total_limit` checkpoints and the one with the best validation
loss; `load_best_at_end` makes that one the saved adapter when it beats the final weights. Writing,
rotating and reading checkpoints: lorafit.train.checkpoints.

Non-finite steps: the loss and the gradient norm before clipping are checked at every optimizer
step. With `nonfinite: skip` a step where either is inf / nan changes neither the adapter nor the
optimizer state, but the data position and the schedule move on; `max_nonfinite_steps` of them in a
row (or the first one, with `nonfinite: stop`) stop the run with one line after a checkpoint.
metrics.jsonl holds `grad_norm` at every step and stays strict JSON: a non-finite value is null,
with `"nonfinite": true`.

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
from lorafit.fingerprint import write_fingerprint
from lorafit.io import save_adapter
from lorafit.lora.adalora import orthogonality_regularizer
from lorafit.lora.allocator import RankAllocator
from lorafit.lora.inject import adapter_configs, adapter_parameters
from lorafit.prompt import PromptFormat, default_format
from lorafit.train.checkpoints import load_best, load_checkpoint, save_checkpoint
from lorafit.train.config import TrainConfig
from lorafit.train.curves import plot_grpo_rewards, plot_losses, plot_rewards
from lorafit.train.data import Sample, pad_id_for
from lorafit.train.distributed.share import check_batch, local_samples
from lorafit.train.distributed.strategy import choose_strategy, quantization_of
from lorafit.train.distributed.world import init_world
from lorafit.train.distributed.wrap import Parallel
from lorafit.train.evaluate import add_metrics, averages, evaluate, extreme
from lorafit.train.fingerprint import training_fingerprint
from lorafit.train.full import MODEL_DIR, save_model_folder
from lorafit.train.interrupt import StopRequest
from lorafit.train.loraplus import loraplus_param_groups
from lorafit.train.loss import loss_sum, n_targets, token_loss_sum
from lorafit.train.metrics import json_record
from lorafit.train.objectives import Objective, check_samples, make_objective
from lorafit.train.objectives.precompute import model_fingerprint, precompute_reference
from lorafit.train.order import EpochOrder
from lorafit.train.outdir import latest_checkpoint, prepare_output_dir
from lorafit.train.packing import check_packing
from lorafit.train.prepare import prepare_model, reference_slot
from lorafit.train.schedule import lr_factor, make_optimizer
from lorafit.train.trackers import Trackers

__all__ = ["EpochOrder", "TrainConfig", "Trainer", "evaluate", "latest_checkpoint", "loss_sum", "lr_factor",
           "make_optimizer", "n_targets", "token_loss_sum"]


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
        if strategy == "fsdp" and config.method == "grpo":
            raise LorafitError("distributed: grpo runs under DDP (each process samples its rollouts with the whole "
                               "model); use distributed: ddp, or fewer processes")
        if any(getattr(s, "position_ids", None) is not None for s in train + (val or [])):  # packed rows: proven isolated first
            check_packing(model, lambda batch: loss_sum(model, batch), model_device(model))
        prepare_model(model, config, device=world.device if strategy == "fsdp" else None)
        self.objective = objective or make_objective(config, reference_slot(model), world, tokenizer)
        self.train_samples, self.val_samples = self.objective.prepare(train), self.objective.prepare(val or [])
        self.fingerprint = model_fingerprint(model) if config.precompute_ref_log_probs else ""  # before sharding
        self.parallel = Parallel(model, self.objective.loss, world, strategy)
        if world.rank:  # each rank its own random stream (dropout masks); rank 0 keeps the seed's
            torch.manual_seed(config.seed + world.rank)
        self.params = adapter_parameters(model)  # after wrapping: FSDP replaced them by their shards
        groups = self.params if config.loraplus_lr_ratio is None else loraplus_param_groups(model, config.loraplus_lr_ratio)
        self.optimizer = make_optimizer(config.optimizer, groups, config.learning_rate, config.weight_decay)
        # GRPO: a micro-batch holds batch_size completion slots, `group` per prompt, each prompt drawn once
        # per num_iterations passes (`iterations`)
        self.group = getattr(self.objective, "group", 1)
        self.order = EpochOrder(len(train), config.batch_size // self.group, config.seed)
        self.batches_per_epoch = self.order.batches_per_epoch
        per_epoch = math.ceil(self.batches_per_epoch * getattr(self.objective, "iterations", 1) / config.grad_accum)
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
        self.step_tokens = 0  # tokens trained on in the last step, all processes (objectives that count them)
        self.best_val, self.bad_evals = math.inf, 0
        self.nonfinite_run, self.skipped = 0, 0  # non-finite steps in a row, and in all
        self.best_checkpoint: str | None = None  # the checkpoint folder with the lowest validation loss
        self.best_checkpoint_val = math.inf
        if config.load_best_at_end and not self.val_samples:
            raise LorafitError("load_best_at_end needs validation data (data.val_path or data.val_fraction) to "
                               "tell the best checkpoint")

    # -- data order -------------------------------------------------------------------------
    def _micro_samples(self, index: int) -> list:
        """This rank's share of the samples of micro-batch number `index` of the run (see `EpochOrder`;
        one process: the whole micro-batch)."""
        samples = [self.train_samples[j] for j in self.order.indices(index)]
        if self.group > 1:  # the objective shares the completion slots among the processes itself
            return samples
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
        count_tokens = getattr(self.objective, "tokens", None)
        counts = world.sum([sum(self.objective.count(b) for b in micro),
                            sum(count_tokens(b) for b in micro) if count_tokens else 0])
        n_target, self.step_tokens = max(int(counts[0]), 1), int(counts[1])
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
        names = [n for n in sorted(sums) if extreme(n) is None]
        values = world.sum(torch.cat([total.reshape(1), *(sums[n] for n in names)]).tolist())
        self.metrics = averages(names, values[1:])
        ends = [n for n in sorted(sums) if extreme(n) is not None]  # min / max metrics: reduced by min / max
        if ends:
            signs = [1.0 if extreme(n) == "max" else -1.0 for n in ends]
            top = world.max([v for n, sign in zip(ends, signs) for v in (sign * float(sums[n][0]), float(sums[n][1]))])
            self.metrics.update({n: sign * top[2 * i] for i, (n, sign) in enumerate(zip(ends, signs)) if top[2 * i + 1] > 0})
        return values[0] / n_target

    def clip_gradients(self) -> float:
        """Clip the adapter gradients to max_grad_norm (when set); returns their global norm (all shards,
        all ranks) before clipping. A non-finite norm leaves the gradients unusable: the step is skipped."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return 0.0
        if self.config.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm(grads)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor

    def _optimizer_step(self) -> float:
        """Set the scheduled learning rate, step, clear the gradients; returns the learning rate."""
        lr = self.lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_ratio", 1.0)  # LoRA+: B's group runs at a multiple
        self.optimizer.step()
        if self.allocator is not None:  # importance from these gradients, before they are cleared
            self.allocator.update_and_allocate(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def lr(self) -> float:
        """The scheduled learning rate of the current optimizer step."""
        cfg = self.config
        return cfg.learning_rate * lr_factor(self.step, self.total_steps, self.warmup, cfg.schedule)

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
            load_checkpoint(self, checkpoint)
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
        if self.skipped and main:
            print(f"lorafit: {self.skipped} non-finite step(s) skipped (\"nonfinite\": true in {metrics_path})")
        if cfg.load_best_at_end:
            load_best(self)
        model.eval()
        fingerprint = None if cfg.method == "full" else training_fingerprint(  # every rank takes part
            self.parallel, self.val_samples or self.train_samples, self.pad_id, self.step, bool(self.val_samples))
        with self.parallel.full_params():  # every rank takes part in gathering the shards; rank 0 writes
            if main:
                saved = self._save_weights(self.out, tokenizer=self.tokenizer)
                if fingerprint is not None:
                    write_fingerprint(saved, fingerprint)
                plot_losses(self.history, self.out / "loss.png")
                if any("reward" in h for h in self.history):  # GRPO
                    plot_grpo_rewards(self.history, self.out / "rewards.png")
                elif self.history and any(k.startswith("rewards/") for k in self.history[-1]):
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
            draws = self.objective.draws(self.step, cfg.grad_accum) if hasattr(self.objective, "draws") else cfg.grad_accum
            indices = range(self.micro, self.micro + draws)
            micro = self.objective.batches(model, [self._micro_samples(i) for i in indices], self.pad_id)
            loss = self.accumulate(micro)
            norm = self.clip_gradients()  # the same on every rank: loss and gradients are all-reduced
            finite = math.isfinite(loss) and math.isfinite(norm)
            if finite:
                lr, self.nonfinite_run = self._optimizer_step(), 0
            else:  # nothing changes but the position: the adapter and the optimizer state stay as they were
                lr = self.lr()
                self.optimizer.zero_grad(set_to_none=True)
                self.nonfinite_run, self.skipped = self.nonfinite_run + 1, self.skipped + 1
            # all ranks' tokens (an objective that samples its own, GRPO, counts them in step_tokens)
            tokens = self.step_tokens or sum(len(self.train_samples[j]) for i in indices for j in self.order.indices(i))
            self.step, self.micro = self.step + 1, self.micro + draws
            elapsed = time.perf_counter() - start
            record = {"step": self.step, **self.objective.finish({"loss": loss, **self.metrics}, eval=False),
                      "grad_norm": norm, "lr": lr, "tokens_per_s": tokens / elapsed, "step_time": elapsed,
                      "epoch": self.micro / self.batches_per_epoch}
            if not finite:
                record["skipped"] = self.skipped
            stop = False
            if self.val_samples and ((cfg.eval_steps and self.step % cfg.eval_steps == 0) or self.step == self.total_steps):
                if hasattr(self.objective, "evaluate"):  # GRPO: rewards of sampled completions
                    record.update(self.objective.evaluate(model, self.val_samples, self.step, self.out if main else None))
                else:
                    record.update(evaluate(model, self.val_samples, self.pad_id, cfg.eval_batch_size or cfg.batch_size,
                                           step=self.parallel.loss, world=world, objective=self.objective))
                    self.parallel.after_eval()
                    stop = self._early_stop(record["val_loss"])  # the same all-reduced loss on every rank
            record = json_record(record)
            self.history.append(record)
            if main:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record, allow_nan=False) + "\n")
                trackers.log(record)
            if self.step % cfg.logging_steps == 0:
                shown = self.objective.progress
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                **({shown[1]: f"{record[shown[0]]:.2f}"} if shown and record.get(shown[0]) is not None
                                   else {}),
                                **({"val": f"{record['val_loss']:.3f}"} if record.get("val_loss") is not None else {}))
            bar.update(1)
            halt = not finite and (cfg.nonfinite == "stop" or self.nonfinite_run >= cfg.max_nonfinite_steps)
            if halt or (cfg.save_steps and self.step % cfg.save_steps == 0):
                save_checkpoint(self)
                saved = self.step
            if halt:
                first = self.step - self.nonfinite_run + 1
                steps = f"step {self.step}" if first == self.step else f"steps {first}-{self.step}"
                raise LorafitError(
                    f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at {steps} "
                    f"(nonfinite: {cfg.nonfinite}, max_nonfinite_steps: {cfg.max_nonfinite_steps}); the run stopped "
                    f"with the last good adapter in {latest_checkpoint(self.out) or self.out / 'checkpoints'}: lower "
                    "learning_rate or check the data, then continue with --resume")
            if interrupt.requested if not world.distributed else world.sum([float(interrupt.requested)])[0] > 0:
                folder = save_checkpoint(self) if saved != self.step else latest_checkpoint(self.out)
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
        if math.isfinite(val_loss) and val_loss < self.best_val:
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
