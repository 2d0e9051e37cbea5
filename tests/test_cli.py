"""The `lorafit` command end to end: a real (tiny) training run from YAML, and user mistakes that
must end in one line naming the file/line/field, a non-zero exit, and nothing written over."""

import inspect
import json
import re
import subprocess
import sys
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lorafit.config import LoraConfig
from lorafit.model import default_gguf
from lorafit.train.config import PreferenceConfig, TrainConfig
from lorafit.train.data import DataConfig
from lorafit.train.demo_task import make_dataset, write_jsonl
from lorafit.train.grpo_config import GRPOConfig
from lorafit.train.run import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def lorafit(*args: str, cwd: Path = ROOT, module: str = "lorafit.cli", **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=cwd,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
                               "TQDM_DISABLE": "1", **env})


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama with the real SmolLM2 tokenizer, saved as an HF folder."""
    out = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(out)
    gguf = default_gguf()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


def _error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.startswith("lorafit ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


def test_train_from_yaml_with_flag_override(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", make_dataset(24, seed=0))
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata: {{path: {data}, val_fraction: 0.25}}\n"
                      f"lora: {{r: 4}}\noutput_dir: {tmp_path / 'out'}\nmax_steps: 50\nbatch_size: 4\n")
    result = lorafit("train", str(config), "--max-steps", "3", "--lora.alpha", "8", "--eval-steps", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "«" in result.stdout  # the pre-flight sample with its trained span marked
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and "val_loss" in metrics[-1]
    adapter = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8
    assert (tmp_path / "out" / "loss.png").stat().st_size > 1000


@pytest.mark.parametrize("case", ["malformed_json", "missing_field", "empty", "missing_file", "unknown_key",
                                  "bad_model", "bad_value"])
def test_user_mistakes_are_one_line(case, tiny_model_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    lines = [json.dumps(r) for r in make_dataset(4, seed=0)]
    extra: list[str] = []
    model = str(tiny_model_dir)
    if case == "malformed_json":
        lines[2] = '{"instruction": "x", "output": '
    elif case == "missing_field":
        lines[1] = json.dumps({"instruction": "x", "input": "y"})
    elif case == "unknown_key":
        extra = ["--lora.rnk", "4"]
    elif case == "bad_model":
        model = str(tmp_path / "no-such-model")
    elif case == "bad_value":
        extra = ["--schedule", "exponential"]
    data.write_text("" if case == "empty" else "\n".join(lines) + "\n")
    if case == "missing_file":
        data.unlink()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    line = _error_line(lorafit("train", "--model", model, "--data.path", str(data), "--output-dir", str(out), *extra))
    expected = {"malformed_json": f"{data}:3", "missing_field": f"{data}:2", "empty": str(data),
                "missing_file": str(data), "unknown_key": "rnk", "bad_model": "no-such-model",
                "bad_value": "schedule"}[case]
    assert expected in line, line
    assert (out / "keep.txt").read_text() == "precious" and not (out / "adapter").exists()


def test_unknown_key_suggests_the_nearest(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data: {path: x.jsonl}\nlearning_rat: 1.0e-4\n")
    assert "did you mean 'learning_rate'" in _error_line(lorafit("train", str(config)))


def test_adapter_errors_through_the_cli(tiny_model_dir, tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    line = _error_line(lorafit("generate", "--model", str(tiny_model_dir), "--adapter", str(tmp_path), "hi"))
    assert "adapter_model.safetensors" in line and "corrupted" in line


def test_estimate_table():
    result = lorafit("estimate")
    assert result.returncode == 0 and "70B" in result.stdout and "fits 16 GiB?" in result.stdout


def test_estimate_for_a_gpu_and_for_the_cpu():
    gpu = lorafit("estimate", "--model", "8B", "--method", "qlora", "--device", "cuda", "--gpu-memory", "24")
    assert gpu.returncode == 0 and "torch.cuda.max_memory_allocated()" in gpu.stdout
    assert "fits a 24 GiB GPU" in gpu.stdout
    cpu = lorafit("estimate", "--model", "135M", "--method", "lora", "--device", "cpu")
    assert cpu.returncode == 0 and "GiB of RAM at the peak" in cpu.stdout and "max_memory" not in cpu.stdout
    assert "| cpu |" in lorafit("estimate", "--device", "cpu").stdout


def test_estimate_ternary_prints_the_table_of_sizes():
    from lorafit.train.estimate import format_grid

    result = lorafit("estimate", "--method", "ternary")
    assert result.returncode == 0 and result.stdout.strip() == format_grid("ternary")
    header = result.stdout.splitlines()[1].split()
    assert header[2:5] == ["packed", "scales", "bf16"] and header[-3:] == ["r=64", "total", "r=16"]
    assert "fits 16 GiB? (✓/✗)" in result.stdout.splitlines()[0]
    card = lorafit("estimate", "--method", "ternary", "--gpu-memory", "80", "--rank", "64", "--device", "cpu")
    assert card.returncode == 0 and "fits 80 GiB?" in card.stdout and "total r=64" in card.stdout
    assert "| cpu |" in card.stdout and "fp32 parts" in card.stdout


def test_estimate_from_a_model_folder_on_the_cpu(tiny_model_dir):
    result = lorafit("estimate", "--device", "cpu", "--model", str(tiny_model_dir), "--method", "qlora")
    assert result.returncode == 0, result.stderr
    assert "GiB of RAM at the peak" in result.stdout and "codes" in result.stdout.splitlines()[1]  # [0]: the shape read
    ternary = lorafit("estimate", "--model", str(tiny_model_dir), "--method", "ternary", "--group-size", "16")
    assert ternary.returncode == 0 and "packed" in ternary.stdout and "GPU" in ternary.stdout


def test_estimate_from_smollm2s_folder_and_its_gguf(smollm2_dir):
    folder = lorafit("estimate", "--model", str(smollm2_dir), "--rank", "8")
    gguf = lorafit("estimate", "--model", str(default_gguf()), "--rank", "8")
    assert folder.returncode == 0 and gguf.returncode == 0, (folder.stderr, gguf.stderr)
    shape = "30 layers, hidden 576, intermediate 1536, 9 heads (3 kv) x 64, vocab 49152, tied head: 134,515,008 params"
    assert folder.stdout.splitlines()[0] == "llama: " + shape and gguf.stdout == folder.stdout
    assert "total" in folder.stdout and "fits a 16 GiB GPU" in folder.stdout


def test_estimate_from_gemma3s_gguf(gemma3_gguf):
    result = lorafit("estimate", "--model", str(gemma3_gguf), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == ("gemma3: 18 layers, hidden 640, intermediate 2048, 4 heads (1 kv) x 256, "
                                            "vocab 262144, tied head: 268,098,176 params")
    assert "GiB of RAM at the peak" in result.stdout


@pytest.mark.parametrize("args,message", [
    (["--method", "dora"], "argument --method: invalid choice: 'dora'"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["--rank", "-4"], "rank=-4 must be at least 1"),
    (["--rank", "-4", "--model", "7B"], "rank=-4 must be at least 1"),
    (["--batch", "0", "--device", "cpu"], "batch=0 must be at least 1"),
    (["--gpu-memory", "-16"], "--gpu-memory -16 must be a positive size"),
    (["--method", "qlora", "--group-size", "64"], "group_size=64 applies to method='ternary' only"),
    (["--method", "ternary", "--group-size", "100"], "group_size=100 must divide every linear's in_features"),
    (["--model", "abc"], "model size 'abc' is unknown"),  # any number with M or B is a size (interpolated)
])
def test_estimate_bad_values_are_one_line_and_status_2(args, message):
    result = lorafit("estimate", *args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_merge_writes_a_plain_checkpoint_with_the_adapted_outputs(tiny_model_dir, tmp_path):
    import lorafit as lf
    from lorafit.io import save_adapter
    from lorafit.model import load_model

    model, _ = load_model(str(tiny_model_dir))
    lf.apply_lora(model, lf.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in lf.adapter_parameters(model):
            p.normal_(std=0.1)  # B != 0: the merged model must differ from the base
    save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "merged"
    result = lorafit("merge", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "adapter"),
                     "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged"]  # no temp folder left
    merged = LlamaForCausalLM.from_pretrained(out)  # plain transformers, no lorafit modules
    ids = torch.tensor([[1, 5, 9, 200, 3000]])
    model.eval()
    with torch.no_grad():
        expected, got = model(ids).logits, merged(ids).logits
        base = LlamaForCausalLM.from_pretrained(tiny_model_dir)(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (got - base).abs().max() > 1e-3
    assert AutoTokenizer.from_pretrained(out).eos_token is not None

    before = sorted(p.name for p in out.iterdir())
    line = _error_line(lorafit("merge", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "adapter"),
                               "--out", str(out)))
    assert str(out) in line and "--overwrite" in line
    assert sorted(p.name for p in out.iterdir()) == before


# -- flags: help from the dataclasses, --data FILE, near misses, device and dtype ---------------------------

SECTIONS = {"data": DataConfig, "lora": LoraConfig, "preference": PreferenceConfig, "grpo": GRPOConfig}
NOT_FIELDS = {"--help", "--resume", "--overwrite", "--nproc-per-node"}  # how to run, not what


def field_of_flag(flag: str) -> tuple[type, str]:
    """The dataclass field a `lorafit train` flag sets, worked out from the dataclasses themselves."""
    if flag == "--data":
        return DataConfig, "path"  # the shorthand
    section, _, leaf = flag[2:].rpartition(".")
    leaf = leaf.replace("-", "_")
    if section:
        return SECTIONS[section], leaf
    return next((cls, leaf) for cls in (RunConfig, TrainConfig) if leaf in {f.name for f in fields(cls)})


def first_docstring_line(cls: type, name: str) -> str:
    """The first line of the string literal under `name: ...` in the class's source."""
    lines = inspect.getsource(cls).splitlines()
    i = next(i for i, line in enumerate(lines) if re.match(rf"\s+{name}:", line))
    doc = lines[i + 1].strip()
    assert doc.startswith('"""'), (cls, name, doc)
    return doc[3:].removesuffix('"""').strip()


