"""`lorafit train --nproc-per-node N`: torchrun started for the user, and the mistakes refused before
any process starts (one line, exit status 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from lorafit.cli import main
from lorafit.io import read_prompt_format
from lorafit.train.distributed.launch import torchrun_command
from tests.train.distributed import kit


def test_nproc_per_node_trains_the_real_smollm2_on_two_processes(dist_data, smollm2_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "lorafit", "train", "--nproc-per-node", "2", "--data", str(dist_data), "--device", "cpu",
         "--max-steps", "2", "--batch-size", "2", "--data.max-seq-length", "64", "--lora.r", "4",
         "--output-dir", str(out)],
        cwd=kit.ROOT, env=kit.worker_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "torch.distributed.run --standalone --nproc-per-node=2 -m lorafit train" in output  # what it ran
    assert "2 processes (cpu), distributed: ddp" in output  # auto: 135M fits a process's share of the RAM
    assert output.count("lorafit train: done") == 1  # rank 0 alone prints
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and len(weights) == 2 * 7 * 30  # A and B of 7 linears in each of 30 blocks
    assert read_prompt_format(out / "adapter") is not None  # rank 0 wrote the prompt format beside it
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "3"], "batch_size 3 cannot be split evenly over 2 processes: use a multiple of 2"),
    (["--batch-size", "1"], "batch_size 1 is smaller than the 2 processes"),
    (["--device", "cuda:1"], "each process uses its own GPU; use --device cuda"),
])
def test_mistakes_are_refused_before_torchrun_starts(dist_data, capsys, args, message):
    status = main(["train", "--nproc-per-node", "2", "--data", str(dist_data), "--batch-size", "4", *args])
    err = capsys.readouterr().err
    assert status == 2 and message in err and len(err.strip().splitlines()) == 1 and "torch.distributed.run" not in err


def test_missing_data_and_bad_counts_are_one_line(tmp_path, capsys, monkeypatch):
    assert main(["train", "--nproc-per-node", "2", "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl: file not found" in capsys.readouterr().err
    assert main(["train", "--nproc-per-node", "0", "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "give a number of processes, at least 1" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")  # as inside a torchrun process
    assert main(["train", "--nproc-per-node", "2", "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "already is one of torchrun's processes" in capsys.readouterr().err


def test_the_command_is_torchrun_running_lorafit():
    cmd = torchrun_command(4, ["train", "run.yaml", "--lora.r", "8"])
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m", "lorafit",
                       "train", "run.yaml", "--lora.r", "8"]
