"""The training loop: adapter parameters only, token-normalised accumulation, exact resume.

The loss of an optimizer step is the sum of per-token losses over *all* its micro-batches divided
by the number of target tokens of the whole accumulated batch, so k micro-batches of b samples give
exactly the gradient of one batch of k*b (averaging per micro-batch, as many trainers do, weights
the tokens of short samples more).

A checkpoint (adapter + optimizer + RNG + data position) is written to a temporary folder and
renamed into place, so a run killed mid-save still has its previous checkpoint, and `resume=True`
continues with the same losses the uninterrupted run would have had. Ctrl-C ends the current step and
writes one too (lorafit.train.interrupt), `save_steps` or not. What output_dir may hold when a run
starts (no earlier run unless `resume` or `overwrite`) and checkpoint rotation: lorafit.train.outdir.
The RNG state is the CPU generator's and, when CUDA is in use, every CUDA device's (dropout masks on a
GPU draw from those). Its files are safetensors and JSON only (`lorafit.train.state_files`): resuming runs no code from
them. Rotation keeps the newest `save_total_limit` checkpoints and the one with the best validation
loss; `load_best_at_end` makes that one the saved adapter when it beats the final weights.

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
from lorafit.io import read_adapter, save_adapter
from lorafit.lora.adalora import orthogonality_regularizer
from lorafit.lora.allocator import RankAllocator
from lorafit.lora.inject import adapter_configs, adapter_parameters
from lorafit.lora.state import set_adapter_state
from lorafit.paths import write_folder
from lorafit.prompt import PromptFormat, default_format
from lorafit.train.config import TrainConfig
from lorafit.train.data import Sample, collate, pad_id_for
from lorafit.train.distributed.share import check_batch, local_samples
from lorafit.train.distributed.strategy import choose_strategy, quantization_of
from lorafit.train.distributed.world import init_world
from lorafit.train.distributed.wrap import Parallel
from lorafit.train.fingerprint import training_fingerprint
from lorafit.train.full import MODEL_DIR, load_model_weights, save_model_folder
from lorafit.train.interrupt import StopRequest
from lorafit.train.loraplus import loraplus_param_groups
from lorafit.train.loss import evaluate, loss_sum, n_targets, token_loss_sum
from lorafit.train.metrics import json_record, plot_losses
from lorafit.train.order import EpochOrder
from lorafit.train.outdir import latest_checkpoint, prepare_output_dir, resume_mismatch, rotate_checkpoints
from lorafit.train.packing import check_packing
from lorafit.train.prepare import prepare_model
from lorafit.train.schedule import lr_factor, make_optimizer
from lorafit.train.state_files import cuda_rng_states, has_state, load_state, save_state, set_cuda_rng_states
from lorafit.train.trackers import Trackers

__all__ = ["EpochOrder", "TrainConfig", "Trainer", "evaluate", "latest_checkpoint", "loss_sum", "lr_factor",
           "make_optimizer", "n_targets", "token_loss_sum"]


class Trainer:
    """Train one LoRA adapter (or, with `method: full`, every weight) on tokenized samples. Call
    `train()`; results land in output_dir (adapter/, or model/ for a full fine-tune)."""

    def __init__(self, config: TrainConfig, model: nn.Module, tokenizer, train: list[Sample],
                 val: list[Sample] | None = None, prompt_format: PromptFormat | None = None) -> None:
        if not train:
            raise LorafitError("no training samples: the data file yielded nothing to train on")
        self.world = world = init_world(model_device(model), config.collective_timeout)
        check_batch(config.batch_size, world.size)
        if world.distributed and any(isinstance(c, AdaLoraConfig)
                                     for c in (config.lora, adapter_configs(model).get(DEFAULT_ADAPTER))):
            raise LorafitError("lora: AdaLoRA trains in one process (its rank allocator reads every layer's whole "
                               "gradients); run it without torchrun / --nproc-per-node, or train LoRA")
        self.config, self.model, self.tokenizer = config, model, tokenizer
        self.train_samples, self.val_samples = train, val or []
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
        if any(s.position_ids is not None for s in train + (val or [])):  # packed rows: proven isolated first
            check_packing(model, lambda batch: loss_sum(model, batch), model_device(model))
        prepare_model(model, config, device=world.device if strategy == "fsdp" else None)
        self.parallel = Parallel(model, loss_sum, world, strategy)
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
        self.best_val, self.bad_evals = math.inf, 0
        self.nonfinite_run, self.skipped = 0, 0  # non-finite steps in a row, and in all
        self.best_checkpoint: str | None = None  # the checkpoint folder with the lowest validation loss
        self.best_checkpoint_val = math.inf
        if config.load_best_at_end and not self.val_samples:
            raise LorafitError("load_best_at_end needs validation data (data.val_path or data.val_fraction) to "
                               "tell the best checkpoint")

    # -- data order -------------------------------------------------------------------------
    def _micro_batch(self, index: int) -> dict[str, torch.Tensor]:
        """This rank's share of micro-batch number `index` of the run, collated on the host (see
        `EpochOrder`; one process: the whole micro-batch)."""
        samples = [self.train_samples[j] for j in self.order.indices(index)]
        return collate(local_samples(samples, self.world.rank, self.world.size), self.pad_id)

    # -- one optimizer step -----------------------------------------------------------------
    def accumulate(self, micro: list[dict[str, torch.Tensor]]) -> float:
        """Backward over micro-batches with the loss normalised by the target tokens of all of
        them; returns that mean loss. Gradients are left in .grad (no optimizer step).

        The batches may be on the host: targets are counted there, then all of them are sent to the
        model's device at once (non-blocking on CUDA, so later copies overlap the first backward).
        With several processes `micro` is this rank's share, the count and the loss are summed over
        all ranks, and each rank's loss is divided by n_target / N (lorafit.train.distributed.share)."""
        world = self.world
        n_target = max(int(world.sum([sum(n_targets(b) for b in micro)])[0]), 1)
        share = n_target / world.size  # DDP / FSDP average the ranks' gradients: N / n_target each
        device = model_device(self.model)
        total = None  # fp32 scalar on the device: one sync per step, at the end
        for i, batch in enumerate([to_device(b, device) for b in micro]):
            with self.parallel.accumulating(last=i == len(micro) - 1):
                loss = self.parallel.loss(batch)
                (loss / share).backward()
            total = loss.detach() if total is None else total + loss.detach()
        if self.allocator is not None and self.allocator.config.orth_reg_weight > 0:  # AdaLoRA: once per step
            (self.allocator.config.orth_reg_weight * orthogonality_regularizer(self.model, DEFAULT_ADAPTER)).backward()
        return world.sum([total.item()])[0] / n_target

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
        """Train; `resume`: continue from the newest checkpoint in output_dir (there must be one);
        `overwrite`: delete an earlier run's files there first (without either, output_dir must hold
        no earlier run: lorafit.train.outdir). Ctrl-C ends the current step, writes a checkpoint and
        raises KeyboardInterrupt."""
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
            self._load_best()
        model.eval()
        fingerprint = None if cfg.method == "full" else training_fingerprint(  # every rank takes part
            self.parallel, self.val_samples or self.train_samples, self.pad_id, self.step, bool(self.val_samples))
        with self.parallel.full_params():  # every rank takes part in gathering the shards; rank 0 writes
            if main:
                saved = self._save_weights(self.out, tokenizer=self.tokenizer)
                if fingerprint is not None:
                    write_fingerprint(saved, fingerprint)
                plot_losses(self.history, self.out / "loss.png")
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
            micro = [self._micro_batch(i) for i in indices]
            loss = self.accumulate(micro)
            norm = self.clip_gradients()  # the same on every rank: loss and gradients are all-reduced
            finite = math.isfinite(loss) and math.isfinite(norm)
            if finite:
                lr, self.nonfinite_run = self._optimizer_step(), 0
            else:  # nothing changes but the position: the adapter and the optimizer state stay as they were
                lr = self.lr()
                self.optimizer.zero_grad(set_to_none=True)
                self.nonfinite_run, self.skipped = self.nonfinite_run + 1, self.skipped + 1
            tokens = sum(len(self.train_samples[j]) for i in indices for j in self.order.indices(i))  # all ranks'
            self.step, self.micro = self.step + 1, self.micro + cfg.grad_accum
            record = {"step": self.step, "loss": loss, "grad_norm": norm, "lr": lr,
                      "tokens_per_s": tokens / (time.perf_counter() - start),
                      "epoch": self.micro / self.batches_per_epoch}
            if not finite:
                record["skipped"] = self.skipped
            stop = False
            if self.val_samples and ((cfg.eval_steps and self.step % cfg.eval_steps == 0) or self.step == self.total_steps):
                record.update(evaluate(model, self.val_samples, self.pad_id, cfg.eval_batch_size or cfg.batch_size,
                                       step=self.parallel.loss,
                                       world=world))
                self.parallel.after_eval()
                stop = self._early_stop(record["val_loss"])  # the same all-reduced loss on every rank
            record = json_record(record)
            self.history.append(record)
            if main:
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record, allow_nan=False) + "\n")
                trackers.log(record)
            if self.step % cfg.logging_steps == 0:
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:.0f}",
                                **({"val": f"{record['val_loss']:.3f}"} if record.get("val_loss") is not None else {}))
            bar.update(1)
            halt = not finite and (cfg.nonfinite == "stop" or self.nonfinite_run >= cfg.max_nonfinite_steps)
            if halt or (cfg.save_steps and self.step % cfg.save_steps == 0):
                self._save_checkpoint()
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

    def _early_stop(self, val_loss: float) -> bool:
        if math.isfinite(val_loss) and val_loss < self.best_val:
            self.best_val, self.bad_evals = val_loss, 0
            return False
        self.bad_evals += 1
        patience = self.config.early_stopping_patience
        return patience is not None and self.bad_evals >= patience

    def run_info(self) -> dict:
        """The run's resolved configuration (the trackers' hyperparameters, the model card's): this
        TrainConfig, the base and its quantization, the data's size and the steps."""
        return {**asdict(self.config), "model": getattr(getattr(self.model, "config", None), "_name_or_path", None),
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
        rank 0 writes the checkpoint and returns its folder, the others return None. Then rotation:
        the newest save_total_limit checkpoints stay, and the best one by validation loss."""
        optimizer = self.parallel.optimizer_state(self.optimizer)  # whole, keyed by name, on rank 0
        rngs = self.world.gather((torch.get_rng_state(), cuda_rng_states()))
        with self.parallel.full_params():
            if not self.world.is_main:
                return None
            root = self.out / "checkpoints"
            name = f"step-{self.step:08d}"
            last = self.history[-1] if self.history else {}
            val = last.get("val_loss") if last.get("step") == self.step else None
            if val is not None and val < self.best_checkpoint_val:
                self.best_checkpoint, self.best_checkpoint_val = name, val
            state = {"step": self.step, "micro": self.micro, "optimizer": optimizer, "torch_rng": rngs[0][0],
                     "cuda_rng": rngs[0][1], "rank_rng": rngs, "world_size": self.world.size,
                     "history": self.history, "best_val": self.best_val, "bad_evals": self.bad_evals,
                     "val_loss": val, "best_checkpoint": self.best_checkpoint,
                     "best_checkpoint_val": self.best_checkpoint_val, "nonfinite_run": self.nonfinite_run,
                     "skipped": self.skipped, "config": asdict(self.config)}

            def write(folder: Path) -> None:
                self._save_weights(folder)
                save_state(state, folder)
            # atomic: a checkpoint folder is either complete or absent
            final = write_folder(root / name, write)
        # the newest save_total_limit up to this one (never `final`, never a later step), and the best one
        rotate_checkpoints(self.out, final, self.config.save_total_limit, best=self.best_checkpoint)
        return final

    def _load_best(self) -> None:
        """load_best_at_end: put the best checkpoint's weights in the model, when its validation loss
        beats the final weights' (evaluated at the last step) or the final weights were not evaluated."""
        last = self.history[-1] if self.history else {}
        final_val = last.get("val_loss") if last.get("val_loss") is not None else math.inf
        best = self.world.broadcast((self.best_checkpoint, self.best_checkpoint_val) if self.world.is_main else None)
        name, val = best
        if name is None or not val < final_val:
            if self.world.is_main:
                print("lorafit: load_best_at_end: the final weights are the best "
                      + (f"(validation loss {final_val:.4f})" if math.isfinite(final_val) else "(no checkpoint was better)"))
            return
        path = self.out / "checkpoints" / name
        with self.parallel.full_params(write_back=True):
            if self.world.is_main:
                self._read_weights(path)
        if self.world.is_main:
            print(f"lorafit: load_best_at_end: the saved weights are {name}'s (validation loss {val:.4f}; final "
                  + (f"{final_val:.4f})" if math.isfinite(final_val) else "weights not evaluated)"))

    def _read_weights(self, folder: Path) -> None:
        """The checkpoint's adapter (or full model) into the model; rank 0, inside full_params(write_back)."""
        if self.config.method == "full":
            load_model_weights(self.model, folder / MODEL_DIR)
        else:
            _, adapter_state = read_adapter(folder / "adapter")
            set_adapter_state(self.model, DEFAULT_ADAPTER, adapter_state)

    def _load_checkpoint(self, path: Path) -> None:
        """Rank 0 reads the checkpoint and sends every rank its part: the adapter (into each rank's
        shard or replica), the optimizer states, its own RNG state and the loop's position. A checkpoint
        of another number of processes resumes too (everything in it is whole, and the global batches
        do not depend on the number of processes); only ranks beyond the saved ones start new RNG streams."""
        main, world = self.world.is_main, self.world
        # on the host first: the optimizer moves its states to its parameters' devices itself. Data only
        # (JSON + safetensors, or a legacy pickle read with weights_only=True): nothing in it runs.
        state = load_state(path) if main else {}
        differ = resume_mismatch(state.get("config") or {}, asdict(self.config)) if main else None
        differ = world.broadcast(differ)  # every rank stops, not rank 0 alone
        if differ:
            raise LorafitError(f"{path}: this checkpoint was written with {differ}; resume with the settings it "
                               "was trained with, or start over with --overwrite (or another output_dir)")
        with self.parallel.full_params(write_back=True):
            if main:
                self._read_weights(path)
        self.parallel.load_optimizer_state(self.optimizer, state.pop("optimizer", None))
        rngs = state.get("rank_rng") or [(state.get("torch_rng"), state.get("cuda_rng"))]
        mine = world.scatter([rngs[r] if r < len(rngs) else None for r in range(world.size)] if main else None)
        if mine is not None:
            torch.set_rng_state(mine[0])
            set_cuda_rng_states(mine[1])
        keys = ("step", "micro", "history", "best_val", "bad_evals")
        extra = {"world_size": 1, "best_checkpoint": None, "best_checkpoint_val": math.inf, "nonfinite_run": 0,
                 "skipped": 0}  # (checkpoints of older versions lack these)
        meta = world.broadcast({**{k: state[k] for k in keys}, **{k: state.get(k, v) for k, v in extra.items()}}
                               if main else None)
        self.step, self.micro, self.history = meta["step"], meta["micro"], meta["history"]
        self.best_val, self.bad_evals = meta["best_val"], meta["bad_evals"]
        self.best_checkpoint, self.best_checkpoint_val = meta["best_checkpoint"], meta["best_checkpoint_val"]
        self.nonfinite_run, self.skipped = meta["nonfinite_run"], meta["skipped"]
        if self.best_checkpoint is not None and not has_state(self.out / "checkpoints" / self.best_checkpoint):
            self.best_checkpoint, self.best_checkpoint_val = None, math.inf  # removed since: not a candidate
        if main:
            metrics = self.out / "metrics.jsonl"  # drop lines written after the checkpoint by the dead run
            metrics.write_text("".join(json.dumps(json_record(r), allow_nan=False) + "\n" for r in self.history))
            if meta["world_size"] != world.size:
                print(f"lorafit: {path} was written by {meta['world_size']} process(es), resuming on {world.size}: "
                      "adapter, optimizer states and data position carry over")
