"""bench/gpu_train.py imports and runs one training step of each side on CPU at a tiny shape.

(The full `--dry-run`, which also spawns one subprocess per side and probes the batch, is left to
`python bench/gpu_train.py --dry-run`: about a minute on a shared CPU.)
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu_train.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_train", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("side", ["lorafit", "peft"])
def test_one_step_per_side(bench, side, capsys):
    if side == "peft":
        pytest.importorskip("peft")
        pytest.importorskip("bitsandbytes")
    bench.main(["--side", side, "--shape", "tiny", "--seq", "16", "--steps", "1", "--device", "cpu",
                "--batch", "1"])
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    assert result["ok"] and result["tokens_per_s"] > 0 and result["trainable"] > 0
    assert 5.0 < result["loss"] < 6.0  # ~ln(256) at random init


def test_flops_formula(bench):
    # Llama 3 8B: ~7.5e9 linear parameters incl. the head -> 6N = 4.5e10 plus 12 L H T = 3.2e9 attention FLOPs per token at seq 2048
    assert 4.7e10 < bench.model_flops_per_token("8b", 2048) < 4.9e10
