"""PNG figures for the trainer, `lorafit inspect` and `lorafit ablate`: matplotlib without a display,
imported only when a figure is drawn, and one way to write a figure out."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only: no display needed, none opened)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> Path:
    """Lay `fig` out, write it to `path` and close it (pyplot keeps every open figure alive)."""
    fig.tight_layout()
    fig.savefig(path)
    pyplot().close(fig)
    return path
