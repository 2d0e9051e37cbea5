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
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], label="train loss", lw=1)
    val = [h for h in history if "val_loss" in h]
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
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5), dpi=120)
    steps = [h["step"] for h in history]
    for ax, names in ((left, ["rewards/accuracies"]), (right, ["rewards/chosen", "rewards/rejected", "rewards/margins"])):
        for name in names:
            if any(name in h for h in history):
                line, = ax.plot(steps, [h.get(name, float("nan")) for h in history], lw=1, label=name)
                val = [h for h in history if f"val_{name}" in h]
                if val:
                    ax.plot([h["step"] for h in val], [h[f"val_{name}"] for h in val], "o", color=line.get_color(),
                            label=f"validation {name.split('/')[1]}")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    left.set_ylim(-0.02, 1.02)
    left.set_ylabel("share of pairs")
    right.set_ylabel("beta * log-ratio")
    if title:
        fig.suptitle(title)
    return plots.save(fig, path)
