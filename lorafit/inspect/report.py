"""`lorafit inspect`'s files: report.md, inspect.json and the PNGs (matplotlib, Agg backend).

    delta_norms.png   heatmap layer x module of ‖ΔW‖_F and of ‖ΔW‖_F / ‖W‖_F
    spectra.png       σ_i / σ_1 of ΔW per module type, one line per layer (log scale)
    histogram.png     the entries of W against those of ΔW, as log10 |entry|
    steps.png         (with --checkpoints) heatmap training step x layer of ‖s·B·A‖_F
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from lorafit import plots
from lorafit.inspect.analyze import Analysis, ModuleStats
from lorafit.inspect.checkpoints import StepNorms


def grid(modules: list[ModuleStats], attr: str) -> tuple[list[int], list[str], list[list[float]]]:
    """(layers, module names, values[layer][module]) of one ModuleStats field; NaN where not adapted."""
    layers = sorted({m.layer for m in modules if m.layer is not None})
    names = list(dict.fromkeys(m.module for m in modules if m.layer is not None))
    values = [[float("nan")] * len(names) for _ in layers]
    for m in modules:
        if m.layer is not None:
            values[layers.index(m.layer)][names.index(m.module)] = getattr(m, attr)
    return layers, names, values


def plot_delta_norms(analysis: Analysis, path: Path) -> Path:
    plt = plots.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 6), dpi=110)
    for ax, attr, title in ((axes[0], "delta_fro", "‖ΔW‖_F"), (axes[1], "relative", "‖ΔW‖_F / ‖W‖_F")):
        layers, names, values = grid(analysis.modules, attr)
        image = ax.imshow(values, aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_yticks(range(len(layers))[::max(1, len(layers) // 15)], layers[::max(1, len(layers) // 15)])
        ax.set_ylabel("layer")
        ax.set_title(title)
        fig.colorbar(image, ax=ax)
    return plots.save(fig, path)


def plot_spectra(analysis: Analysis, path: Path) -> Path:
    return plots.save(spectra_figure(analysis), path)


def spectra_figure(analysis: Analysis):
    """σ_i / σ_1 of ΔW per module type, one line per analysed layer, coloured by layer (the legend
    gives the colours of up to 8 of them)."""
    plt = plots.pyplot()
    names = list(dict.fromkeys(m.module for m in analysis.modules))
    cols = min(4, max(1, len(names)))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), dpi=110, squeeze=False)
    layers = sorted({m.layer or 0 for m in analysis.modules})  # the analysed layers only
    cmap = plt.get_cmap("viridis")

    def colour(layer: int):
        return cmap(layers.index(layer) / max(1, len(layers) - 1))
    for ax, name in zip(axes.flat, names):
        group = [m for m in analysis.modules if m.module == name]
        for m in group:
            s = [v for v in m.singular_values if v > 0]
            if s:
                ax.semilogy(range(1, len(s) + 1), [v / s[0] for v in s], color=colour(m.layer or 0), lw=0.8)
        erank = sum(m.effective_rank for m in group) / len(group)
        srank = sum(m.stable_rank for m in group) / len(group)
        ax.set_title(f"{name}: erank {erank:.1f}, srank {srank:.1f}", fontsize=9)
        ax.set_xlabel("i", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes[0][0].set_ylabel("σ_i / σ_1 of ΔW")
    shown = layers if len(layers) <= 8 else [layers[round(i * (len(layers) - 1) / 7)] for i in range(8)]
    proxies = [plt.Line2D([], [], color=colour(layer), lw=1.5) for layer in shown]  # the colour of each layer
    axes[0][0].legend(proxies, [f"layer {layer}" for layer in shown], fontsize=6, title="colour", title_fontsize=6)
    fig.suptitle("spectra of ΔW per module type, one line per layer", fontsize=10)
    return fig


def plot_histogram(analysis: Analysis, path: Path) -> Path:
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    for key, label in (("W", "W (base)"), ("dW", "ΔW (update)")):
        values = analysis.samples[key].abs()
        values = values[values > 0].log10()
        if values.numel():
            ax.hist(values.numpy(), bins=120, alpha=0.6, label=label, density=True)
    ax.set_xlabel("log10 |entry|")
    ax.set_ylabel("density")
    ax.set_title("entries of W against those of ΔW (sampled over all adapted modules)", fontsize=9)
    ax.legend()
    return plots.save(fig, path)


def plot_steps(norms: StepNorms, path: Path) -> Path:
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4), dpi=110)
    image = ax.imshow(norms.norms, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_yticks(range(len(norms.steps)), norms.steps)
    ax.set_ylabel("optimizer step")
    ticks = range(len(norms.layers))[::max(1, len(norms.layers) // 15)]
    ax.set_xticks(list(ticks), [norms.layers[i] for i in ticks])
    ax.set_xlabel("layer")
    ax.set_title("‖s·B·A‖_F per layer (all adapted modules of the layer) over training")
    fig.colorbar(image, ax=ax)
    return plots.save(fig, path)


def markdown(analysis: Analysis, title: str, steps: StepNorms | None) -> str:
    mods = analysis.modules
    lines = [f"# {title}", "",
             f"{len(mods)} adapted linear modules. ΔW is what the adapter adds to W when merged "
             "(DoRA: including its magnitudes).", "",
             "## ‖ΔW‖_F per layer and module (‖ΔW‖_F / ‖W‖_F in brackets)", "", "![norms](delta_norms.png)", ""]
    layers, names, norm = grid(mods, "delta_fro")
    _, _, rel = grid(mods, "relative")
    lines += ["| layer | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for i, layer in enumerate(layers):
        cells = [f"{norm[i][j]:.3g} ({100 * rel[i][j]:.2f}%)" if norm[i][j] == norm[i][j] else "-"
                 for j in range(len(names))]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    lines += ["", "## Spectra, ranks and intruder dimensions per module type", "", "![spectra](spectra.png)", "",
              f"Means over layers. Energy rank: singular values holding {100 * analysis.energy:.0f}% of ‖ΔW‖_F². "
              f"Intruders: of the top {analysis.intruder_k} singular vectors of W + ΔW, those with |cos| < "
              f"{analysis.intruder_eps} to every singular vector of W (Shuttleworth et al. 2024).", "",
              "| module | rank | effective rank | stable rank | energy rank | intruders (mean) | layers with intruders |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name in dict.fromkeys(m.module for m in mods):
        group = [m for m in mods if m.module == name]
        n = len(group)
        intr = [m.intruders for m in group if m.intruders is not None]
        intr_cells = f"{sum(intr) / len(intr):.2f} | {sum(1 for v in intr if v)}" if intr else "- | -"
        lines.append(f"| {name} | {max(m.rank for m in group)} | {sum(m.effective_rank for m in group) / n:.2f} | "
                     f"{sum(m.stable_rank for m in group) / n:.2f} | {sum(m.energy_rank for m in group) / n:.1f} | "
                     f"{intr_cells} |")
    dora = [m for m in mods if m.magnitude]
    if dora:
        lines += ["", "## DoRA magnitudes", "", "m / ‖W‖_row: 1.0 where a magnitude kept its initial value.", "",
                  "| module | mean m | m/‖W‖ mean | min | max |", "|---|---:|---:|---:|---:|"]
        for name in dict.fromkeys(m.module for m in dora):
            group = [m.magnitude for m in dora if m.module == name]
            lines.append(f"| {name} | {sum(g['mean'] for g in group) / len(group):.4g} | "
                         f"{sum(g['ratio_mean'] for g in group) / len(group):.4f} | "
                         f"{min(g['ratio_min'] for g in group):.4f} | {max(g['ratio_max'] for g in group):.4f} |")
    lines += ["", "## W against ΔW", "", "![histogram](histogram.png)", "",
              f"## Suggested ranks ({100 * analysis.energy:.0f}% of each update's energy)", "",
              "Paste under `lora:` in a training config:", "", "```yaml",
              yaml.safe_dump(analysis.rank_pattern, sort_keys=False).rstrip(), "```", ""]
    if steps is not None:
        lines += ["## ‖s·B·A‖_F per layer over training", "", "![steps](steps.png)", "",
                  f"Steps {', '.join(map(str, steps.steps))}; each cell is the norm of all updates of one layer.", ""]
    return "\n".join(lines)


def write_report(analysis: Analysis, out: str | Path, title: str, steps: StepNorms | None = None) -> list[Path]:
    """report.md, inspect.json and the PNGs in `out` (created); returns the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = analysis.to_json()
    if steps is not None:
        data["steps"] = {"steps": steps.steps, "layers": steps.layers, "norms": steps.norms}
    (out / "inspect.json").write_text(json.dumps(data, indent=1) + "\n")
    files = [out / "inspect.json", plot_delta_norms(analysis, out / "delta_norms.png"),
             plot_spectra(analysis, out / "spectra.png"), plot_histogram(analysis, out / "histogram.png")]
    if steps is not None:
        files.append(plot_steps(steps, out / "steps.png"))
    (out / "report.md").write_text(markdown(analysis, title, steps))
    return [out / "report.md", *files]
