"""`lorafit train` with a preference method: bad input is one line naming the file:line and field (or the
config key), exit status 2, before any training; a DPO run writes TRL's metrics and rewards.png."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import lorafit as lf
from lorafit.cli import main
from lorafit.model import default_gguf
from tests.train.objectives.test_preference_training import pairs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(root)
    gguf = default_gguf()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(root)
    return root


def write(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def train(model_dir, tmp_path, data: str, *flags: str) -> list[str]:
    return ["train", "--model", str(model_dir), "--data", data, "--device", "cpu", "--max-steps", "2",
            "--batch-size", "2", "--lora.r", "2", "--output-dir", str(tmp_path / "out"), *flags]


def one_line(capsys, status: int) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lorafit train: error")]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


GOOD = pairs(4)
BAD_DATA = [
    ("dpo", [GOOD[0], {"prompt": "x", "chosen": "y"}], ":2: field 'rejected' is missing"),
    ("dpo", [GOOD[0], {**GOOD[1], "chosen": []}], ":2: field 'chosen' is empty"),
    ("orpo", [{"prompt": "x", "chosen": "  ", "rejected": "z"}], ":1: field 'chosen' is empty"),
    ("kto", [{"prompt": "x", "completion": "y", "label": True}, {"prompt": "x", "completion": "z", "label": "no"}],
     ":2: field 'label' must be true or false, got \"no\""),
    ("dpo", [{"instruction": "x", "output": "y"}], ":1: method dpo trains on preference pairs"),
    ("lora", GOOD, ":1: method lora trains on supervised records"),
    ("dpo", [{**GOOD[0], "rejected": GOOD[0]["chosen"]}], ": no preference sample is left to train on"),
]


@pytest.mark.parametrize("method,records,message", BAD_DATA, ids=[m[2][:40] for m in BAD_DATA])
def test_bad_data_is_one_line_before_training(model_dir, tmp_path, capsys, method, records, message):
    data = write(tmp_path / "data.jsonl", records)
    line = one_line(capsys, main(train(model_dir, tmp_path, data, "--method", method)))
    assert f"{data}{message}" in line, line
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # nothing trained


BAD_CONFIG = [
    (["--preference.loss-type", "sigmoidd"], "preference.loss_type: 'sigmoidd' is not a loss of method dpo; did you "
                                             "mean 'sigmoid'?"),
    (["--preference.loss-type", "[sigmoid, sft]", "--preference.loss-weights", "[1.0]"],
     "preference.loss_weights has 1 weight(s) for 2 loss type(s)"),
    (["--beta", "0.5"], "unknown key 'beta'; it is a field of the preference section: write preference: {beta: ...}"),
    (["--precompute-ref-log-probs", "--method", "lora"], "apply to the preference methods"),
]


@pytest.mark.parametrize("flags,message", BAD_CONFIG, ids=[m[1][:40] for m in BAD_CONFIG])
def test_bad_config_is_one_line_naming_the_key(model_dir, tmp_path, capsys, flags, message):
    data = write(tmp_path / "data.jsonl", GOOD)
    args = train(model_dir, tmp_path, data, "--method", "dpo", *flags)
    if "--beta" in flags:  # as a YAML key: flags for unknown keys are argparse's business
        config = tmp_path / "run.yaml"
        config.write_text(f"model: {model_dir}\ndata: {data}\nmethod: dpo\nbeta: 0.5\n")
        args = ["train", str(config)]
    line = one_line(capsys, main(args))
    assert message in line, line


def test_an_adapter_for_another_base_is_one_line(model_dir, tmp_path, capsys):
    other = lf.apply_lora(LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=64,
                                                       num_hidden_layers=2, num_attention_heads=4,
                                                       num_key_value_heads=2)), lf.LoraConfig(r=2))
    lf.save_adapter(other, tmp_path / "other")
    data = write(tmp_path / "data.jsonl", GOOD)
    for flag in ("--adapter", "--ref-adapter"):
        line = one_line(capsys, main(train(model_dir, tmp_path, data, "--method", "dpo", flag, str(tmp_path / "other"))))
        assert "the adapter was trained on a different base model" in line and flag[2:].replace("-", "_") + ": " in line
        assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_a_dpo_run_logs_trls_metrics_and_draws_the_rewards(model_dir, tmp_path, capsys):
    data = write(tmp_path / "data.jsonl", pairs(6) + [{**GOOD[0], "rejected": GOOD[0]["chosen"]}])
    status = main(train(model_dir, tmp_path, data, "--method", "dpo", "--eval-steps", "2",
                        "--data.val-fraction", "0.3", "--data.seed", "1"))  # (line 7 is a training record)
    err = capsys.readouterr().err
    assert status == 0, err[-3000:]
    assert re.search(r"lorafit train: warning: .*data.jsonl: 1 of \d pairs have chosen equal to rejected \(first: .*data.jsonl:7\)",
                     err), err[-3000:]  # one line, as every lorafit warning on the command line
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    names = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected", "logits/chosen", "logits/rejected"}
    assert names <= set(records[0]) and {f"val_{n}" for n in names} <= set(records[-1])
    assert (tmp_path / "out" / "rewards.png").stat().st_size > 1000
    assert json.loads((tmp_path / "out" / "adapter" / "lorafit_prompt.json").read_text())["kind"] == "chat"


def test_ablate_methods_and_inspect_take_the_preference_methods(model_dir, tmp_path, capsys):
    import yaml

    data = {"path": write(tmp_path / "train.jsonl", pairs(8)), "val_path": write(tmp_path / "val.jsonl", pairs(4, seed=1)),
            "max_seq_length": 64}
    config = tmp_path / "ablate.yaml"
    config.write_text(yaml.safe_dump({"model": str(model_dir), "device": "cpu", "data": data, "max_steps": 2,
                                      "batch_size": 4, "learning_rate": 1e-3, "warmup_ratio": 0.0,
                                      "lora": {"r": 2, "target_modules": "all-linear"}}))
    out = tmp_path / "ablate"
    assert main(["ablate", str(config), "--methods", "dpo,kto", "--out", str(out)]) == 0, \
        capsys.readouterr().err[-3000:]
    results = {p.parent.name: json.loads(p.read_text()) for p in out.glob("points/*/result.json")}
    assert sorted(results) == ["dpo", "kto"]
    for name, result in results.items():
        assert 0.0 <= result["exact_match"] <= 1.0 and result["n_eval"] == 4
        assert "val_rewards/chosen" in result and (("val_rewards/accuracies" in result) == name.startswith("dpo"))
    report = tmp_path / "report"
    assert main(["inspect", str(out / "points" / "dpo" / "adapter"), "--model", str(model_dir),
                 "--out", str(report)]) == 0
    assert len(json.loads((report / "inspect.json").read_text())["modules"]) == 14
