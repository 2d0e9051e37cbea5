"""`lorafit eval` on the demo (the real SmolLM2-135M, NF4): the base and the demo's adapter side by side give
the demo's own exact-match figures, and perplexities equal to exp of the validation losses it logged.

The demo runs shortened (fewer steps and examples: the numbers are compared, not judged); the full demo's
comparison is in bench/RESULTS.md."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lorafit.demo import ANSWER_TOKENS, EVAL_BATCH, DemoConfig, run_demo
from lorafit.evaluation.run import eval_command


@pytest.mark.usefixtures("smollm2_dir")
def test_eval_reproduces_the_demos_figures(tmp_path):
    torch.set_num_threads(2)
    out = tmp_path / "demo"
    demo = run_demo(DemoConfig(output_dir=str(out), n_train=64, n_eval=20, steps=10, device="cpu"))
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["val_loss"] == demo["val_after"]

    results = eval_command(str(out / "data" / "val.jsonl"), [f"demo={out / 'adapter'}"], quantize="nf4",
                           device="cpu", out=str(tmp_path / "eval"), max_new_tokens=ANSWER_TOKENS,
                           batch_size=EVAL_BATCH)
    base, adapter = results["models"]["base"], results["models"]["demo"]
    assert adapter["exact"] == demo["acc_after"] and base["exact"] == demo["acc_before"]
    assert adapter["perplexity"] == pytest.approx(math.exp(logged[-1]["val_loss"]), rel=1e-4)
    assert adapter["perplexity"] == pytest.approx(logged[-1]["val_ppl"], rel=1e-4)
    assert base["perplexity"] == pytest.approx(math.exp(demo["val_before"]), rel=1e-4)
    assert adapter["loss"] < base["loss"] and adapter["exact"] > 0  # the fine-tune learned something to compare
