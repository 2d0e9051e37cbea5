"""`precompute_ref_log_probs: true`: the reference log-probs of every sample, once, before training.

One batched no-grad pass over the samples (through the trainer's DDP / FSDP wrapper, every process
taking its share of each batch) gives each sample its reference log-probs (pairs: chosen, rejected;
KTO: completion, KL completion); training then reads them from the batch instead of running the
reference forward at every step. The values are cached in `output_dir/reference/<split>-<key>.json`
(written atomically), where the key is a SHA-256 of

    the samples' token ids and truncation    (the data)
    every frozen tensor of the model          (the base, quantized or not, and the reference adapter slot)
    the reference's name                      (the base with adapters disabled, or the slot)

so a resumed run reuses them and any change of data, base or reference computes them again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lorafit.device import model_device, to_device
from lorafit.io import atomic_write_bytes
from lorafit.train.distributed.share import local_samples, rank_share
from lorafit.train.distributed.world import World


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the names, dtypes, shapes and bytes of the model's frozen tensors (parameters that do not
    train, and buffers); this process's shards under FSDP."""
    digest = hashlib.sha256()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
        if name in trained:
            continue
        t = tensor.detach()
        t = t.to_local() if hasattr(t, "to_local") else t
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        t = t.cpu().contiguous()
        if t.dtype in (torch.bfloat16, torch.float16):
            t = t.view(torch.int16)
        elif not t.is_floating_point() and t.dtype not in (torch.uint8, torch.int8, torch.int16, torch.int32,
                                                           torch.int64, torch.bool):
            t = t.view(torch.uint8)
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def samples_fingerprint(samples: list) -> str:
    """SHA-256 of what the reference sees of the samples: their rows (ids and completion masks)."""
    digest = hashlib.sha256()
    for s in samples:
        digest.update(json.dumps([[ids, mask] for ids, mask in s.rows()]).encode())
    return digest.hexdigest()


def precompute_reference(samples: list, run: Callable[[dict[str, torch.Tensor]], torch.Tensor], objective,
                         model: nn.Module, pad_id: int, batch_size: int, cache: Path, key: str, world: World,
                         desc: str) -> list:
    """`samples`, each with `ref_logps` set (see the module docstring). `run(batch)` returns a batch's
    (B, 2) reference log-probs through the wrapper; every rank calls this; rank 0 reads and writes the
    cache. `key` is the model and reference part of the cache key (the samples' part is added here)."""
    if not samples:
        return samples
    key = hashlib.sha256(f"{key}:{samples_fingerprint(samples)}".encode()).hexdigest()[:20]
    path = cache / f"{desc}-{key}.json"
    values = None
    if world.is_main and path.is_file():
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError):
            values = None
        if values is not None and len(values) != len(samples):
            values = None
    values = world.broadcast(values)
    if values is None:
        values = []
        device = model_device(model)
        bar = tqdm(total=len(samples), desc=f"reference log-probs ({desc})", unit="sample", disable=not world.is_main,
                   dynamic_ncols=True)
        with torch.no_grad():
            for i in range(0, len(samples), batch_size):
                part = samples[i:i + batch_size]
                batch = objective.collate(local_samples(part, world.rank, world.size, objective.empty), pad_id)
                ref = run(to_device(batch, device))  # (b, 2)
                mine = ref[:len(rank_share(part, world.rank, world.size))].tolist()
                gathered = world.gather(mine)
                if world.is_main:
                    values += [v for rank_values in gathered for v in rank_values]
                bar.update(len(part))
        bar.close()
        values = world.broadcast(values)
        if world.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, json.dumps(values).encode())
    return [dataclasses.replace(s, ref_logps=(float(a), float(b))) for s, (a, b) in zip(samples, values)]
