"""The family matrix, estimator side: `lorafit estimate --model FOLDER` counts every parameter of the
Llama-style families exactly (what transformers' model says, `num_parameters()`), and names what it does
not model for the others, in one line with exit status 2."""

from __future__ import annotations

import pytest

from lorafit.cli import main
from lorafit.train.estimate.shapes import BLOCK_VECTORS
from tests.families import matrix
from tests.families.kit import CONFIGS, FAMILIES, make_model, save_model, tokenizer


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.mark.parametrize("family", FAMILIES)
def test_estimate_counts_every_parameter(family, tok, tmp_path, capsys):
    folder = save_model(family, tok, tmp_path / "model")
    capsys.readouterr()
    status = main(["estimate", "--model", str(folder)])
    out, err = capsys.readouterr()
    if CONFIGS[family](tok).model_type in BLOCK_VECTORS:
        assert status in (0, None)
        assert f"{make_model(family, tok).num_parameters():,} params" in out.splitlines()[0]
        return
    assert status == 2 and not out
    line = err.strip()
    assert "\n" not in line and "is not a Llama-style decoder" in line and "Traceback" not in line
    matrix.refused(family, "estimate", line.split("config.json: ", 1)[1].split("; the estimator knows")[0])
