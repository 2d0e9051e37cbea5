"""Estimates over model sizes x LoRA ranks as plain text.

    format_grid   the feasibility table `lorafit estimate` prints: one row per size, its base weights
                  (for a quantized base in parts: codes, scales, what stays 16-bit), a fits / does not
                  fit mark per rank, and the total at one rank
    format_table  one row per size and rank, every term
"""

from __future__ import annotations

from typing import Any

from lorafit.train.estimate.memory import estimate
from lorafit.train.estimate.setup import GIB, TrainSetup

TABLE_SIZES = ("1B", "3B", "7B", "8B", "13B", "34B", "65B", "70B")
TABLE_RANKS = (8, 16, 32, 64)
MARKS = ("✓", "✗")


def _title(first: TrainSetup, batch: int, seq: int) -> str:
    return (f"{first.method} | {first.device} | batch {batch} x seq {seq} | {first.dtype} | "
            f"grad checkpointing {'on' if first.grad_checkpointing else 'off'} | {first.optimizer} | GiB")


def _render(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]], left: int) -> str:
    """Columns padded to their widest cell; the first `left` left-aligned, the others right-aligned."""
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if c < left else f"{{:>{w}}}" for c, w in enumerate(widths))
    lines = [title, fmt.format(*header), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + [fmt.format(*r) for r in rows])


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def format_grid(
    method: str = "qlora",
    batch: int = 1,
    seq: int = 512,
    sizes: tuple[str, ...] = TABLE_SIZES,
    ranks: tuple[int, ...] = TABLE_RANKS,
    gpu_gb: float = 16,
    rank: int = 16,
    marks: tuple[str, str] = MARKS,
    **setup: Any,
) -> str:
    """Which sizes fit `gpu_gb` at which rank: one row per size (the specification's layout).

    Columns: size, parameters (billions), the base's weights (for 'qlora' and 'ternary' also its
    parts: `BaseWeights.codes`, `.scales`, `.dense`, which sum to it), then `marks[0]` where the
    whole estimate at that rank fits `gpu_gb` GiB and `marks[1]` where it does not, and the total
    (GiB, overhead included) at rank `rank`. For 'full' one mark: ranks do not apply. Extra keyword
    arguments go to `TrainSetup` (device, dtype, grad_checkpointing, optimizer, group_size, ...).
    """
    first = TrainSetup(model=sizes[0], method=method, rank=rank, batch=batch, seq=seq, **setup)
    full, quantized = method == "full", method in ("qlora", "ternary")
    columns = (rank,) if full else ranks
    parts_header = ("packed" if method == "ternary" else "codes", "scales", f"{first.dtype} parts")
    header = ("model", "params", *(parts_header if quantized else ()), "weights",
              *(("fits",) if full else (f"r={r}" for r in columns)), "total" if full else f"total r={rank}")
    rows, notes = [], []
    for size in sizes:
        by_rank = {r: estimate(TrainSetup(model=size, method=method, rank=r, batch=batch, seq=seq, **setup))
                   for r in {*columns, rank}}
        e = by_rank[rank]
        if e.setup.shape.interpolated:
            notes.append(f"  {e.setup.shape.describe()}")
        parts = (_gib(e.base.codes), _gib(e.base.scales), _gib(e.base.dense)) if quantized else ()
        fits = [marks[0] if by_rank[r].fits(gpu_gb) else marks[1] for r in columns]
        rows.append((size, f"{e.n_params / 1e9:.2f}B", *parts, _gib(e.weights), *fits, _gib(e.total)))
    title = f"{_title(first, batch, seq)} | fits {gpu_gb:g} GiB? ({marks[0]}/{marks[1]})"
    table = _render(title, header, rows, left=1)
    return table + ("\nsizes that are no known model's, shaped by interpolation:\n" + "\n".join(notes) if notes else "")


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
    header = ("model", "rank", "params", "trainable", "weights", "grads+optim", "activations", "total",
              f"fits {gpu_gb:g} GiB?")
    rows = []
    for size in sizes:
        for rank in ranks if method != "full" else (None,):
            e = estimate(TrainSetup(model=size, method=method, rank=rank or 1, batch=batch, seq=seq, **setup))
            rows.append((size, "-" if rank is None else str(rank), f"{e.n_params / 1e9:.2f}B", f"{e.n_trainable:,}",
                         _gib(e.weights), _gib(e.master + e.gradients + e.optimizer),
                         _gib(e.activations + e.logits + e.workspace), _gib(e.total),
                         "yes" if e.fits(gpu_gb) else "no"))
    return _render(_title(first, batch, seq), header, rows, left=2)
