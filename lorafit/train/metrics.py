"""A run's metrics as they are written: strict-JSON records for metrics.jsonl and the loss curve (PNG)."""

from __future__ import annotations

import math
from pathlib import Path

from lorafit import plots


def json_record(record: dict) -> dict:
    """A metrics record as strict JSON takes it: a non-finite number becomes null, and the record
    says `"nonfinite": true`."""
    out = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    if any(v is None and record[k] is not None for k, v in out.items()):
        out["nonfinite"] = True
    return out


def plot_losses(history: list[dict], path: Path) -> Path:
    """Training (and validation) loss over steps as a PNG."""
    return plots.save(loss_figure(history), path)


def loss_figure(history: list[dict]):
    """The figure of `plot_losses`: loss against optimizer step, whole steps on the axis."""
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    train = [h for h in history if h.get("loss") is not None]  # (a skipped non-finite step has none)
    ax.plot([h["step"] for h in train], [h["loss"] for h in train], label="train loss", lw=1)
    val = [h for h in history if h.get("val_loss") is not None]
    if val:
        ax.plot([h["step"] for h in val], [h["val_loss"] for h in val], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.xaxis.get_major_locator().set_params(integer=True)  # steps are whole numbers: no 2.5 on the axis
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig
