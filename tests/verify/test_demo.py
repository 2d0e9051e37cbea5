"""`lorafit verify` on the demo's adapter (SmolLM2-135M on its NF4 base), and the demo's adapter ending its turns.

The verify test takes the session's demo adapter (tests/conftest.py: the demo's recipe, shortened); the stop
test takes the adapter `make demo` wrote to runs/demo when there is one (with its 100 held-out examples),
else the same session adapter (its 40).
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafit.cli import main
from lorafit.fingerprint import FINGERPRINT_NAME
from lorafit.generate import render_prompt
from lorafit.io import read_prompt_format
from lorafit.prompt import alpaca_user_text
from lorafit.verify.external import llama_cpp_available
from tests.serve.live import API_KEY, start_server

REPO = Path(__file__).resolve().parents[2]


def rows_of(report: Path) -> dict[str, dict]:
    return {r["path"].split(" (")[0].split(" http")[0]: r for r in json.loads(report.read_text())["rows"]}


def test_verify_the_demo_adapter(demo_adapter, smollm2_dir, tmp_path, capsys):
    adapter, _ = demo_adapter
    server = start_server(smollm2_dir, {"demo": adapter}, tmp_path, tmp_path / "server.log", "--quantize", "nf4")
    try:
        status = main(["verify", str(adapter), "--gguf", "--serve", server.url, "--serve-model", "demo",
                       "--api-key", API_KEY, "--report", str(tmp_path / "report.json")])
    finally:
        server.process.terminate()
        server.process.wait(10)
    out = capsys.readouterr().out
    print(out)
    rows = rows_of(tmp_path / "report.json")
    passed = ["adapter on its base", "PEFT", "merged", "server"] + (["GGUF"] if llama_cpp_available() else [])
    assert all(rows[name]["verdict"] == "pass" for name in passed), out
    assert rows["merged -> NF4"]["distance"] is not None and "update surviving" in rows["merged -> NF4"]["note"]
    survival = json.loads((tmp_path / "report.json").read_text())["survival"]
    assert len(survival) == 30 * 7 and all(0 < e["survival"] <= 1.5 for e in survival)  # every adapted layer
    assert "model.layers.29: q_proj" in out
    assert status == (0 if rows["merged -> NF4"]["verdict"] == "pass" else 1)


def test_a_corrupted_copy_and_a_wrong_base_fail_against_the_fingerprint(demo_adapter, smollm2_dir, tmp_path, capsys):
    adapter, _ = demo_adapter
    broken = shutil.copytree(adapter, tmp_path / "broken")
    tensors = load_file(broken / "adapter_model.safetensors")
    key = "base_model.model.model.layers.10.self_attn.v_proj.lora_B.weight"
    tensors[key] = tensors[key] * 10
    save_file(tensors, broken / "adapter_model.safetensors", metadata={"format": "pt"})
    assert main(["verify", str(broken), "--report", str(tmp_path / "broken.json")]) == 1
    out = capsys.readouterr().out
    rows = rows_of(tmp_path / "broken.json")
    assert [n for n in ("adapter on its base", "PEFT", "merged") if rows[n]["verdict"] == "FAIL"] == \
        ["adapter on its base", "PEFT", "merged"], out
    assert "lorafit verify: adapter on its base, PEFT, merged" in out  # the rows named

    from lorafit.model import load_model

    wrong, tokenizer = load_model(smollm2_dir)  # the same architecture, other weights
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in wrong.named_parameters():
            if name.endswith("proj.weight"):
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
    wrong.save_pretrained(tmp_path / "wrong-base")
    tokenizer.save_pretrained(tmp_path / "wrong-base")
    assert main(["verify", str(adapter), "--model", str(tmp_path / "wrong-base"), "--quick",
                 "--report", str(tmp_path / "wrong.json")]) == 1
    assert rows_of(tmp_path / "wrong.json")["adapter on its base"]["verdict"] == "FAIL"
    capsys.readouterr()


def test_engine_checks_on_the_demo_adapter(demo_adapter, tmp_path, capsys):
    """r=16 passes vLLM's default max_lora_rank and fails a limit of 8 in one line; Ollama gets a Modelfile."""
    adapter, _ = demo_adapter
    assert main(["verify", str(adapter), "--quick", "--target", "vllm", "--max-lora-rank", "8"]) == 1
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("--target")] == [
        "--target vllm: rank 16 is above vLLM's max_lora_rank 8: start vLLM with --max-lora-rank 16, or train with "
        "lora.r <= 8"]
    assert main(["verify", str(adapter), "--quick", "--target", "ollama", "--out", str(tmp_path / "ollama")]) == 0
    from tests.verify.gotemplate import parse_modelfile

    parsed = dict(parse_modelfile((tmp_path / "ollama" / "Modelfile").read_text(), tmp_path / "ollama"))
    assert parsed["FROM"].endswith(".gguf") and 'PARAMETER' in (tmp_path / "ollama" / "Modelfile").read_text()
    capsys.readouterr()


@pytest.fixture(scope="module")
def demo_run(request):
    """(adapter, held-out records): `make demo`'s (runs/demo) when it is there, else the session's."""
    adapter = REPO / "runs" / "demo" / "adapter"
    val = REPO / "runs" / "demo" / "data" / "val.jsonl"
    if (adapter / FINGERPRINT_NAME).is_file() and val.is_file():
        return adapter, [json.loads(line) for line in val.read_text().splitlines()]
    return request.getfixturevalue("demo_adapter")


def test_the_demo_adapter_ends_its_turn_in_generate_and_serve(demo_run, smollm2_dir, tmp_path, capsys):
    """Every held-out prompt: `lorafit generate` reports no answer cut at the token limit, and `lorafit serve`
    finishes every request with finish_reason "stop" (an end-of-turn / EOS token, no stop strings asked)."""
    adapter, records = demo_run
    limit = 32  # an ISO date and its end token take at most 12
    # lorafit generate takes one --input for all its prompts: each record goes as its instruction and input in one
    # user message, which is how the chat template rendered it in training (lorafit.prompt.user_message)
    texts = [alpaca_user_text(r["instruction"], r["input"]) for r in records]
    assert main(["generate", *texts, "--adapter", str(adapter), "--quantize", "nf4",
                 "--max-new-tokens", str(limit)]) == 0
    captured = capsys.readouterr()
    assert sum(line.startswith("### prompt ") for line in captured.out.splitlines()) == len(records)  # one block each
    assert "cut at --max-new-tokens" not in captured.err, captured.err

    server = start_server(smollm2_dir, {"demo": adapter}, tmp_path, tmp_path / "server.log", "--quantize", "nf4")
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
        fmt = read_prompt_format(adapter)

        def ask(record: dict) -> tuple[str, int]:
            ids = render_prompt(tokenizer, record["instruction"], fmt, input=record["input"])
            answer = httpx.post(server.base_url + "/completions", timeout=600, headers={
                "Authorization": f"Bearer {API_KEY}"}, json={"model": "demo", "prompt": ids, "max_tokens": limit}).json()
            return answer["choices"][0]["finish_reason"], answer["usage"]["completion_tokens"]
        with ThreadPoolExecutor(len(records)) as pool:  # all at once: the server batches them
            finishes = list(pool.map(ask, records))
    finally:
        server.process.terminate()
        server.process.wait(10)
    assert all(reason == "stop" and n < limit for reason, n in finishes), finishes
