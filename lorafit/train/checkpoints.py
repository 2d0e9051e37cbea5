"""The trainer's checkpoints (lorafit.train.trainer): writing one (every rank gathers, rank 0 writes
safetensors + JSON through lorafit.train.state_files, then rotation keeps the newest and the best by
validation loss), `load_best_at_end`, and resuming from one (settings checked, every rank sent its part:
adapter, optimizer states, its own RNG state, the loop's position and the objective's state). `trainer` is a lorafit.train.trainer.Trainer (not imported:
it imports this module)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import torch

from lorafit.config import DEFAULT_ADAPTER
from lorafit.errors import LorafitError
from lorafit.io import read_adapter
from lorafit.lora.state import set_adapter_state
from lorafit.paths import write_folder
from lorafit.train.full import MODEL_DIR, load_model_weights
from lorafit.train.metrics import json_record
from lorafit.train.outdir import resume_mismatch, rotate_checkpoints
from lorafit.train.state_files import cuda_rng_states, has_state, load_state, save_state, set_cuda_rng_states


def save_checkpoint(trainer) -> Path | None:
    """Every rank calls it (the optimizer states, RNG states and adapter shards are gathered);
    rank 0 writes the checkpoint and returns its folder, the others return None. Then rotation:
    the newest save_total_limit checkpoints stay, and the best one by validation loss."""
    optimizer = trainer.parallel.optimizer_state(trainer.optimizer)  # whole, keyed by name, on rank 0
    rngs = trainer.world.gather((torch.get_rng_state(), cuda_rng_states()))
    with trainer.parallel.full_params():
        if not trainer.world.is_main:
            return None
        root = trainer.out / "checkpoints"
        name = f"step-{trainer.step:08d}"
        last = trainer.history[-1] if trainer.history else {}
        val = last.get("val_loss") if last.get("step") == trainer.step else None
        if val is not None and val < trainer.best_checkpoint_val:
            trainer.best_checkpoint, trainer.best_checkpoint_val = name, val
        state = {"step": trainer.step, "micro": trainer.micro, "optimizer": optimizer, "torch_rng": rngs[0][0],
                 "cuda_rng": rngs[0][1], "rank_rng": rngs, "world_size": trainer.world.size,
                 "history": trainer.history, "best_val": trainer.best_val, "bad_evals": trainer.bad_evals,
                 "val_loss": val, "best_checkpoint": trainer.best_checkpoint,
                 "best_checkpoint_val": trainer.best_checkpoint_val, "nonfinite_run": trainer.nonfinite_run,
                 "skipped": trainer.skipped, "config": asdict(trainer.config), "objective": trainer.objective.state_dict()}

        def write(folder: Path) -> None:
            trainer._save_weights(folder)
            save_state(state, folder)
        # atomic: a checkpoint folder is either complete or absent
        final = write_folder(root / name, write)
    # the newest save_total_limit up to this one (never `final`, never a later step), and the best one
    rotate_checkpoints(trainer.out, final, trainer.config.save_total_limit, best=trainer.best_checkpoint)
    return final


def load_best(trainer) -> None:
    """load_best_at_end: put the best checkpoint's weights in the model, when its validation loss
    beats the final weights' (evaluated at the last step) or the final weights were not evaluated."""
    last = trainer.history[-1] if trainer.history else {}
    final_val = last.get("val_loss") if last.get("val_loss") is not None else math.inf
    best = trainer.world.broadcast((trainer.best_checkpoint, trainer.best_checkpoint_val) if trainer.world.is_main else None)
    name, val = best
    if name is None or not val < final_val:
        if trainer.world.is_main:
            print("lorafit: load_best_at_end: the final weights are the best "
                  + (f"(validation loss {final_val:.4f})" if math.isfinite(final_val) else "(no checkpoint was better)"))
        return
    path = trainer.out / "checkpoints" / name
    with trainer.parallel.full_params(write_back=True):
        if trainer.world.is_main:
            read_weights(trainer, path)
    if trainer.world.is_main:
        print(f"lorafit: load_best_at_end: the saved weights are {name}'s (validation loss {val:.4f}; final "
              + (f"{final_val:.4f})" if math.isfinite(final_val) else "weights not evaluated)"))