def help_entries(text: str) -> dict[str, str]:
    """{flag: its help entry, whitespace collapsed} from argparse's --help output."""
    entries: dict[str, str] = {}
    flag = None
    for line in text.splitlines():
        if match := re.match(r"^  (--[\w.-]+)", line):
            flag = match.group(1)
            entries[flag] = line
        elif flag and line.startswith("    "):
            entries[flag] += " " + line
        else:
            flag = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


def test_train_help_shows_docstring_type_and_default_of_every_field():
    result = lorafit("train", "--help", module="lorafit", COLUMNS="1000")  # python -m lorafit, no wrapping
    assert result.returncode == 0, result.stderr
    entries = help_entries(result.stdout)
    documented = set()
    for flag, entry in entries.items():
        if flag in NOT_FIELDS:
            continue
        cls, name = field_of_flag(flag)
        documented.add((cls, name))
        f = next(f for f in fields(cls) if f.name == name)
        assert " ".join(first_docstring_line(cls, name).split()) in entry, (flag, entry)
        shown = re.search(r"\(([^()]*), (required|default: (.*))\)$", entry)
        assert shown and shown.group(1) == f.type, (flag, entry)
        if f.default is MISSING and f.default_factory is MISSING:
            assert shown.group(2) == "required", (flag, entry)
        else:
            expected = f.default if f.default is not MISSING else f.default_factory()
            assert yaml.safe_load(shown.group(3)) == expected, (flag, entry)
    every_field = {(cls, f.name) for cls in (RunConfig, TrainConfig, DataConfig, LoraConfig, PreferenceConfig, GRPOConfig)
                   for f in fields(cls) if (cls, f.name) not in {(RunConfig, "data"), (RunConfig, "train"),
                                                                  (TrainConfig, "lora"), (TrainConfig, "preference"),
                                                                  (TrainConfig, "grpo")}}
    assert documented == every_field
    assert "--data FILE" in result.stdout and "--learning-rate FLOAT" in result.stdout


