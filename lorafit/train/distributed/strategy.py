"""`distributed: auto`: DDP when one device holds the whole training step, else FSDP.

DDP is the faster of the two when it fits (no all-gather of the base in every forward and backward),
FSDP the one that fits when it does not. The decision uses lorafit's memory estimate
(lorafit.train.estimate.distributed, what `lorafit estimate --nproc N` prints): the per-device peak
of a DDP run is compared with the device's memory, a GPU's total memory, or on the CPU the machine's
RAM divided among the processes on it (LOCAL_WORLD_SIZE). A model the estimator cannot describe
(not a Llama-style decoder) runs with DDP.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from lorafit.errors import LorafitError
from lorafit.quant.linear import PackedLinear
from lorafit.quant.ternary import TernaryLinear
from lorafit.train.estimate.distributed import per_device
from lorafit.train.estimate.setup import GIB, TrainSetup

ESTIMATE_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def device_memory(device: torch.device, world_size: int) -> float:
    """Bytes one process may use: the GPU's total memory, or this machine's RAM over its processes."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(local, 1)


def method_of(quantize: str | None) -> str:
    """The estimator's method for a base: dense is LoRA, NF4 is QLoRA, ternary is ternary (one fp32
    scale per row; smaller groups add 4 bytes per group, at most a few percent of the base)."""
    return {None: "lora", "nf4": "qlora", "ternary": "ternary"}[quantize]


def choose_strategy(requested: str, world_size: int, model_config: Any, *, quantize: str | None, rank: int,
                    batch_size: int, seq: int, device: torch.device, dtype: torch.dtype,
                    checkpointing: bool | None) -> tuple[str, str]:
    """(strategy, why): `requested` ("ddp" / "fsdp") as it is, or for "auto" the choice above.
    `model_config`: an HF config or a config.json path; `batch_size` the whole run's micro-batch."""
    if requested != "auto":
        return requested, "as configured"
    if model_config is None:
        return "ddp", "no config to estimate the model's memory from"
    try:
        setup = TrainSetup(model=model_config, method=method_of(quantize), rank=rank, batch=batch_size, seq=seq,
                           device="cuda" if device.type == "cuda" else "cpu",
                           dtype=ESTIMATE_DTYPES.get(dtype, "fp32"),
                           grad_checkpointing=checkpointing if checkpointing is not None else device.type == "cuda")
        ddp = per_device(setup, world_size)["ddp"]
    except LorafitError as e:
        return "ddp", f"no memory estimate for this model ({e})"
    capacity = device_memory(device, world_size)
    need = f"a DDP process needs ~{ddp.total_gb:.1f} GiB (lorafit estimate)"
    if ddp.total <= capacity:
        return "ddp", f"{need}, {capacity / GIB:.0f} GiB are there per process"
    return "fsdp", f"{need}, more than the {capacity / GIB:.0f} GiB there are per process"


def quantization_of(model: nn.Module) -> str | None:
    """"ternary" when the model's linear layers are TernaryLinear, "nf4" when they are another packed
    format (NF4Linear), else None."""
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    if not packed:
        return None
    return "ternary" if all(isinstance(m, TernaryLinear) for m in packed) else "nf4"