def read_weights(trainer, folder: Path) -> None:
    """The checkpoint's adapter (or full model) into the model; rank 0, inside full_params(write_back)."""
    if trainer.config.method == "full":
        load_model_weights(trainer.model, folder / MODEL_DIR)
    else:
        _, adapter_state = read_adapter(folder / "adapter")
        set_adapter_state(trainer.model, DEFAULT_ADAPTER, adapter_state)


def load_checkpoint(trainer, path: Path) -> None:
    """Rank 0 reads the checkpoint and sends every rank its part: the adapter (into each rank's
    shard or replica), the optimizer states, its own RNG state and the loop's position. A checkpoint
    of another number of processes resumes too (everything in it is whole, and the global batches
    do not depend on the number of processes); only ranks beyond the saved ones start new RNG streams."""
    main, world = trainer.world.is_main, trainer.world
    # on the host first: the optimizer moves its states to its parameters' devices itself. Data only
    # (JSON + safetensors, or a legacy pickle read with weights_only=True): nothing in it runs.
    state = load_state(path) if main else {}
    differ = resume_mismatch(state.get("config") or {}, asdict(trainer.config)) if main else None
    differ = world.broadcast(differ)  # every rank stops, not rank 0 alone
    if differ:
        raise LorafitError(f"{path}: this checkpoint was written with {differ}; resume with the settings it "
                           "was trained with, or start over with --overwrite (or another output_dir)")
    with trainer.parallel.full_params(write_back=True):
        if main:
            read_weights(trainer, path)
    trainer.parallel.load_optimizer_state(trainer.optimizer, state.pop("optimizer", None))
    rngs = state.get("rank_rng") or [(state.get("torch_rng"), state.get("cuda_rng"))]
    mine = world.scatter([rngs[r] if r < len(rngs) else None for r in range(world.size)] if main else None)
    if mine is not None:
        torch.set_rng_state(mine[0])
        set_cuda_rng_states(mine[1])
    trainer.objective.load_state_dict(world.broadcast(state.get("objective", {}) if main else None))
    keys = ("step", "micro", "history", "best_val", "bad_evals")
    extra = {"world_size": 1, "best_checkpoint": None, "best_checkpoint_val": math.inf, "nonfinite_run": 0,
             "skipped": 0}  # (checkpoints of older versions lack these)
    meta = world.broadcast({**{k: state[k] for k in keys}, **{k: state.get(k, v) for k, v in extra.items()}}
                           if main else None)
    trainer.step, trainer.micro, trainer.history = meta["step"], meta["micro"], meta["history"]
    trainer.best_val, trainer.bad_evals = meta["best_val"], meta["bad_evals"]
    trainer.best_checkpoint, trainer.best_checkpoint_val = meta["best_checkpoint"], meta["best_checkpoint_val"]
    trainer.nonfinite_run, trainer.skipped = meta["nonfinite_run"], meta["skipped"]
    if trainer.best_checkpoint is not None and not has_state(trainer.out / "checkpoints" / trainer.best_checkpoint):
        trainer.best_checkpoint, trainer.best_checkpoint_val = None, math.inf  # removed since: not a candidate
    if main:
        metrics = trainer.out / "metrics.jsonl"  # drop lines written after the checkpoint by the dead run
        metrics.write_text("".join(json.dumps(json_record(r), allow_nan=False) + "\n" for r in trainer.history))
        if meta["world_size"] != world.size:
            print(f"lorafit: {path} was written by {meta['world_size']} process(es), resuming on {world.size}: "
                  "adapter, optimizer states and data position carry over")