def test_building_the_parser_does_not_import_the_trainer():
    code = ("import sys, lorafit.cli as c; c.build_parser().parse_known_args(['train', '--data', 'x.jsonl']); "
            "print(sorted(m for m in ('lorafit.train.trainer', 'lorafit.train.prepare', 'lorafit.ops.chunked_loss', "
            "'matplotlib') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0 and result.stdout.strip() == "[]", (result.stdout, result.stderr[-2000:])


def test_train_with_data_shorthand_on_cpu(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", make_dataset(8, seed=0))
    out = tmp_path / "out"
    result = lorafit("train", "--data", str(data), "--model", str(tiny_model_dir), "--max-steps", "2",
                     "--batch-size", "4", "--lora.r", "2", "--output-dir", str(out), "--device", "cpu",
                     "--learning_rate", "1e-4")  # underscores accepted; 1e-4 (a string to YAML) read as a float
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and metrics[0]["lr"] == pytest.approx(1e-4)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 2
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 0


@pytest.mark.parametrize("flag, meant", [("--rank", "--lora.r"), ("--r", "--lora.r"),
                                         ("--max-seq-length", "--data.max-seq-length"),
                                         ("--lora_alpha", "--lora.alpha"), ("--learnin-rate", "--learning-rate")])
def test_unknown_flag_suggests_the_one_meant(flag, meant):
    line = _error_line(lorafit("train", "--data", "x.jsonl", flag, "8"))
    assert line == f"lorafit train: error: unknown option {flag}; did you mean {meant}?"


def test_argparse_errors_are_one_line():
    line = _error_line(lorafit("merge", "--adapter", "x"))
    assert "--out" in line and "required" in line


@pytest.mark.parametrize("command", ["train", "generate", "merge", "demo"])
@pytest.mark.parametrize("mistake", ["cuda", "dtype"])
def test_device_and_dtype_mistakes_are_one_line(command, mistake, tiny_model_dir, tmp_path):
    if mistake == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible here")
    args = {"train": ["--data", "x.jsonl", "--model", str(tiny_model_dir)],
            "generate": ["--model", str(tiny_model_dir), "hi"],
            "merge": ["--model", str(tiny_model_dir), "--adapter", "x", "--out", str(tmp_path / "m")],
            "demo": ["--output-dir", str(tmp_path / "demo")]}[command]
    extra = ["--device", "cuda"] if mistake == "cuda" else ["--dtype", "bogus"]
    line = _error_line(lorafit(command, *args, *extra))
    if mistake == "cuda":
        assert "device 'cuda'" in line and "no CUDA GPU" in line and "--device cpu" in line, line
    else:
        assert "dtype 'bogus' is unknown" in line and "--dtype" in line, line
    assert not (tmp_path / "demo").exists() and not (tmp_path / "m").exists()
