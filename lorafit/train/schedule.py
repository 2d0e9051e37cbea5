"""What each optimizer step takes besides its samples (lorafit.train.order): its learning rate
(`lr_factor`) and the optimizer that applies it (`make_optimizer`)."""

from __future__ import annotations

import math

import torch
from torch import nn

from lorafit.errors import LorafitError


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
