"""The curves a run draws in its output folder: loss.png (training and validation loss) and, for the
preference objectives, rewards.png (reward accuracy, chosen / rejected rewards and their margin)."""

from __future__ import annotations

from pathlib import Path

from lorafit import plots


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
    ax.set_ylabel("loss (nats/token)" if not history or "rewards/chosen" not in history[0] else "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_rewards(history: list[dict], path: Path, title: str | None = None) -> Path:
    """rewards/accuracies (left) and rewards/chosen, rewards/rejected, rewards/margins (right) over steps,
    with their validation values as points where the run evaluated."""
    plt = plots.pyplot()
    panels = [(names, label) for names, label in (
        (["rewards/accuracies"], "share of pairs"),
        (["rewards/chosen", "rewards/rejected", "rewards/margins"], "reward (beta * log-ratio)"))
        if any(name in h for h in history for name in names)]  # (KTO has no pairs: no accuracy panel)
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), dpi=120, squeeze=False)
    steps = [h["step"] for h in history]
    for ax, (names, label) in zip(axes[0], panels):
        for name in names:
            if any(name in h for h in history):
                values = [h.get(name) for h in history]  # (null: a non-finite step)
                line, = ax.plot(steps, [float("nan") if v is None else v for v in values], lw=1, label=name)
                val = [h for h in history if h.get(f"val_{name}") is not None]
                if val:
                    ax.plot([h["step"] for h in val], [h[f"val_{name}"] for h in val], "o", color=line.get_color(),
                            label=f"validation {name.split('/')[1]}")
        if names == ["rewards/accuracies"]:
            ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return plots.save(fig, path)
