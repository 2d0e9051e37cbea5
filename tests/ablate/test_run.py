"""lorafit ablate on a tiny Llama (random weights, SmolLM2's tokenizer) with a 2x2 grid: one row per point;
killed (SIGKILL) after its first point and started again, it runs only the remaining points; a bad grid
spec is one line and exit status 2 before anything trains."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lorafit.ablate.grid import build_points, parse_axis
from lorafit.cli import main
from lorafit.train.demo_task import make_splits, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
GRID = ["--grid", "lora.r=2,4", "--grid", "lora.target_modules=q|all"]


@pytest.fixture(scope="module")
def config(smollm2_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ablate")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
                     ).save_pretrained(root / "tiny")
    AutoTokenizer.from_pretrained(smollm2_dir).save_pretrained(root / "tiny")
    train, val = make_splits(16, 4, seed=0)
    data = {"path": str(write_jsonl(root / "train.jsonl", train)), "val_path": str(write_jsonl(root / "val.jsonl", val)),
            "max_seq_length": 128}
    path = root / "ablate.yaml"
    path.write_text(yaml.safe_dump({"model": str(root / "tiny"), "device": "cpu", "data": data, "max_steps": 2,
                                    "batch_size": 4, "learning_rate": 1e-3, "warmup_ratio": 0.0}))
    return path


def test_ablate_a_2x2_grid_killed_after_the_first_point_resumes(config, tmp_path, capsys):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lorafit", "ablate", str(config), *GRID, "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while not list(out.glob("points/*/result.json")):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)  # a real kill: no handler runs, nothing is cleaned up
        proc.wait()
    first = {p.parent.name: p.read_bytes() for p in out.glob("points/*/result.json")}
    assert 1 <= len(first) < 4

    assert main(["ablate", str(config), *GRID, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"4 points; {len(first)} finished before (kept), {4 - len(first)} to run" in printed
    for name, content in first.items():  # never run again
        assert (out / "points" / name / "result.json").read_bytes() == content
        assert f"point {name}" not in printed

    # the same points from another step budget are not taken for finished ones
    assert main(["ablate", str(config), *GRID, "--out", str(out), "--set", "max_steps=3"]) == 2
    assert "run with another config" in capsys.readouterr().err

    data = json.loads((out / "results.json").read_text())
    assert len(data["points"]) == 4
    assert {tuple(sorted(p["settings"].items())) for p in data["points"]} == {
        tuple(sorted({"method": "lora", "lora.r": r, "lora.target_modules": t}.items()))
        for r in (2, 4) for t in ("q", "all")}
    for row in data["points"]:
        result = row["result"]
        assert result["steps"] == 2 and result["n_eval"] == 4 and 0 <= result["exact_match"] <= 1
        assert result["val_loss"] > 0 and result["peak_memory_mib"] > 0 and result["tokens_per_s"] > 0
        assert 0 < result["trainable_params"] < result["total_params"]
    by_name = {row["name"]: row["result"] for row in data["points"]}
    assert by_name["lora_r=2_target_modules=q"]["trainable_params"] < by_name["lora_r=2_target_modules=all"][
        "trainable_params"] < by_name["lora_r=4_target_modules=all"]["trainable_params"]
    q_point = yaml.safe_load((out / "points" / "lora_r=2_target_modules=q" / "point.yaml").read_text())
    assert q_point["lora"]["target_modules"] == ["q_proj"]  # the short name, in the family's names
    table = (out / "results.md").read_text()
    assert sum(line.startswith("| lora_r=") for line in table.splitlines()) >= 4
    for png in ("accuracy_vs_params.png", "loss_curves.png", "memory_vs_accuracy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("flags, message", [
    (["--grid", "lora.rank=1,2"], "unknown key 'lora.rank'"),
    (["--grid", "lora.r="], "empty value list"),
    (["--grid", "lora.r=1,,2"], "empty value list"),
    (["--methods", "lora,qlorra"], "unknown method 'qlorra'"),
    (["--grid", "lora.r=0,4"], "lora.r must be a positive integer"),
])
def test_a_bad_grid_spec_is_one_line_and_exit_2_before_training(config, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    assert main(["ablate", str(config), *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not out.exists()


def test_full_points_ignore_lora_keys(config, tmp_path):
    raw = yaml.safe_load(config.read_text())
    points = build_points(raw, [parse_axis("lora.r=2,4")], ["lora", "full"], tmp_path,
                          method_sets={"full": [("learning_rate", "1e-4")]})
    assert [p.name for p in points] == ["lora_r=2", "lora_r=4", "full"]
    assert points[2].config.train.method == "full" and points[2].config.quantize is None
    assert points[2].config.train.learning_rate == 1e-4 and points[0].config.train.learning_rate == 1e-3
