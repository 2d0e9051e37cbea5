"""`lorafit verify` end to end on a tiny Llama trained here (seconds): every path passes for the adapter as
trained, a changed file or a wrong base fails naming the rows, engines' rules fail in one line each."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

import lorafit as lf
from lorafit.cli import main
from lorafit.fingerprint import FINGERPRINT_NAME, read_fingerprint
from lorafit.model import load_model
from lorafit.train.data import Record, tokenize_record
from lorafit.train.trainer import TrainConfig, Trainer
from lorafit.verify.external import llama_cpp_available
from tests.serve.live import API_KEY, start_server
from tests.serve.tiny import make_model, make_tokenizer

RECORDS = [{"instruction": "the quick brown fox", "output": "jumps over the lazy dog"},
           {"instruction": "hello world", "output": "tokens stream back as they come"},
           {"instruction": "a server answers", "output": "many clients at once"}] * 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(base folder, adapter folder) of 3 QLoRA steps on a tiny Llama with an NF4 base."""
    root = tmp_path_factory.mktemp("verify")
    tok = make_tokenizer()
    make_model(tok).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    model, tok = load_model(root / "base", quantize="nf4")
    samples = [tokenize_record(tok, Record("alpaca", r, f"mem:{i}")) for i, r in enumerate(RECORDS)]
    config = TrainConfig(output_dir=str(root / "run"), lora=lf.LoraConfig(r=8), max_steps=3, batch_size=3,
                         learning_rate=2e-2)
    Trainer(config, model, tok, samples[:6], samples[6:]).train()
    return root / "base", root / "run" / "adapter"


def verify(*args: str, capsys) -> tuple[int, str, dict]:
    report = args[0] + ".report.json"
    status = main(["verify", *args, "--report", report])
    with open(report) as f:
        return status, capsys.readouterr().out, {r["path"].split(" (")[0]: r for r in json.load(f)["rows"]}


def test_the_fingerprint_is_saved_with_the_adapter(trained):
    _, adapter = trained
    fp = read_fingerprint(adapter)
    assert fp.meta["quantize"] == "nf4" and fp.meta["source"] == "validation" and fp.meta["step"] == 3
    assert len(fp.probes) == 3 and all(len(t) == len(p.positions) for p, t in zip(fp.probes, fp.top))


def test_every_path_passes_for_the_adapter_as_trained(trained, tmp_path, capsys):
    base, adapter = trained
    copy = shutil.copytree(adapter, tmp_path / "tuned")
    server = start_server(base, {"tuned": copy}, tmp_path, tmp_path / "server.log", "--quantize", "nf4")
    try:
        status, out, rows = verify(str(copy), "--model", str(base), "--gguf", "--serve", server.url,
                                   "--api-key", API_KEY, capsys=capsys)
    finally:
        server.process.terminate()
        server.process.wait(10)
    assert status == 0, out
    want = ["adapter on its base", "PEFT", "merged", "merged -> NF4", "server http://"]
    if llama_cpp_available():
        want.append("GGUF")
    for name in want:
        row = next(r for path, r in rows.items() if path.startswith(name))
        assert row["verdict"] == "pass", (name, out)
    assert "share of each trained update that survives requantization" in out
    assert "model.layers.1: q_proj" in out  # per layer


def test_a_changed_file_and_a_wrong_base_fail_naming_the_rows(trained, tmp_path, capsys):
    base, adapter = trained
    broken = shutil.copytree(adapter, tmp_path / "broken")
    tensors = load_file(broken / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if "lora_B" in k)
    tensors[key] = tensors[key] * 10
    save_file(tensors, broken / "adapter_model.safetensors")
    status, out, rows = verify(str(broken), "--model", str(base), capsys=capsys)
    assert status == 1
    for name in ("adapter on its base", "PEFT", "merged"):
        assert rows[name]["verdict"] == "FAIL", out
    assert "lorafit verify: adapter on its base, PEFT, merged" in out

    other = tmp_path / "other-base"
    tok = make_tokenizer()
    make_model(tok, seed=1).save_pretrained(other)  # the same shapes, other weights
    tok.save_pretrained(other)
    status, out, rows = verify(str(adapter), "--model", str(other), capsys=capsys)
    assert status == 1 and rows["adapter on its base"]["verdict"] == "FAIL", out


def test_engine_rules_fail_in_one_line_each(trained, tmp_path, capsys):
    base, adapter = trained
    model, _ = load_model(base)
    lf.save_adapter(lf.apply_lora(model, lf.LoraConfig(r=4, use_dora=True)), tmp_path / "dora")
    status = main(["verify", str(tmp_path / "dora"), "--model", str(base), "--target", "vllm"])
    out = capsys.readouterr().out
    assert status == 1
    lines = [line for line in out.splitlines() if line.startswith("--target vllm:")]
    assert len(lines) == 1 and "DoRA" in lines[0] and "lora.use_dora" in lines[0]
    assert "no fingerprint" in out  # nothing to compare without one (or --data): the check alone runs

    status = main(["verify", str(adapter), "--model", str(base), "--target", "vllm", "--max-lora-rank", "4"])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("--target vllm:")]
    assert status == 1 and len(lines) == 1
    assert "rank 8 is above vLLM's max_lora_rank 4: start vLLM with --max-lora-rank 8" in lines[0]
    assert main(["verify", str(adapter), "--model", str(base), "--target", "vllm"]) == 0  # r=8 <= vLLM's 16
    capsys.readouterr()


def test_ollama_gets_a_modelfile_and_a_gguf_lora(trained, tmp_path, capsys):
    from tests.verify.gotemplate import parse_modelfile, render

    base, adapter = trained
    assert main(["verify", str(adapter), "--model", str(base), "--target", "ollama", "--out", str(tmp_path / "ol")]) == 0
    text = (tmp_path / "ol" / "Modelfile").read_text()
    parsed = dict(parse_modelfile(text, tmp_path / "ol"))
    assert parsed["ADAPTER"] == "./adapter.gguf" and (tmp_path / "ol" / "adapter.gguf").stat().st_size > 0
    tok = make_tokenizer()
    messages = [{"role": "user", "content": "hello world"}]
    assert render(parsed["TEMPLATE"], messages) == tok.apply_chat_template(messages, tokenize=False,
                                                                         add_generation_prompt=True)
    capsys.readouterr()


def test_data_makes_the_adapter_on_its_base_the_reference_and_bad_input_is_one_line(trained, tmp_path, capsys):
    base, adapter = trained
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:2]))
    status, out, rows = verify(str(adapter), "--model", str(base), "--data", str(data), capsys=capsys)
    assert status == 0 and rows["reference"]["note"].startswith("the adapter on its base"), out
    bare = shutil.copytree(adapter, tmp_path / "bare")
    (bare / FINGERPRINT_NAME).unlink()
    assert main(["verify", str(bare), "--model", str(base)]) == 2
    assert "no fingerprint" in capsys.readouterr().err
    cli = subprocess.run([sys.executable, "-m", "lorafit", "verify", str(tmp_path / "missing")], capture_output=True,
                         text=True)
    assert cli.returncode == 2 and len(cli.stderr.strip().splitlines()) == 1
