"""The trainer's guards: non-finite steps skipped or stopped, checkpoints that hold no pickle, rotation that
keeps the best checkpoint, and load_best_at_end. A tiny Llama over the serving tests' tokenizer (seconds)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorafit as lf
from lorafit.errors import LorafitError
from lorafit.io import read_adapter
from lorafit.train.data import IGNORE, Sample
from lorafit.train.state_files import STATE_JSON, load_state
from lorafit.train.trainer import TrainConfig, Trainer, latest_checkpoint, lr_factor
from tests.serve.tiny import make_model, make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def samples(n: int = 8, target: int = 7, seed: int = 0) -> list[Sample]:
    """n prompts of 6 random tokens each answered by `target` twice (the same prompts for any target)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(10, 300, (6,), generator=g).tolist()
        out.append(Sample(prompt + [target, target], [IGNORE] * 6 + [target, target], f"mem:{i}"))
    return out


def config(out: Path, **kw) -> TrainConfig:
    return TrainConfig(**{"output_dir": str(out), "lora": lf.LoraConfig(r=4, alpha=8), "batch_size": 2,
                          "learning_rate": 1e-2, "warmup_ratio": 0.0, "max_steps": 4, "save_steps": 1,
                          "save_total_limit": 10, **kw})


def poison(model, steps: set[int]) -> None:
    """A forward hook that turns the first block's output to NaN in the forwards of the given optimizer
    steps (1-based; one micro-batch per step, so forward k is step k)."""
    calls = {"n": 0}

    def hook(module, args, output):
        calls["n"] += 1
        if calls["n"] in steps:
            hidden = output[0] if isinstance(output, tuple) else output
            return (hidden * float("nan"), *output[1:]) if isinstance(output, tuple) else hidden * float("nan")
        return None
    model.model.layers[0].register_forward_hook(hook)


def strict_lines(path: Path) -> list[dict]:
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def adapter_and_optimizer(checkpoint: Path) -> dict[str, torch.Tensor]:
    _, state = read_adapter(checkpoint / "adapter")
    tensors = {f"{p}.{k}": t for p, e in state.layers.items() for k, t in e.items()}
    optimizer = load_state(checkpoint)["optimizer"]["state"]
    tensors.update({f"opt.{i}.{k}": t for i, s in optimizer.items() for k, t in s.items()})
    return tensors


def test_a_nonfinite_step_is_skipped_and_leaves_adapter_and_optimizer_bitwise_unchanged(tok, tmp_path):
    model = make_model(tok)
    poison(model, {2})
    history = Trainer(config(tmp_path), model, tok, samples()).train()
    assert [h["step"] for h in history] == [1, 2, 3, 4]  # the run finished
    lines = strict_lines(tmp_path / "metrics.jsonl")
    assert lines[1]["nonfinite"] is True and lines[1]["loss"] is None and lines[1]["grad_norm"] is None
    assert lines[1]["skipped"] == 1 and all("nonfinite" not in line for line in lines[:1] + lines[2:])
    assert all(line["grad_norm"] > 0 for line in lines[:1] + lines[2:])  # logged at every step
    # the schedule moved on through the skipped step
    assert lines[2]["lr"] == pytest.approx(1e-2 * lr_factor(2, 4, 0, "cosine"))
    checkpoints = tmp_path / "checkpoints"
    one, two, three = (adapter_and_optimizer(checkpoints / f"step-0000000{i}") for i in (1, 2, 3))
    assert one.keys() == two.keys() and any(k.startswith("opt.") for k in one)
    assert all(torch.equal(one[k], two[k]) for k in one)  # step 2 touched nothing
    assert not all(torch.equal(two[k], three[k]) for k in two)  # step 3 trained again
    assert load_state(checkpoints / "step-00000002")["micro"] == 2  # ...from the data after step 2's


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_nonfinite_steps_stop_the_run_with_one_line_and_a_resumable_checkpoint(tok, tmp_path, mode):
    """nonfinite: stop halts at the first one; skip halts after max_nonfinite_steps in a row. Either way a
    checkpoint of the last good adapter is written first, and --resume continues from it."""
    model = make_model(tok)
    poison(model, {2, 3, 4, 5, 6})
    cfg = config(tmp_path, nonfinite=mode, max_nonfinite_steps=2, save_steps=None, max_steps=6)
    with pytest.raises(LorafitError) as e:
        Trainer(cfg, model, tok, samples()).train()
    message = str(e.value)
    assert "\n" not in message and "--resume" in message
    stopped = 2 if mode == "stop" else 3
    assert ("non-finite loss at step 2 " if mode == "stop" else "non-finite loss at steps 2-3 ") in message
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint.name == f"step-{stopped:08d}" and str(checkpoint) in message
    lines = strict_lines(tmp_path / "metrics.jsonl")
    assert [line["step"] for line in lines] == list(range(1, stopped + 1))
    # resumed without the fault: it continues after the failed steps and finishes
    resumed = Trainer(config(tmp_path, nonfinite=mode, save_steps=None, max_steps=6), make_model(tok), tok,
                      samples()).train(resume=True)
    assert [h["step"] for h in resumed] == list(range(1, 7))
    assert all(h["loss"] is not None for h in resumed[stopped:]) and resumed[1]["nonfinite"] is True


