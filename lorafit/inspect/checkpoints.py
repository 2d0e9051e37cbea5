"""‖ΔW‖_F per layer over the training steps of a run, read from its checkpoints (no model needed).

A run folder of `lorafit train` holds checkpoints/step-NNNNNNNN/adapter (every `save_steps`, the newest
`save_total_limit` kept) and the final adapter/. For each of them and each block index ℓ, the value is
the norm of all the block's updates together, sqrt(Σ_modules ‖s·B·A‖_F²), computed from the factors:
‖B·A‖_F² = trace((BᵀB)(A·Aᵀ)), r x r matrices only. (DoRA's magnitudes are not part of it: this is
the low-rank update the optimizer grows, before any re-normalisation.)
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafit.errors import LorafitError
from lorafit.io import read_adapter
from lorafit.lora.targets import layer_index


@dataclass
class StepNorms:
    steps: list[int]  # optimizer step of each row
    layers: list[int]  # block index of each column
    norms: list[list[float]]  # (steps, layers): sqrt(Σ ‖s·B·A‖_F²) of that block at that step


def lowrank_fro(B: torch.Tensor, A: torch.Tensor) -> float:
    """‖B·A‖_F from the factors: sqrt(trace((BᵀB)(A·Aᵀ))). B: (out, r), A: (r, in)."""
    B, A = B.double(), A.double()
    return math.sqrt(max(float(torch.trace((B.T @ B) @ (A @ A.T))), 0.0))


def adapter_layer_norms(directory: str | Path, modules: str | None = None) -> dict[int, float]:
    """Block index -> sqrt(Σ over the block's adapted linear layers of ‖s·B·A‖_F²) for one adapter folder
    (only the layers whose path the regex `modules` finds, when given)."""
    config, state = read_adapter(directory)
    squares: dict[int, float] = {}
    for path, entry in state.layers.items():
        index = layer_index(path)
        if index is None or "A" not in entry or (modules is not None and not re.search(modules, path)):
            continue
        value = config.scaling_for(path) * lowrank_fro(entry["B"], entry["A"])
        squares[index] = squares.get(index, 0.0) + value * value
    return {i: math.sqrt(v) for i, v in squares.items()}


def final_step(run_dir: Path) -> int | None:
    """The last optimizer step in run_dir/metrics.jsonl (the step of run_dir/adapter), if readable."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").is_file() else []
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def norms_over_steps(run_dir: str | Path, modules: str | None = None) -> StepNorms:
    """StepNorms of every checkpoint of a run, and of its final adapter when there is one (of the
    modules the regex `modules` finds, when given)."""
    run_dir = Path(run_dir)
    found: dict[int, Path] = {}
    for folder in sorted((run_dir / "checkpoints").glob("step-*")):
        if (folder / "adapter").is_dir() and folder.name[5:].isdigit():
            found[int(folder.name[5:])] = folder / "adapter"
    step = final_step(run_dir)
    if (run_dir / "adapter").is_dir() and step is not None:
        found.setdefault(step, run_dir / "adapter")
    if not found:
        raise LorafitError(f"{run_dir}: no checkpoints/step-*/adapter or adapter/ with metrics.jsonl; "
                           "pass the output_dir of a lorafit train run (save_steps makes checkpoints)")
    per_step = {s: adapter_layer_norms(found[s], modules) for s in sorted(found)}
    layers = sorted({i for norms in per_step.values() for i in norms})
    return StepNorms(steps=sorted(found), layers=layers,
                     norms=[[per_step[s].get(i, 0.0) for i in layers] for s in sorted(found)])
