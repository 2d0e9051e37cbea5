"""Experiment trackers: each metrics record of a run also goes to TensorBoard, MLflow, W&B or trackio.

`TrainConfig.report_to` names the backends (none by default). The trainer opens them on rank 0 with
the run's resolved configuration as hyperparameters and hands them every record it writes to
`metrics.jsonl`, which stays the record that is always written: a backend that fails (a full disk, a
dead server) warns once, is dropped, and the run goes on.

Metric names are transformers' (`report_to` in the HF Trainer), so a lorafit run sits beside the
user's other runs on one dashboard:

    loss -> train/loss     lr -> train/learning_rate    grad_norm -> train/grad_norm
    epoch -> train/epoch   val_loss -> eval/loss        val_ppl -> eval/perplexity
    tokens_per_s -> train/tokens_per_second
    a key that already has a section ("rewards/chosen", "logps/rejected") keeps it; any other
    key "k" becomes "train/k" (or "eval/k" for "val_k")

Where each backend writes (nothing is sent anywhere the user did not set up):

    tensorboard   event files under output_dir/runs/<run name>/
    mlflow        $MLFLOW_TRACKING_URI, else a SQLite store sqlite:///output_dir/mlflow.db (recent
                  MLflow refuses the plain file store); experiment $MLFLOW_EXPERIMENT_NAME or "lorafit"
    wandb         W&B in the user's mode ($WANDB_MODE: offline needs no network), files under
                  output_dir/wandb/; project $WANDB_PROJECT or "lorafit"
    trackio       trackio's local store ($TRACKIO_DIR); project $TRACKIO_PROJECT or "lorafit"

Each is an optional extra: `pip install 'lorafit[tensorboard]'` (or mlflow, wandb, trackio).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from lorafit.errors import LorafitError

TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio")
MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "trackio": "trackio"}
NAMES = {"loss": "train/loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm", "epoch": "train/epoch",
         "val_loss": "eval/loss", "val_ppl": "eval/perplexity", "tokens_per_s": "train/tokens_per_second"}


def check_report_to(report_to: list[str]) -> None:
    """Each name is a known backend whose package is installed; else one line naming the extra."""
    for name in report_to:
        if name not in TRACKERS:
            raise LorafitError(f"TrainConfig.report_to: unknown tracker {name!r}; known: {', '.join(TRACKERS)}")
        if importlib.util.find_spec(MODULES[name]) is None:
            raise LorafitError(f"TrainConfig.report_to: {name} is not installed: pip install 'lorafit[{name}]'")


def metric_name(key: str) -> str:
    """The dashboard name of a metrics.jsonl key (see the module docstring)."""
    if key in NAMES:
        return NAMES[key]
    if "/" in key:
        return key
    return f"eval/{key[4:]}" if key.startswith("val_") else f"train/{key}"


def metrics_of(record: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """(step, {dashboard name: value}) of one record: numbers only; a non-finite value (a null in
    metrics.jsonl) is left out, as dashboards cannot draw it."""
    step = int(record["step"])
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[metric_name(key)] = float(value)
    return step, out


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"lora.r": 16, ...} (MLflow and TensorBoard's hparams take flat scalars; lists
    and None become strings)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return flat


def run_name() -> str:
    """The HF Trainer's default run folder name: date, time and host."""
    return time.strftime("%b%d_%H-%M-%S") + "_" + socket.gethostname()


# -- the backends: open(output_dir, name, config), log(step, metrics), close() -------------------
class TensorBoard:
    def __init__(self, out: Path, name: str, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = out / "runs" / name
        self.writer = SummaryWriter(log_dir=str(self.logdir))
        self.writer.add_text("config", "```json\n" + json.dumps(config, indent=2, default=str) + "\n```")
        hparams = flatten(config)
        self.writer.add_hparams(hparams, {}, run_name=".")  # the hparams plugin's table, in the same folder

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MLflow:
    def __init__(self, out: Path, name: str, config: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(out / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=self.uri)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "lorafit"
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]  # MLflow keeps 6000 characters
        for i in range(0, len(params), 100):  # log_batch takes at most 100 params per call
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandB:
    def __init__(self, out: Path, name: str, config: dict[str, Any]) -> None:
        import wandb

        out.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "lorafit", name=name, dir=str(out),
                              config=config, reinit="create_new")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackio:
    def __init__(self, out: Path, name: str, config: dict[str, Any]) -> None:
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT") or "lorafit", name=name, config=config,
                                embed=False)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


BACKENDS = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB, "trackio": Trackio}


class Trackers:
    """The run's open backends. `log` never raises: a backend that fails warns once and is dropped."""

    def __init__(self, report_to: list[str], output_dir: str | Path, config: dict[str, Any],
                 name: str | None = None) -> None:
        check_report_to(report_to)
        self.name = name or run_name()
        self.open: dict[str, Any] = {}
        for backend in report_to:
            self._call(backend, lambda b=backend: self.open.__setitem__(
                b, BACKENDS[b](Path(output_dir), self.name, config)))

    def _call(self, backend: str, fn) -> None:
        try:
            fn()
        except Exception as e:  # any failure of a third-party tracker: the run must go on
            self.open.pop(backend, None)
            warnings.warn(f"report_to: {backend} failed ({type(e).__name__}: {e}); it is dropped for the rest of "
                          "this run, metrics.jsonl keeps every step", stacklevel=3)

    def log(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record to every open backend."""
        if not self.open:
            return
        step, metrics = metrics_of(record)
        for backend, tracker in list(self.open.items()):
            self._call(backend, lambda t=tracker: t.log(step, metrics))

    def close(self) -> None:
        for backend, tracker in list(self.open.items()):
            self._call(backend, tracker.close)
        self.open.clear()
