"""lorafit.train.run: the mapping of a YAML file + flags -> RunConfig, without loading a model."""

import pytest
import torch

from lorafit.device import resolve_dtype
from lorafit.errors import LorafitError
from lorafit.train.run import RunConfig, apply_override, override_flags, parse_run_config


def test_defaults_are_auto_and_auto_is_float32_on_the_cpu():
    config = RunConfig()
    assert (config.device, config.dtype) == ("auto", "auto")
    assert resolve_dtype(config.dtype, torch.device("cpu")) is torch.float32  # CPU runs are unchanged


def test_device_and_dtype_are_checked_for_spelling():
    RunConfig(device="cuda:3", dtype="bfloat16")  # whether the GPU is there is checked when the run starts
    with pytest.raises(LorafitError, match=r"dtype 'bogus' is unknown; use --dtype auto, float32"):
        RunConfig(dtype="bogus")
    with pytest.raises(LorafitError, match=r"device 'gpu' is not a device name; use --device auto, cpu, cuda"):
        RunConfig(device="gpu")
    with pytest.raises(LorafitError, match="quantize must be nf4, ternary or null"):
        parse_run_config({"data": "x.jsonl", "quantize": "int3"})


def test_data_can_be_just_a_path():
    config = parse_run_config({"data": "train.jsonl", "device": "cpu"})
    assert config.data.path == "train.jsonl" and config.device == "cpu"
    raw = {"data": "train.jsonl"}
    apply_override(raw, "data.max-seq-length", "64")
    assert parse_run_config(raw).data.max_seq_length == 64 and raw["data"]["path"] == "train.jsonl"
    with pytest.raises(LorafitError, match="missing 'data'.*--data train.jsonl"):
        parse_run_config({"learning_rate": 1e-3}, "flags")


def test_values_are_checked_against_the_declared_types():
    raw = {"data": {"path": "x.jsonl", "val_fraction": "5e-2"}, "learning_rate": "1e-4", "lora": {"alpha": "8"}}
    config = parse_run_config(raw)  # YAML 1.1 reads 1e-4 as a string; a float field takes it as a number
    assert config.train.learning_rate == 1e-4 and config.data.val_fraction == 0.05
    assert config.train.lora.alpha == 8.0
    for raw, message in [({"max_steps": "two"}, "run.yaml: max_steps must be int | None, got 'two'"),
                         ({"lora": {"r": 2.5}}, "run.yaml: lora.r must be int, got 2.5"),
                         ({"data": {"path": "x", "packing": "x.yaml"}}, "run.yaml: data.packing must be bool"),
                         ({"device": 0}, "run.yaml: device must be str, got 0")]:
        with pytest.raises(LorafitError) as e:
            parse_run_config({"data": "x.jsonl", **raw}, "run.yaml")
        assert str(e.value).startswith(message), e.value


def test_every_field_has_a_flag():
    keys = [key for key, _, _ in override_flags()]
    assert len(keys) == len(set(keys))
    assert {"model", "quantize", "device", "dtype", "learning_rate", "data.path", "lora.r"} <= set(keys)
    assert "lora" not in keys and "train" not in keys and "data" not in keys
