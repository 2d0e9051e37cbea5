"""The ablation's tables (results.md, results.json) and plots (PNG, matplotlib's Agg backend).

    results.md   all points, then one table per axis (methods, each --grid key) through the first
                 value of the other axes: the rank table, the memory-vs-quality table, the target table
    accuracy_vs_params.png   exact match against trainable parameters (log x)
    loss_curves.png          training loss of every point, overlaid
    memory_vs_accuracy.png   peak memory against exact match
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorafit import plots

COLUMNS = [("trainable_params", "trainable params", "{:,}"), ("trainable_pct", "trainable %", "{:.3f}"),
           ("val_loss", "val loss", "{:.4f}"), ("val_ppl", "perplexity", "{:.3f}"),
           ("exact_match", "exact match", "{:.1%}"), ("peak_memory_mib", "peak memory (MiB)", "{:,.0f}"),
           ("wall_s", "wall time (s)", "{:.0f}"), ("tokens_per_s", "train tokens/s", "{:.0f}")]


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def table(rows: list[dict], keys: list[str]) -> list[str]:
    """A Markdown table: the settings columns `keys`, then the measured COLUMNS."""
    head = ["point", *keys, *(title for _, title, _ in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---|" * len(keys) + "---:|" * len(COLUMNS)]
    for row in rows:
        settings = [str(row["settings"].get(k, "-")) for k in keys]
        lines.append("| " + " | ".join([row["name"], *settings,
                                        *(_cell(row["result"].get(k), f) for k, _, f in COLUMNS)]) + " |")
    return lines


def axis_slices(rows: list[dict], axes: list[tuple[str, list[Any]]]) -> list[tuple[str, list[dict]]]:
    """(axis, rows) for every axis with more than one value: the points where every other axis is at
    its first value (an axis a point does not have, like lora.r for full, does not count)."""
    slices = []
    for key, values in axes:
        if len(values) < 2:
            continue
        others = {k: vs[0] for k, vs in axes if k != key}
        chosen = [r for r in rows if all(r["settings"].get(k, v) == v for k, v in others.items())]
        slices.append((key, chosen))
    return slices


def markdown(title: str, rows: list[dict], axes: list[tuple[str, list[Any]]], note: str = "", tag: str = "") -> str:
    keys = [k for k, _ in axes]
    lines = [f"# {title}", ""] + ([note, ""] if note else []) + ["## All points", ""] + table(rows, keys)
    for key, chosen in axis_slices(rows, axes):
        fixed = ", ".join(f"{k} = {vs[0]}" for k, vs in axes if k != key)
        lines += ["", f"## By {key}" + (f" ({fixed})" if fixed else ""), ""] + table(chosen, keys)
    lines += ["", f"![accuracy against trainable parameters]({tag}accuracy_vs_params.png)", "",
              f"![loss curves]({tag}loss_curves.png)", "", f"![memory against accuracy]({tag}memory_vs_accuracy.png)", ""]
    return "\n".join(lines)


def labels(rows: list[dict]) -> dict[str, str]:
    """Point name -> a short label: only the settings that differ between the rows (`r=8`, `full`)."""
    keys = list(dict.fromkeys(k for row in rows for k in row["settings"]))
    varying = [k for k in keys if len({str(row["settings"][k]) for row in rows if k in row["settings"]}) > 1]
    out = {}
    for row in rows:
        parts = [f"{k.rsplit('.', 1)[-1].replace('target_modules', 'targets')}={row['settings'][k]}"
                 for k in varying if k in row["settings"] and k != "method"]
        method = row["settings"].get("method", "")
        out[row["name"]] = " ".join(([method] if "method" in varying or not parts else []) + parts) or row["name"]
    return out


def _scatter(rows: list[dict], x: str, y: str, path: Path, xlabel: str, ylabel: str, logx: bool) -> Path:
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    names = labels(rows)
    for i, row in enumerate(rows):
        vx, vy = row["result"].get(x), row["result"].get(y)
        if vx is None or vy is None:
            continue
        ax.scatter([vx], [100 * vy if y == "exact_match" else vy], s=30)
        ax.annotate(names[row["name"]], (vx, 100 * vy if y == "exact_match" else vy), fontsize=7,
                    xytext=(4, 4 if i % 2 == 0 else -10), textcoords="offset points")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return plots.save(fig, path)


def plot_losses(rows: list[dict], path: Path) -> Path:
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    names = labels(rows)
    for row in rows:
        curve = row["result"].get("loss_curve") or []
        if curve:
            ax.plot([c[0] for c in curve], [c[1] for c in curve], lw=1, label=names[row["name"]])
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return plots.save(fig, path)


def write_results(out: str | Path, title: str, rows: list[dict], axes: list[tuple[str, list[Any]]],
                  note: str = "", tag: str = "") -> list[Path]:
    """results.json, results.md and the three PNGs in `out`, each name prefixed by `tag` (several
    ablations can share one folder and so their points); rows: {"name", "settings", "result"}."""
    out = Path(out)
    data = {"title": title, "axes": [[k, vs] for k, vs in axes], "points": rows}
    (out / f"{tag}results.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / f"{tag}results.md").write_text(markdown(title, rows, axes, note, tag))
    return [out / f"{tag}results.json", out / f"{tag}results.md",
            _scatter(rows, "trainable_params", "exact_match", out / f"{tag}accuracy_vs_params.png",
                     "trainable parameters (log)", "held-out exact match (%)", logx=True),
            plot_losses(rows, out / f"{tag}loss_curves.png"),
            _scatter(rows, "peak_memory_mib", "exact_match", out / f"{tag}memory_vs_accuracy.png",
                     "peak memory (MiB)", "held-out exact match (%)", logx=False)]
