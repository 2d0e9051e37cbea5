"""`lorafit` runs as a new user makes them: the run file of docs/guides/training.md trains, Ctrl-C then
--resume gives the adapter of an uninterrupted run, outputs get the umask's permissions, every command's output can be
piped, and the commands say what they did (final losses, cut answers, the method estimated)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lorafit.train.demo_task import make_dataset, write_jsonl
from tests.test_cli import ROOT, help_entries, lorafit, tiny_model_dir  # noqa: F401  (a fixture)

ENV = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1",
       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "lorafit.cli", *args]


def test_the_training_guides_run_file_is_the_one_train_help_shows_and_it_trains(tiny_model_dir, tmp_path):  # noqa: F811
    """The YAML example of docs/guides/training.md, as it is, for two steps on a tiny model with SmolLM2's
    tokenizer (the flags override the file: a CPU runs the real 135M model's steps in tens of seconds each); its
    relative paths are read from the file's folder, not from the working directory."""
    from lorafit.train.run import EXAMPLE

    guide = (ROOT / "docs" / "guides" / "training.md").read_text()
    block = re.search(r"A run file for `lorafit train run.yaml`.*?\n```yaml\n(.*?)```", guide, re.S).group(1)
    assert block == EXAMPLE
    shown = lorafit("train", "--help").stdout
    assert all(line in shown for line in EXAMPLE.splitlines())
    (tmp_path / "run.yaml").write_text(block)
    write_jsonl(tmp_path / "train.jsonl", make_dataset(40, seed=0))
    result = lorafit("train", str(tmp_path / "run.yaml"), "--max-steps", "2", "--model", str(tiny_model_dir), cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "runs" / "mine"
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (16, 32)
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2] and "val_loss" in history[-1]  # the end is always evaluated
    done = re.search(r"lorafit train: done in ([\dhms ]+); final training loss ([\d.]+) at step 2 \(mean of the last 2 "
                     r"steps [\d.]+\), validation loss ([\d.]+)\n", result.stdout)
    assert done and float(done.group(2)) == pytest.approx(history[-1]["loss"], abs=1e-4)
    assert float(done.group(3)) == pytest.approx(history[-1]["val_loss"], abs=1e-4)
    assert "Loading weights" not in result.stderr  # a small model loads in a moment: no bar for it


def test_ctrl_c_then_resume_gives_the_adapter_of_an_uninterrupted_run(tiny_model_dir, tmp_path):  # noqa: F811
    """Issue 29, bug 4: a real SIGINT to a real `lorafit train` (CPU, fixed seed, dropout drawing from the
    RNG, no save_steps) writes a checkpoint; `--resume` ends on the same adapter, bit for bit."""
    data = write_jsonl(tmp_path / "train.jsonl", make_dataset(24, seed=1))
    args = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--device", "cpu", "--max-steps", "10",
            "--batch-size", "4", "--learning-rate", "1e-2", "--lora.r", "4", "--lora.dropout", "0.1", "--seed", "3",
            "--data.val-fraction", "0.2"]
    whole = subprocess.run(command(*args, "--output-dir", str(tmp_path / "whole")), env=ENV, capture_output=True,
                           text=True)
    assert whole.returncode == 0, whole.stderr[-3000:]

    out = tmp_path / "stopped"
    proc = subprocess.Popen(command(*args, "--output-dir", str(out)), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, (proc.returncode, stderr[-3000:])
    step = int(re.search(r"lorafit: interrupted after step (\d+) of 10; checkpoint", stdout).group(1))
    assert 2 <= step < 10 and stderr.rstrip().endswith("lorafit train: interrupted")
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{step:08d}"] and not (out / "adapter").exists()

    resumed = subprocess.run(command(*args, "--output-dir", str(out), "--resume"), env=ENV, capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step-{step:08d}'} (step {step} of 10)" in resumed.stdout
    want = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    got = load_file(out / "adapter" / "adapter_model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert any(k.endswith("lora_B.weight") and want[k].abs().max() > 0 for k in want)  # it did train
    losses = [[(h["step"], h["loss"], h.get("val_loss")) for h in map(json.loads, (d / "metrics.jsonl").open())]
              for d in (tmp_path / "whole", out)]
    assert losses[0] == losses[1]


def test_outputs_get_the_umasks_permissions(tiny_model_dir, tmp_path):  # noqa: F811
    """Issue 29, bug 6: adapters, merged models and GGUF files came out 0600 in 0700 folders."""
    data = write_jsonl(tmp_path / "train.jsonl", make_dataset(8, seed=0))
    run = tmp_path / "run"

    def under_022(*args: str) -> subprocess.CompletedProcess:
        result = subprocess.run(command(*args), env=ENV, capture_output=True, text=True,
                                preexec_fn=lambda: os.umask(0o022))
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    train = under_022("train", "--model", str(tiny_model_dir), "--data", str(data), "--max-steps", "2",
                      "--save-steps", "1", "--batch-size", "4", "--lora.r", "2", "--output-dir", str(run),
                      "--data.max-seq-length", "64")
    merge = under_022("merge", "--model", str(tiny_model_dir), "--adapter", str(run / "adapter"),
                      "--out", str(tmp_path / "merged"), "--dtype", "bfloat16")
    under_022("export", "--model", str(tiny_model_dir), "--adapter", str(run / "adapter"), "--outtype", "f16",
              "--out", str(tmp_path / "model.gguf"))
    written = [run / "adapter", run / "checkpoints", tmp_path / "merged", tmp_path / "model.gguf"]
    written += [p for folder in written[:3] for p in folder.rglob("*")]
    assert len(written) > 15 and (run / "checkpoints" / "step-00000002" / "trainer_state.json") in written
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in written}
    assert modes == {name: "0o755" if (tmp_path / name).is_dir() else "0o644" for name in modes}

    truncated = [line for line in train.stderr.splitlines() if "longer than max_seq_length=64" in line]
    assert len(truncated) == 1 and truncated[0].startswith(f"lorafit train: warning: {data}: ")  # one line
    assert "warnings.warn" not in train.stderr
    assert merge.stdout.startswith(f"lorafit merge: merged {run / 'adapter'} into {tiny_model_dir}: a plain "
                                   "transformers checkpoint in bfloat16")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"
    merged_again = under_022("merge", "--model", str(tiny_model_dir), "--adapter", str(run), "--overwrite",
                             "--out", str(tmp_path / "merged"))  # a run's output_dir means its adapter/; dtype: the base's
    assert "a plain transformers checkpoint in float32" in merged_again.stdout


@pytest.mark.parametrize("args", [["estimate"], ["estimate", "--model", "7B", "--device", "cpu"], ["train", "--help"]])
def test_output_can_be_piped_into_a_reader_that_stops(args):
    """Issue 29, bug 5: `lorafit estimate | head -1` ended in a BrokenPipeError traceback. Here the reader
    is gone before the command writes anything, the worst case of a `head` that stopped."""
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run(command(*args), env=ENV, stdout=write, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write)
    assert result.stderr == "" and result.returncode in (0, 141)  # 141: as tools killed by SIGPIPE


def in_process(capsys, *args: str) -> tuple[int, str]:
    """`lorafit ARGS` in this process (no interpreter start-up): its exit status and stdout."""
    from lorafit.cli import main

    status = main(list(args))
    return status, capsys.readouterr().out


def test_version_and_help_of_every_option_with_its_default(capsys, monkeypatch):
    from lorafit import __version__

    monkeypatch.setenv("COLUMNS", "1000")  # one line per option
    assert in_process(capsys, "--version") == (0, f"lorafit {__version__}\n")
    for cmd in ("generate", "merge", "export", "estimate", "eval", "serve"):
        status, out = in_process(capsys, cmd, "--help")
        entries = help_entries(out)
        missing = [flag for flag, entry in entries.items() if flag != "--help" and len(entry.split(None, 2)) < 3]
        assert status == 0 and entries and not missing, (cmd, missing)  # every option says what it is
        if cmd == "generate":
            assert entries["--max-new-tokens"].endswith("(default: 64)") and "(default: 0.0)" in entries["--temperature"]


def test_generate_prints_each_prompt_and_says_when_the_limit_cut_the_answer(tiny_model_dir):  # noqa: F811
    result = lorafit("generate", "--model", str(tiny_model_dir), "--device", "cpu", "--max-new-tokens", "2",
                     "hello", "world")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert [lines[0], lines[2], lines[3]] == ["### prompt 1: hello", "---", "### prompt 2: world"] and len(lines) == 5
    assert result.stderr.count("the answer was cut at --max-new-tokens 2 (raise it for the rest)") == 2
    one = lorafit("generate", "--model", str(tiny_model_dir), "--device", "cpu", "--max-new-tokens", "2", "hello")
    assert one.stdout == lines[1] + "\n"  # one prompt: its answer alone, easy to pipe


def test_estimate_says_which_method_it_used_in_one_unit(capsys):
    status, cpu = in_process(capsys, "estimate", "--model", "7B", "--device", "cpu")
    assert status == 0 and cpu.splitlines()[-1].startswith("qlora (the default --method), r=16, batch 1 x seq 512: ")
    assert in_process(capsys, "estimate", "--model", "7B", "--device", "cpu", "--method", "lora")[1].splitlines()[-1] \
        .startswith("lora, r=16")
    for args in (["--model", "7B", "--device", "cpu"], [], ["--model", "7B"], ["--model", "7B", "--nproc", "2", "--batch", "2"]):
        status, out = in_process(capsys, "estimate", *args)
        assert status == 0 and "GiB" in out and not re.search(r"\bGB\b", out), out  # GiB throughout
