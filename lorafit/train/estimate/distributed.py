"""Memory per device of a training step on N devices: DDP (every device holds everything) vs FSDP.

`setup.batch` is the micro-batch of the whole run (`TrainConfig.batch_size`): each of the N devices
runs batch / N sequences of it, so the activation terms of both strategies are those of the
one-device estimate at batch / N. The persistent terms differ:

    ddp    every term of `estimate` at batch / N: the whole base, the adapters, their gradients (views
           into DDP's all-reduce buckets: no second copy) and the AdamW states
    fsdp   weights     base / N (this device's shards)
                       + the root's parameters whole (embeddings, LM head, final norm): FSDP2 keeps
                         the root gathered from its forward to the end of the backward
                       + two decoder blocks whole: the one computing and the next one, gathered ahead
           master, optimizer   / N (this device's adapter shards and their AdamW states)
           gradients   / N, + one block's gradients whole, before their reduce-scatter

Padding of shards to equal sizes and the all-gather / reduce-scatter staging of one block are not
counted (at most a block's worth of bytes).
"""

from __future__ import annotations

import dataclasses

from lorafit.errors import LorafitError
from lorafit.train.estimate.memory import TERMS, MemoryEstimate, estimate
from lorafit.train.estimate.setup import DTYPE_BYTES, GIB, TrainSetup
from lorafit.train.estimate.weights import base_weights

STRATEGIES = ("ddp", "fsdp")


def block_weight_bytes(setup: TrainSetup) -> float:
    """Bytes of one decoder block's weights: its linear layers (NF4 or ternary storage when quantized,
    else the dtype) and its two RMSNorm weights (the dtype)."""
    s, d = setup.shape, DTYPE_BYTES[setup.dtype]
    base = base_weights(setup)
    linears = base.codes + base.scales if setup.method in ("qlora", "ternary") else s.n_linear_params * d
    return linears / s.layers + 2 * s.hidden * d


def per_device(setup: TrainSetup, nproc: int) -> dict[str, MemoryEstimate]:
    """{"ddp": ..., "fsdp": ...}: the peak memory of one of `nproc` devices (see the module docstring)."""
    if not isinstance(nproc, int) or nproc < 1:
        raise LorafitError(f"nproc={nproc!r} must be a number of processes, at least 1")
    if setup.batch % nproc:
        raise LorafitError(f"batch={setup.batch} cannot be split evenly over {nproc} devices: use a multiple of "
                           f"{nproc} (the batch is the whole run's micro-batch, each device takes batch / {nproc})")
    local = estimate(dataclasses.replace(setup, batch=setup.batch // nproc))
    layers = setup.shape.layers
    block = block_weight_bytes(setup)
    root = max(local.weights - layers * block, 0.0)
    fsdp = dataclasses.replace(
        local,
        weights=local.weights / nproc + root + min(2, layers) * block,
        master=local.master / nproc,
        gradients=local.gradients / nproc + local.gradients / layers,
        optimizer=local.optimizer / nproc,
    )
    return {"ddp": local, "fsdp": fsdp}


def format_per_device(setup: TrainSetup, nproc: int, device_gb: float | None = None) -> str:
    """The two estimates side by side, term by term, in GiB per device (and whether each fits a
    device of `device_gb` GiB, when given)."""
    results = per_device(setup, nproc)
    lines = [f"{setup.method} r={setup.rank} | {nproc} devices | micro-batch {setup.batch} "
             f"({setup.batch // nproc} per device) x seq {setup.seq} | {setup.dtype} | {setup.device} | "
             "GiB per device",
             f"{'term':<12} {'ddp':>9} {'fsdp':>9}"]
    for term in TERMS:
        lines.append(f"{term:<12} {getattr(results['ddp'], term) / GIB:9.2f} {getattr(results['fsdp'], term) / GIB:9.2f}")
    lines.append(f"{'total':<12} {results['ddp'].total_gb:9.2f} {results['fsdp'].total_gb:9.2f}")
    if device_gb is not None:
        verdict = ["fits" if results[s].fits(device_gb) else "does NOT fit" for s in STRATEGIES]
        lines.append(f"a {device_gb:g} GiB device: ddp {verdict[0]}, fsdp {verdict[1]}")
    return "\n".join(lines)
