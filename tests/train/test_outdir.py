"""A run's output folder: no second run mixed into a first, resume only from what is there, checkpoints
rotated without ever deleting the current run's, leftovers of interrupted writes cleaned."""

import os

import pytest

from lorafit.errors import LorafitError
from lorafit.train.data import DataConfig, load_data
from lorafit.train.demo_task import make_dataset, write_jsonl
from lorafit.train.outdir import (
    check_output_dir,
    checkpoints,
    prepare_output_dir,
    resume_mismatch,
    rotate_checkpoints,
)
from lorafit.train.state_files import STATE_JSON, load_state
from lorafit.train.trainer import Trainer
from tests.train.test_trainer import _config, tiny_llama


@pytest.fixture(scope="module")
def samples(tokenizer, tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("data") / "dates.jsonl", make_dataset(24, seed=3))
    return load_data(tokenizer, DataConfig(path=str(path)))


def _checkpoint(out, step: int, complete: bool = True):
    folder = out / "checkpoints" / f"step-{step:08d}"
    (folder / "adapter").mkdir(parents=True)
    if complete:
        (folder / STATE_JSON).write_text("{}")
    return folder


def test_resume_needs_a_checkpoint_and_says_so(tmp_path):
    with pytest.raises(LorafitError, match=r"^--resume: no checkpoint to resume from in .*checkpoints; a run "
                                           r"writes one every save_steps and when interrupted \(Ctrl-C\)"):
        check_output_dir(tmp_path / "new", resume=True)
    (tmp_path / "done" / "adapter").mkdir(parents=True)
    with pytest.raises(LorafitError, match=r"\(its run finished: adapter/ is there\)"):
        check_output_dir(tmp_path / "done", resume=True)
    with pytest.raises(LorafitError, match="choose one"):
        check_output_dir(tmp_path / "done", resume=True, overwrite=True)


def test_other_files_in_the_folder_are_not_a_run_and_survive_overwrite(tmp_path):
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)  # a base model kept there, no metrics.jsonl: not a run's output
    (out / "run.yaml").write_text("data: train.jsonl\n")
    assert check_output_dir(out) is None
    (out / "metrics.jsonl").write_text("")
    (out / "adapter").mkdir()
    with pytest.raises(LorafitError, match=r"holds an earlier run \(adapter, model, metrics.jsonl\)"):
        check_output_dir(out)
    (out / "model").rmdir()
    prepare_output_dir(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["run.yaml"]


def test_resume_cleans_what_interrupted_saves_and_deletions_left(tmp_path):
    """An interrupt during rotation used to leave a step-* folder without its trainer state, for ever."""
    out = tmp_path / "run"
    keep = _checkpoint(out, 4)
    half = _checkpoint(out, 2, complete=False)  # a deletion cut short (before this version renamed first)
    tmp = out / "checkpoints" / ".step-00000006.tmp-abc"
    tmp.mkdir()
    deleting = out / "checkpoints" / ".step-00000001.deleting-xyz"
    deleting.mkdir()
    assert prepare_output_dir(out, resume=True) == keep
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [keep.name]
    assert not half.exists()


def test_rotation_keeps_the_newest_and_never_the_current_runs_checkpoint(tmp_path):
    out = tmp_path / "run"
    steps = [_checkpoint(out, s) for s in (2, 4, 6)]
    assert rotate_checkpoints(out, steps[2], keep=2) == [steps[0]]
    assert checkpoints(out) == steps[1:]
    later = _checkpoint(out, 9)  # not this run's to delete (a step after the current one)
    current = _checkpoint(out, 8)
    rotate_checkpoints(out, current, keep=1)
    assert checkpoints(out) == [current, later]
    assert not any(p.name.startswith(".") for p in (out / "checkpoints").iterdir())  # deleted whole


def test_resume_mismatch_names_what_differs_and_ignores_what_may_change():
    saved = {"method": "lora", "batch_size": 8, "grad_accum": 1, "seed": 0, "max_steps": 10,
             "lora": {"r": 16, "alpha": 32, "target_modules": ("q_proj", "v_proj")}}
    now = {**saved, "max_steps": 20, "lora": {**saved["lora"], "target_modules": ["q_proj", "v_proj"]}}
    assert resume_mismatch(saved, now) is None  # more steps is a longer run; a tuple read back as a list is equal
    assert resume_mismatch(saved, {**now, "batch_size": 4, "lora": {**now["lora"], "alpha": 8}}) == \
        "batch_size=8, lora.alpha=32, this run has batch_size=4, lora.alpha=8"


def test_permissions_of_written_checkpoints_follow_the_umask(tokenizer, samples, tmp_path):
    old = os.umask(0o027)
    try:
        Trainer(_config(tmp_path / "run", max_steps=2, save_steps=1), tiny_llama(), tokenizer, samples.train).train()
    finally:
        os.umask(old)
    checkpoint = checkpoints(tmp_path / "run")[-1]
    assert checkpoint.stat().st_mode & 0o777 == 0o750
    assert (checkpoint / "adapter" / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o640
    assert load_state(checkpoint)["step"] == 2
