"""lorafit inspect on the real demo adapter (SmolLM2, shared session fixture): the report, the JSON and
PNGs that open as images; one module's numbers against a direct computation; bad input in one line."""

import json
import math
import re

import pytest
import torch
from PIL import Image

from lorafit.cli import main
from lorafit.io import read_adapter
from lorafit.model import load_model

LAYERS = r"layers\.(0|29)\."  # two of the 30 blocks keep the test short; the CLI's default is all


def test_inspect_the_demo_adapter(demo_adapter, tmp_path, capsys):
    adapter, _ = demo_adapter
    out = tmp_path / "report"
    assert main(["inspect", str(adapter), "--out", str(out), "--modules", LAYERS,
                 "--checkpoints", str(adapter.parent)]) == 0
    for name in ("delta_norms.png", "spectra.png", "histogram.png", "steps.png"):
        with Image.open(out / name) as image:
            image.verify()
            assert image.format == "PNG" and min(image.size) > 100
    report = (out / "report.md").read_text()
    assert "](delta_norms.png)" in report and "rank_pattern" in report and "| q_proj |" in report
    data = json.loads((out / "inspect.json").read_text())
    assert len(data["modules"]) == 14  # 7 projections in each of the 2 blocks

    # layer 29's v_proj, computed here from the adapter file and the base weight
    record = next(m for m in data["modules"] if m["path"].endswith("layers.29.self_attn.v_proj"))
    config, state = read_adapter(adapter)
    entry = state.layers[record["path"]]
    dW = config.scaling_for(record["path"]) * (entry["B"].double() @ entry["A"].double())
    model, _ = load_model(None)
    W = model.get_submodule(record["path"]).weight.detach().double()
    s = torch.linalg.svdvals(dW)
    assert record["delta_fro"] == pytest.approx(float(dW.norm()), rel=1e-6)
    assert record["relative"] == pytest.approx(float(dW.norm() / W.norm()), rel=1e-6)
    assert record["singular_values"] == pytest.approx(s[:config.r].tolist(), rel=1e-6, abs=1e-9)
    p = s[s > 1e-12 * s[0]] / s.sum()
    assert record["effective_rank"] == pytest.approx(math.exp(-float((p * p.log()).sum())), rel=1e-6)
    assert record["stable_rank"] == pytest.approx(float((s**2).sum() / s[0] ** 2), rel=1e-6)
    assert data["steps"]["layers"] == [0, 29]  # --modules: the analysed blocks only
    suggested = data["suggested_lora"]  # for the analysed modules only: the others keep the adapter's r
    assert suggested["r"] == config.r
    assert all(any(re.fullmatch(k, m["path"]) for m in data["modules"]) for k in suggested["rank_pattern"])


def test_bad_input_is_one_line_before_loading(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "adapter folder not found" in err
    assert main(["inspect", str(tmp_path), "--out", str(tmp_path / "o"), "--energy", "1.5"]) == 2
    assert "--energy" in capsys.readouterr().err
