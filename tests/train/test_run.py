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


def test_qlora_with_loftq_loads_full_precision_and_ends_all_nf4(tokenizer, tmp_path, monkeypatch):
    """quantize: nf4 + lora.init: loftq: the adapted layers get LoftQ's codes, the others plain NF4."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorafit.lora.inject import lora_layers
    from lorafit.quant.linear import NF4Linear
    from lorafit.train.demo_task import make_dataset, write_jsonl
    from lorafit.train.run import run

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    data = write_jsonl(tmp_path / "d.jsonl", make_dataset(8, seed=0))
    config = parse_run_config({"model": str(tmp_path / "m"), "quantize": "nf4", "data": str(data), "max_steps": 1,
                               "batch_size": 4, "output_dir": str(tmp_path / "out"),
                               "lora": {"r": 4, "init": "loftq", "target_modules": ["q_proj", "v_proj"]}})
    seen = {}
    import lorafit.train.trainer as trainer_module

    class Recording(trainer_module.Trainer):
        def train(self, resume=False, overwrite=False):
            seen["model"] = self.model
            return super().train(resume, overwrite)

    monkeypatch.setattr(trainer_module, "Trainer", Recording)  # the real Trainer, which also keeps its model
    history = run(config)
    model = seen["model"]
    assert len(history) == 1 and (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    adapted = dict(lora_layers(model))
    assert sorted(p.rsplit(".", 1)[-1] for p in adapted) == ["q_proj", "v_proj"]
    assert all(isinstance(layer.base_layer, NF4Linear) for layer in adapted.values())
    assert isinstance(model.model.layers[0].mlp.down_proj, NF4Linear)  # not adapted: plain NF4
    assert type(model.lm_head) is torch.nn.Linear


def test_relative_paths_of_a_yaml_file_are_read_from_its_folder(tmp_path):
    from lorafit.train.run import load_yaml

    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "run.yaml").write_text(f"model: SmolLM2-135M-Instruct\ndata: {{path: train.jsonl, val_path: {tmp_path}/v.jsonl}}\n"
                                     "output_dir: runs/x\n")
    raw = load_yaml(folder / "run.yaml")
    assert raw == {"model": "SmolLM2-135M-Instruct", "output_dir": str(folder / "runs" / "x"),
                   "data": {"path": str(folder / "train.jsonl"), "val_path": f"{tmp_path}/v.jsonl"}}
    (folder / "run.yaml").write_text("model: ../models/llama\ndata: train.jsonl\n")  # the shorthand too
    raw = load_yaml(folder / "run.yaml")
    assert raw == {"model": str(folder / "../models/llama"), "data": {"path": str(folder / "train.jsonl")}}


def test_errors_name_the_flag_as_typed_or_the_key_of_the_file():
    raw = {"data": "x.jsonl", "lora": {"r": 0}}
    with pytest.raises(LorafitError) as e:
        parse_run_config(raw, "flags", {"lora.r": "0"})
    assert str(e.value) == "--lora.r 0: must be a positive integer"
    with pytest.raises(LorafitError) as e:
        parse_run_config(raw, "run.yaml")
    assert str(e.value) == "run.yaml: lora.r must be a positive integer, got 0"
    with pytest.raises(LorafitError) as e:
        parse_run_config({"data": "x.jsonl", "schedule": "steps"}, "flags", {"schedule": "steps"})
    assert str(e.value).startswith("--schedule steps: must be one of ('cosine'")
