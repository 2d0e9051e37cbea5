"""`format_table`: estimates over model sizes x LoRA ranks as plain text (`lorafit estimate`)."""

from __future__ import annotations

from typing import Any

from lorafit.train.estimate.memory import estimate
from lorafit.train.estimate.setup import GIB, TrainSetup

TABLE_SIZES = ("1B", "3B", "7B", "8B", "13B", "34B", "70B")
TABLE_RANKS = (8, 16, 32, 64)


def format_table(
    method: str = "lora",
    batch: int = 1,
    seq: int = 512,
    sizes: tuple[str, ...] = TABLE_SIZES,
    ranks: tuple[int, ...] = TABLE_RANKS,
    gpu_gb: float = 16,
    **setup: Any,
) -> str:
    """A plain-text table of estimates over model sizes x LoRA ranks (one row per size for 'full').

    Extra keyword arguments go to `TrainSetup` (dtype, grad_checkpointing, optimizer, ...).
    Columns: size, rank, params (billions), trainable params (exact), weights, grads+optimizer
    (incl. fp32 master copies), activations + logits + workspace, total (all GiB, overhead included),
    and whether it fits `gpu_gb`.
    """
    first = TrainSetup(model=sizes[0], method=method, batch=batch, seq=seq, **setup)
    title = (
        f"{method} | {first.device} | batch {batch} x seq {seq} | {first.dtype} | "
        f"grad checkpointing {'on' if first.grad_checkpointing else 'off'} | {first.optimizer} | GiB"
    )
    fits_col = f"fits {gpu_gb:g} GB?"
    header = (
        "model",
        "rank",
        "params",
        "trainable",
        "weights",
        "grads+optim",
        "activations",
        "total",
        fits_col,
    )
    rows = []
    for size in sizes:
        for rank in ranks if method != "full" else (None,):
            e = estimate(TrainSetup(model=size, method=method, rank=rank or 1, batch=batch, seq=seq, **setup))
            rows.append(
                (
                    size,
                    "-" if rank is None else str(rank),
                    f"{e.n_params / 1e9:.2f}B",
                    f"{e.n_trainable:,}",
                    f"{e.weights / GIB:.2f}",
                    f"{(e.master + e.gradients + e.optimizer) / GIB:.2f}",
                    f"{(e.activations + e.logits + e.workspace) / GIB:.2f}",
                    f"{e.total_gb:.2f}",
                    "yes" if e.fits(gpu_gb) else "no",
                )
            )
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if c < 2 else f"{{:>{w}}}" for c, w in enumerate(widths))
    lines = [title, fmt.format(*header), "  ".join("-" * w for w in widths)]
    lines += [fmt.format(*r) for r in rows]
    return "\n".join(lines)
