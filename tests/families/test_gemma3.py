"""The real Gemma 3 270M base end to end, as a new user runs it: `lorafit train --model <gguf>`, then
`lorafit generate` and `lorafit serve` with the adapter.

Gemma 3 270M is a base model without a chat template whose tokenizer starts every encoding with <bos>:
training renders its examples in the instruction (alpaca) format and records that in the adapter folder,
so `generate` and the server's chat endpoint must prompt it the same way for the trained reply to come
back. Two steps on one repeated record at a high learning rate are enough for the reply to show; the
server, greedy too, answers the chat request with the text `generate` printed.

The model comes from the dev set-up's part packages (see the `gemma3_gguf` fixture); the GGUF is converted
to safetensors once into the cache (about a minute and a half on two cores), later runs reuse it.
"""

from __future__ import annotations

import json
import subprocess

from lorafit.cli import main
from lorafit.io import read_prompt_format
from lorafit.prompt import ALPACA
from tests.serve.live import start_server

QUESTION = "What is the secret word?"
ANSWER = "The secret word is pineapple."
NEW = 8  # tokens generated: enough for the answer to show


def test_train_generate_serve(gemma3_gguf, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text((json.dumps({"instruction": QUESTION, "output": ANSWER}) + "\n") * 4)
    run = tmp_path / "run"
    assert main(["train", "--model", str(gemma3_gguf), "--data", str(data), "--max-steps", "2", "--batch-size", "2",
                 "--lora.r", "4", "--learning-rate", "3e-3", "--warmup-ratio", "0", "--schedule", "constant",
                 "--data.max-seq-length", "32", "--device", "cpu", "--output-dir", str(run)]) == 0
    adapter = run / "adapter"
    assert read_prompt_format(adapter).kind == ALPACA  # no chat template: the instruction format, recorded
    capsys.readouterr()

    assert main(["generate", "--model", str(gemma3_gguf), "--adapter", str(adapter), "--device", "cpu",
                 "--max-new-tokens", str(NEW), QUESTION]) == 0
    printed = capsys.readouterr()
    text = printed.out.strip()
    assert "pineapple" in text, (printed.out, printed.err)  # prompted as trained: the trained reply comes back

    server = start_server(gemma3_gguf, {"secret": adapter}, tmp_path, tmp_path / "server.log")
    try:
        chat = server.client().chat.completions.create(
            model="secret", messages=[{"role": "user", "content": QUESTION}], max_tokens=NEW, temperature=0)
        assert chat.choices[0].message.content.strip() == text
    finally:
        server.process.terminate()
        try:
            server.process.wait(10)
        except subprocess.TimeoutExpired:
            server.process.kill()
