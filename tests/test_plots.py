"""One way to write a figure: laid out, saved as a PNG that opens, and closed (pyplot keeps open figures)."""

from __future__ import annotations

from PIL import Image

from lorafit import plots


def test_save_writes_a_png_and_closes_the_figure(tmp_path):
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(2, 1.5), dpi=50)
    ax.plot([0, 1], [1, 0])
    open_before = len(plt.get_fignums())
    assert plots.save(fig, tmp_path / "line.png") == tmp_path / "line.png"
    assert len(plt.get_fignums()) == open_before - 1
    with Image.open(tmp_path / "line.png") as image:
        assert image.format == "PNG" and image.size == (100, 75)
