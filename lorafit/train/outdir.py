"""A run's output folder: what a new run, `--resume` and `--overwrite` may find there, and checkpoints.

    a new run     the folder must hold no earlier run's files (RUN_FILES): a second run into it would
                  overwrite the first one's adapter and metrics, and mix their checkpoints; other files
                  (the YAML config, the data) are fine
    --resume      continues from the newest complete checkpoint; a folder with none is an error that says so
    --overwrite   the earlier run's files are deleted when training starts (not before: a run that fails
                  to load its model or data deletes nothing)

Checkpoints are `checkpoints/step-NNNNNNNN` folders, each written whole (lorafit.paths.write_folder) and
complete when its trainer state is there (lorafit.train.state_files). Rotation keeps the newest
`save_total_limit` checkpoints up to the step just saved, never deletes that one nor the best one by
validation loss; a folder is deleted by renaming it to a dot name first
(lorafit.paths.remove_folder), so an interrupt never leaves half a checkpoint under a `step-*` name, and
what interrupted writes and deletions leave behind is removed when a run starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorafit.errors import LorafitError
from lorafit.paths import clean_leftovers, remove_folder
from lorafit.train.state_files import has_state

RUN_FILES = ("adapter", "model", "checkpoints", "metrics.jsonl", "loss.png")  # what a run writes
# settings a checkpoint must share with the run resuming it: the adapter's shape and the data's order
SAME_ON_RESUME = ("method", "batch_size", "grad_accum", "seed", "lora")


def checkpoint_step(folder: Path) -> int | None:
    """The optimizer step of a `step-NNNNNNNN` folder (None for any other name)."""
    digits = folder.name[len("step-"):]
    return int(digits) if folder.name.startswith("step-") and digits.isdigit() else None


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    found = [p for p in (Path(output_dir) / "checkpoints").glob("step-*")
             if checkpoint_step(p) is not None and has_state(p)]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (temporary folders of an interrupted save are ignored)."""
    done = checkpoints(output_dir)
    return done[-1] if done else None


def previous_run(output_dir: str | Path) -> list[str]:
    """The names of RUN_FILES present in the folder. A `model` folder counts only next to a run's
    metrics.jsonl (a full fine-tune writes both): alone it may be a base model kept there."""
    out = Path(output_dir)
    return [name for name in RUN_FILES if (out / name).exists()
            and (name != "model" or (out / "metrics.jsonl").is_file())]


def check_output_dir(output_dir: str | Path, resume: bool = False, overwrite: bool = False) -> Path | None:
    """Whether a run may start in `output_dir` (nothing is changed); returns the checkpoint `resume`
    continues from. A LorafitError names the folder and what to do otherwise."""
    out = Path(output_dir)
    if resume and overwrite:
        raise LorafitError("--resume continues the run in output_dir and --overwrite deletes it: choose one")
    if out.exists() and not out.is_dir():
        raise LorafitError(f"output_dir {out}: exists and is not a folder; choose another output_dir")
    if resume:
        checkpoint = latest_checkpoint(out)
        if checkpoint is None:
            done = " (its run finished: adapter/ is there)" if (out / "adapter").is_dir() or (out / "model").is_dir() else ""
            raise LorafitError(f"--resume: no checkpoint to resume from in {out / 'checkpoints'}{done}; a run writes one "
                               "every save_steps and when interrupted (Ctrl-C); start without --resume")
        return checkpoint
    found = previous_run(out)
    if found and not overwrite:
        raise LorafitError(f"output_dir {out}: holds an earlier run ({', '.join(found)}); --resume continues it, "
                           "--overwrite replaces it, or choose another output_dir")
    return None


def prepare_output_dir(output_dir: str | Path, resume: bool = False, overwrite: bool = False) -> Path | None:
    """`check_output_dir`, then make the folder ready: created, an earlier run's files deleted with
    `overwrite`, the leftovers of interrupted checkpoint writes removed. Returns the checkpoint to resume."""
    out = Path(output_dir)
    checkpoint = check_output_dir(out, resume, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for name in previous_run(out):
            remove_folder(out / name) if (out / name).is_dir() else (out / name).unlink()
    root = out / "checkpoints"
    if root.is_dir():
        clean_leftovers(root)
        complete = set(checkpoints(out))
        for folder in root.glob("step-*"):  # a checkpoint folder without its trainer state cannot resume
            if folder.is_dir() and folder not in complete:
                remove_folder(folder)
    return checkpoint


def rotate_checkpoints(output_dir: str | Path, current: Path, keep: int, best: str | None = None) -> list[Path]:
    """Delete all but the newest `keep` checkpoints up to `current` (the one just written, never deleted);
    a checkpoint of a later step is not this run's to delete, nor `best` (the folder name of the one with
    the best validation loss). Returns the folders deleted."""
    step = checkpoint_step(current)
    older = [p for p in checkpoints(output_dir) if p != current and checkpoint_step(p) < step]
    if best is not None and any(p.name == best for p in older[:max(0, len(older) - (keep - 1))]):
        older = [p for p in older if p.name != best]  # kept besides the newest ones
    doomed = older[:max(0, len(older) - (keep - 1))]
    for folder in doomed:
        remove_folder(folder)
    return doomed


def resume_mismatch(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """How a checkpoint's training config (`asdict(TrainConfig)`) differs from the resuming run's in the
    settings it must share (SAME_ON_RESUME; every field of the adapter), e.g. "lora.r=16, this run has
    lora.r=8"; None when they agree. Compared as JSON, so a tuple and a list with the same items agree."""
    def flat(config: dict[str, Any]) -> dict[str, Any]:
        items = {}
        for key in SAME_ON_RESUME:
            value = json.loads(json.dumps(config.get(key), default=str))
            if isinstance(value, dict):
                items.update({f"{key}.{k}": v for k, v in value.items()})
            else:
                items[key] = value
        return items

    was, now = flat(saved), flat(current)
    differ = [k for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
    if not differ:
        return None
    show = differ[:3]
    return (", ".join(f"{k}={json.dumps(was.get(k))}" for k in show) + ", this run has "
            + ", ".join(f"{k}={json.dumps(now.get(k))}" for k in show))
