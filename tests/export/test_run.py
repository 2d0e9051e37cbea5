"""`lorafit export` end to end: what it writes runs in llama.cpp, an NF4 base is dequantized (and says
so), and every user mistake is one line, exit status 2, with nothing left behind (acceptance 6)."""

import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from lorafit.cli import main
from lorafit.io import load_adapter
from lorafit.model import load_model
from tests.export.kit import hf_logits, llama, llama_logits, needs_llama_cpp, rel_max_err

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "the third of March, nineteen ninety-eight -> 1998-03-03"


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(["export", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


@needs_llama_cpp
def test_export_merged_model_runs_in_llama_cpp(files, tmp_path, capsys):
    code, out, _ = run(capsys, "--model", files / "llama", "--adapter", files / "adapter", "--outtype", "f32",
                       "--out", tmp_path / "m.gguf")
    assert code == 0 and "wrote" in out and "chat template" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "m.gguf"]  # and its model card
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "gguf" and card.data.base_model is None and "m.gguf" in card.text
    model, tok = load_model(files / "llama")
    load_adapter(model, files / "adapter")
    ids = tok(PROMPT)["input_ids"]
    assert rel_max_err(llama_logits(tmp_path / "m.gguf", ids), hf_logits(model, ids)) <= 1e-3


@needs_llama_cpp
def test_export_base_alone_and_the_adapter_as_gguf_lora(files, tmp_path, capsys):
    assert run(capsys, "--model", files / "llama", "--outtype", "f32", "--out", tmp_path / "base.gguf")[0] == 0
    code, out, _ = run(capsys, "--model", files / "llama", "--adapter", files / "adapter", "--format", "gguf-lora",
                       "--out", tmp_path / "lora.gguf")
    assert code == 0 and "GGUF LoRA" in out
    assert "lora.gguf" in ModelCard.load(tmp_path / "README.md").text  # the card now describes the last export
    (tmp_path / "README.md").write_text("# my project\n")  # not a model card: never rewritten
    code, out, _ = run(capsys, "--model", files / "llama", "--adapter", files / "adapter", "--format", "gguf-lora",
                       "--out", tmp_path / "lora2.gguf")
    assert code == 0 and "not a model card" in out and (tmp_path / "README.md").read_text() == "# my project\n"
    model, tok = load_model(files / "llama")
    load_adapter(model, files / "adapter")
    ids = tok(PROMPT)["input_ids"]
    got = llama_logits(tmp_path / "base.gguf", ids, lora=tmp_path / "lora.gguf")
    assert rel_max_err(got, hf_logits(model, ids)) <= 1e-3


@needs_llama_cpp
def test_nf4_base_is_exported_dequantized(files, tmp_path, capsys):
    code, out, _ = run(capsys, "--model", files / "llama-nf4", "--adapter", files / "adapter", "--outtype", "f32",
                       "--out", tmp_path / "m.gguf")
    assert code == 0 and "quantized (NF4)" in out and "dequantizing" in out
    model, tok = load_model(files / "llama-nf4")  # NF4 layers: the exact codes of the checkpoint
    load_adapter(model, files / "adapter")
    ids = tok(PROMPT)["input_ids"]
    assert rel_max_err(llama_logits(tmp_path / "m.gguf", ids), hf_logits(model, ids)) <= 1e-3
    assert llama(tmp_path / "m.gguf").metadata["general.file_type"] == "0"  # ALL_F32


@pytest.mark.parametrize("case, flags, words", [
    ("unknown outtype", ["--outtype", "q5_k"], ["--outtype q5_k", "f16", "q8_0"]),
    ("unsupported architecture", ["--model", "{gpt2}"], ["gpt2", "GPT2LMHeadModel", "Llama (llama)", "Gemma 3"]),
    ("adapter for another base", ["--adapter", "{adapter-other}"], ["adapter-other", "different base model"]),
    ("out in a missing folder", ["--out", "{tmp}/missing/m.gguf"], ["missing", "does not exist"]),
    ("unknown format", ["--format", "ggml"], ["--format ggml", "gguf-lora"]),
    ("lora with modules_to_save", ["--format", "gguf-lora", "--adapter", "{adapter-mts}"], ["modules_to_save", "lm_head"]),
    ("lora of an (IA)³ adapter", ["--format", "gguf-lora", "--adapter", "{adapter-ia3}"], ["(IA)³", "--format gguf"]),
    ("lora outtype", ["--format", "gguf-lora", "--adapter", "{adapter}", "--outtype", "q8_0"], ["q8_0", "f32"]),
    ("output exists", ["--out", "{tmp}/exists.gguf"], ["exists", "--overwrite"]),
])
def test_user_mistakes_are_one_line_and_leave_nothing(case, flags, words, files, tmp_path, capsys):
    (tmp_path / "exists.gguf").write_bytes(b"keep me")
    args = {"--model": str(files / "llama"), "--adapter": str(files / "adapter"), "--out": str(tmp_path / "m.gguf")}
    extra = []
    for flag, value in zip(flags[::2], flags[1::2]):
        value = value.format(tmp=tmp_path, **{p.name: p for p in files.iterdir()})
        (args.__setitem__(flag, value) if flag in args else extra.extend([flag, value]))
    code, out, err = run(capsys, *[x for kv in args.items() for x in kv], *extra)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("lorafit export: error:"), err
    assert all(w in lines[0] for w in words), lines[0]
    assert [p.name for p in tmp_path.iterdir()] == ["exists.gguf"] and (tmp_path / "exists.gguf").read_bytes() == b"keep me"


def test_the_command_line_exit_status(files, tmp_path):
    """The real `lorafit` process: status 2, one line, no traceback."""
    result = subprocess.run([sys.executable, "-m", "lorafit.cli", "export", "--model", str(files / "gpt2"),
                             "--out", str(tmp_path / "m.gguf")], capture_output=True, text=True, cwd=ROOT,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        line for line in result.stderr.splitlines() if line.startswith("lorafit export: error: model_type 'gpt2'")]
    assert not any(tmp_path.iterdir())