def test_every_checkpoint_file_is_safetensors_or_json(tok, tmp_path):
    Trainer(config(tmp_path, max_steps=2, eval_steps=1), make_model(tok), tok, samples(), samples(4, seed=1)).train()
    files = [p for p in (tmp_path / "checkpoints").rglob("*") if p.is_file() and p.name != "README.md"]
    assert files and {p.suffix for p in files} == {".json", ".safetensors"}  # the README is the model card
    for p in files:
        load_file(p) if p.suffix == ".safetensors" else json.loads(p.read_text())
    state = load_state(tmp_path / "checkpoints" / "step-00000002")
    assert state["step"] == 2 and isinstance(state["optimizer"]["state"][0]["exp_avg"], torch.Tensor)
    assert state["best_val"] == pytest.approx(min(h["val_loss"] for h in state["history"]))


class _RunsCode:
    """A pickled object whose unpickling would call a function (here: make a folder)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (str(self.path),))


def test_a_checkpoint_holding_a_pickle_that_would_run_code_is_refused_in_one_line(tok, tmp_path):
    Trainer(config(tmp_path, max_steps=1), make_model(tok), tok, samples()).train()
    checkpoint = latest_checkpoint(tmp_path)
    state = load_state(checkpoint)
    (checkpoint / STATE_JSON).unlink()  # an older lorafit's checkpoint: one torch pickle...
    (checkpoint / "trainer_state.safetensors").unlink()
    torch.save(state, checkpoint / "trainer_state.pt")
    # ...which loads with weights_only=True when it holds data only
    resumed = Trainer(config(tmp_path, max_steps=2), make_model(tok), tok, samples()).train(resume=True)
    assert [h["step"] for h in resumed] == [1, 2]

    marker = tmp_path / "code-ran"
    torch.save({**state, "config": _RunsCode(marker)}, latest_checkpoint(tmp_path) / "trainer_state.pt")
    (latest_checkpoint(tmp_path) / STATE_JSON).unlink()
    with pytest.raises(LorafitError, match=r"trainer_state.pt: holds pickled Python objects that would run code when "
                                           r"loaded \(it calls os.makedirs\)") as e:
        Trainer(config(tmp_path, max_steps=3), make_model(tok), tok, samples()).train(resume=True)
    assert "\n" not in str(e.value) and not marker.exists()


def test_rotation_keeps_the_best_checkpoint_and_load_best_at_end_saves_it(tok, tmp_path):
    """Training towards target 7 while validation wants target 8 on the same prompts: the validation
    loss rises at every step, so step 1 is the best. With save_total_limit 1, step-1 survives the
    rotation beside the newest, and adapter/ is step 1's adapter."""
    cfg = config(tmp_path, eval_steps=1, save_total_limit=1, load_best_at_end=True)
    history = Trainer(cfg, make_model(tok), tok, samples(), samples(target=8)).train()
    vals = [h["val_loss"] for h in history]
    assert vals == sorted(vals) and vals[0] < vals[-1]
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step-00000001", "step-00000004"]
    _, best = read_adapter(tmp_path / "checkpoints" / "step-00000001" / "adapter")
    _, saved = read_adapter(tmp_path / "adapter")
    assert all(torch.equal(best.layers[p][k], saved.layers[p][k]) for p in best.layers for k in best.layers[p])
    # without load_best_at_end the final weights are saved
    Trainer(config(tmp_path / "last", eval_steps=1, save_total_limit=1), make_model(tok), tok, samples(),
            samples(target=8)).train()
    _, last = read_adapter(tmp_path / "last" / "adapter")
    _, step4 = read_adapter(tmp_path / "checkpoints" / "step-00000004" / "adapter")
    assert all(torch.equal(last.layers[p][k], step4.layers[p][k]) for p in last.layers for k in last.layers[p])


def test_load_best_at_end_is_checked_before_anything_runs(tok, tmp_path):
    with pytest.raises(LorafitError, match="load_best_at_end needs eval_steps and save_steps"):
        config(tmp_path, load_best_at_end=True, eval_steps=2, save_steps=3)
    with pytest.raises(LorafitError, match="load_best_at_end needs validation data"):
        Trainer(config(tmp_path, load_best_at_end=True, eval_steps=1), make_model(tok), tok, samples())
    with pytest.raises(LorafitError, match="nonfinite must be one of"):
        config(tmp_path, nonfinite="ignore")
    assert not math.isnan(0.0)
