"""A `python -m lorafit.serve` subprocess on a free loopback port, for the HTTP tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key"


@dataclass
class Server:
    url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen
    adapter_root: Path
    log: Path

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def client(self, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=self.base_url, api_key=API_KEY, max_retries=0, timeout=60, **kwargs)


def start_server(model_dir: Path, adapters: dict[str, Path], adapter_root: Path, log: Path, *extra: str) -> Server:
    cmd = [sys.executable, "-m", "lorafit.serve", "--model", str(model_dir), "--port", "0", "--api-key", API_KEY,
           "--adapter-root", str(adapter_root), "--threads", "1", "--max-batch-size", "32", *extra]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=env)
    found: list[str] = []

    def read() -> None:  # keep draining stdout so the server never blocks on a full pipe
        for line in process.stdout:
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                found.append(m.group(1))

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 90
    while not found:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    return Server(found[0], process, adapter_root, log)
