"""A trainer's state as JSON + safetensors: a resumed run reads data, never code.

`has_state` says whether a checkpoint folder is complete (lorafit.train.outdir finds and rotates them);
`cuda_rng_states` / `set_cuda_rng_states` take and restore the CUDA generators a checkpoint carries.

A checkpoint's `trainer_state` (loop position, history, optimizer states, RNG states, config) is a tree
of dicts, lists, tuples, numbers, strings and tensors. It is written as two files:

    trainer_state.json          the tree, each tensor replaced by {"__tensor__": "<key>"}
    trainer_state.safetensors   the tensors under those keys

JSON cannot hold everything the tree needs, so a few shapes are tagged: a tuple is
{"__tuple__": [...]}, a dict with keys that are not plain strings (the optimizer's state is keyed by
parameter index) is {"__dict__": [[key, value], ...]}, and inf / nan are {"__float__": "inf"}.
Nothing else is accepted: writing an object of another type is a bug, and reading never builds one.

Checkpoints written before this format hold `trainer_state.pt`, a torch pickle. Those are read with
`torch.load(weights_only=True)`, which rebuilds tensors and plain containers only; a file holding any
other pickled object (which could run code when unpickled) is refused in one line.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lorafit.errors import LorafitError

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LEGACY_STATE = "trainer_state.pt"
_TAGS = ("__tensor__", "__tuple__", "__dict__", "__float__")


def has_state(folder: str | Path) -> bool:
    """Whether `folder` holds a complete trainer state (this format or the legacy pickle)."""
    folder = Path(folder)
    return (folder / STATE_JSON).is_file() or (folder / LEGACY_STATE).is_file()


def save_state(state: Any, folder: str | Path) -> None:
    """Write `state` into `folder` as trainer_state.json + trainer_state.safetensors (the folder is
    the caller's temporary one: `lorafit.paths.write_folder` makes the whole checkpoint atomic)."""
    folder = Path(folder)
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, tensors)
    # overlapping views of one storage would be written twice: safetensors wants each tensor on its own
    tensors = {k: t.detach().cpu().contiguous().clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size()
               else t.detach().cpu().contiguous() for k, t in tensors.items()}
    save_file(tensors, str(folder / STATE_TENSORS), metadata={"format": "pt"})
    (folder / STATE_JSON).write_text(json.dumps(tree, allow_nan=False) + "\n")


def load_state(folder: str | Path) -> Any:
    """The state `save_state` wrote (tensors on the CPU); a legacy `trainer_state.pt` is read with
    weights_only=True. Anything unreadable or unsafe is a one-line LorafitError naming the file."""
    folder = Path(folder)
    if not (folder / STATE_JSON).is_file():
        return load_legacy(folder / LEGACY_STATE)
    path = folder / STATE_JSON
    try:
        tree = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LorafitError(f"{path}: not a readable trainer state ({e}); resume from another checkpoint") from None
    try:
        tensors = load_file(str(folder / STATE_TENSORS))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise LorafitError(f"{folder / STATE_TENSORS}: not a readable safetensors file ({reason}); resume from "
                           "another checkpoint") from None
    try:
        return _decode(tree, tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise LorafitError(f"{path}: malformed trainer state ({e!r}); resume from another checkpoint") from None


def load_legacy(path: str | Path) -> Any:
    """A `trainer_state.pt` of an older lorafit, read with weights_only=True (tensors and containers only)."""
    path = Path(path)
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it calls {found.group(1)}" if found else "weights_only loading refuses it"
        raise LorafitError(f"{path}: holds pickled Python objects that would run code when loaded ({what}); lorafit "
                           "does not load it: resume from a checkpoint lorafit wrote, or start the run again") from None
    except (OSError, RuntimeError, EOFError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise LorafitError(f"{path}: not a readable trainer state ({reason}); resume from another checkpoint") from None


def _encode(value: Any, tensors: dict[str, torch.Tensor], seen: dict | None = None) -> Any:
    seen = {} if seen is None else seen  # (storage, offset, shape, dtype, device) -> key: one tensor reached twice
    if isinstance(value, torch.Tensor):
        where = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride(),
                 value.dtype, value.device)
        if where not in seen or value.numel() == 0:
            seen[where] = key = f"t{len(tensors)}"
            tensors[key] = value
        return {"__tensor__": seen[where]}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors, seen) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors, seen) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in value):
            return {k: _encode(v, tensors, seen) for k, v in value.items()}
        return {"__dict__": [[_encode(k, tensors, seen), _encode(v, tensors, seen)] for k, v in value.items()]}
    raise TypeError(f"trainer state: cannot write a {type(value).__name__} ({value!r:.60}) as JSON + safetensors")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (tag, inner), = value.items()
        if tag == "__tensor__":
            return tensors[inner]
        if tag == "__tuple__":
            return tuple(_decode(v, tensors) for v in inner)
        if tag == "__dict__":
            return {_decode(k, tensors): _decode(v, tensors) for k, v in inner}
        if tag == "__float__":
            if inner not in ("inf", "-inf", "nan"):
                raise ValueError(f"__float__ {inner!r}")
            return float(inner)
    return {k: _decode(v, tensors) for k, v in value.items()}


def cuda_rng_states() -> list[torch.Tensor] | None:
    """Every CUDA device's generator state, or None when this process has not initialised CUDA (a CPU
    run on a machine with a GPU must not create a CUDA context just to save an unused state)."""
    return torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None


def set_cuda_rng_states(states: list[torch.Tensor] | None) -> None:
    """Restore what `cuda_rng_states` saved, on the devices this process sees (a checkpoint of a CPU
    run has none, and a CPU-only process resuming a GPU run has nothing to restore them to)."""
    if not states or not torch.cuda.is_available():
        return
    for index, rng in enumerate(states[:torch.cuda.device_count()]):
        torch.cuda.set_rng_state(rng, index)
