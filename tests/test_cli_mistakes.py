"""A user's mistakes with `lorafit train` and `lorafit generate`, end to end: each is one line naming the
flag, key, file or folder, exit status 2, nothing lost, and found before the model loads (the model
here is a folder whose weights cannot load: a mistake reported with it was found first)."""

import json
import shutil
from pathlib import Path

import pytest

from lorafit.train.demo_task import make_dataset, write_jsonl
from tests.test_cli import _error_line, lorafit, tiny_model_dir  # noqa: F401  (a fixture)


@pytest.fixture(scope="module")
def unloadable(tiny_model_dir, tmp_path_factory) -> Path:  # noqa: F811
    """The tiny model's folder (config, tokenizer) with its weights file garbled."""
    folder = tmp_path_factory.mktemp("unloadable") / "model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    return folder


@pytest.fixture
def data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", make_dataset(8, seed=0))


@pytest.mark.parametrize("on_long", ["truncate", "skip"])
def test_no_training_samples_left_after_the_length_limit(tiny_model_dir, unloadable, data, tmp_path,  # noqa: F811
                                                         on_long):
    """Issue 29, bug 2: every chat sample over --data.max-seq-length 40 ended in an IndexError after the
    model loaded (the tiny model); it is found before (the model that cannot load)."""
    model = tiny_model_dir if on_long == "truncate" else unloadable
    line = _error_line(lorafit("train", "--model", str(model), "--data", str(data), "--data.max-seq-length", "40",
                               "--data.on-long", on_long, "--output-dir", str(tmp_path / "out")))
    assert line.startswith(f"lorafit train: error: {data}: no training samples left: all 8 are longer than "
                           "data.max_seq_length=40 tokens and "), line
    assert line.endswith("tokens: raise data.max_seq_length to at least that"), line
    assert not (tmp_path / "out").exists()


def test_a_used_output_folder_is_refused_and_resume_needs_a_checkpoint(tiny_model_dir, unloadable, data,  # noqa: F811
                                                                        tmp_path):
    out = tmp_path / "out"
    first = lorafit("train", "--model", str(tiny_model_dir), "--data", str(data), "--max-steps", "1",
                    "--batch-size", "4", "--lora.r", "2", "--output-dir", str(out))
    assert first.returncode == 0, first.stderr[-2000:]
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    line = _error_line(lorafit("train", "--model", str(unloadable), "--data", str(data), "--output-dir", str(out)))
    assert line == (f"lorafit train: error: output_dir {out}: holds an earlier run (adapter, metrics.jsonl, loss.png); "
                    "--resume continues it, --overwrite replaces it, or choose another output_dir")
    line = _error_line(lorafit("train", "--model", str(unloadable), "--data", str(data), "--output-dir", str(out),
                               "--resume"))
    assert line.startswith(f"lorafit train: error: --resume: no checkpoint to resume from in {out / 'checkpoints'} "
                           "(its run finished: adapter/ is there)")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("flags, yaml_text, message", [
    (["--lora.r", "0"], None, "--lora.r 0: must be a positive integer"),
    (["--data.max-seq-length", "1"], None, "--data.max-seq-length 1: must be at least 2 tokens"),
    (["--batch_size", "0"], None, "--batch-size 0: must be a positive integer"),
    (["--warmup-ratio", "two"], None, "--warmup-ratio two: must be float"),
    ([], "lora: {r: 0}\n", "{yaml}: lora.r must be a positive integer, got 0"),
    ([], "data: {on_long: wrap}\n", "{yaml}: data.on_long 'wrap' is unknown: use 'truncate' or 'skip'"),
    ([], "batch_size: 4\nlora:\n  r: 8\n   alpha: 16\n", "{yaml}:5: not valid YAML (mapping values are not allowed "
                                                          "here at column 9)"),
    ([], "schedule: [cosine\n", "{yaml}:3: not valid YAML ("),
])
def test_mistakes_name_the_flag_or_the_key_as_typed(unloadable, data, tmp_path, capsys, flags, yaml_text, message):
    """In this process: the config is checked before anything else (no model, no data read)."""
    from lorafit.cli import main

    yaml_file = tmp_path / "run.yaml"
    if yaml_text is not None:
        yaml_file.write_text(f"data: {{path: {data}}}\n" + yaml_text.replace("data: {", f"data: {{path: {data}, "))
    args = [str(yaml_file)] if yaml_text is not None else ["--data", str(data)]
    status = main(["train", *args, "--model", str(unloadable), *flags])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in err and "Traceback" not in err, err
    line = err
    assert line.startswith("lorafit train: error: " + message.format(yaml=yaml_file)), line
    assert "Config." not in line  # the key the user wrote, not the Python class


def test_relative_paths_in_a_yaml_file_are_read_from_its_folder(unloadable, tmp_path):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "run.yaml").write_text("data: train.jsonl\n")  # configs/train.jsonl, not ./train.jsonl
    line = _error_line(lorafit("train", str(folder / "run.yaml"), "--model", str(unloadable), cwd=tmp_path))
    assert line == f"lorafit train: error: {folder / 'train.jsonl'}: file not found: check the data path"


@pytest.mark.parametrize("mistake", ["malformed_line", "missing_adapter", "run_dir_adapter_missing"])
def test_data_and_adapter_mistakes_are_found_before_the_model_loads(unloadable, data, tmp_path, mistake):
    if mistake == "malformed_line":
        data.write_text(data.read_text() + '{"instruction": "x", "output": \n')
        line = _error_line(lorafit("train", "--model", str(unloadable), "--data", str(data),
                                   "--output-dir", str(tmp_path / "out")))
        assert line == (f"lorafit train: error: {data}:9: invalid JSON (Expecting value at column 32): fix the line")
    elif mistake == "missing_adapter":
        line = _error_line(lorafit("generate", "--model", str(unloadable), "--adapter", str(tmp_path / "nope"), "hi"))
        assert f"{tmp_path / 'nope'}: adapter folder not found" in line
    else:
        (tmp_path / "run" / "adapter").mkdir(parents=True)
        (tmp_path / "run" / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
        line = _error_line(lorafit("generate", "--model", str(unloadable), "--adapter", str(tmp_path / "run"), "hi"))
        assert f"{tmp_path / 'run' / 'adapter' / 'adapter_model.safetensors'}: missing" in line  # RUN_DIR/adapter
