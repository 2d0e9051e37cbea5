"""`lorafit verify`'s command line: its arguments, and the names `verify.run.Options` takes from them (kept out
of verify/run.py so that building the CLI's parser imports no torch)."""

from __future__ import annotations

import argparse
import os

from lorafit.model import DEFAULT_MODEL
from lorafit.verify.targets import TARGETS

OPTIONS = ("adapter", "model", "quantize", "data", "gguf", "serve", "serve_model", "api_key", "target", "max_lora_rank",
           "out", "report", "quick", "device", "dtype")


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("adapter", help="adapter folder (its lorafit_fingerprint.json is the reference)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the base it was trained on: HF folder, .gguf or the default")
    p.add_argument("--quantize", default="auto",
                   help="how the base is loaded: auto (as in training, from the fingerprint), none, nf4, ternary")
    p.add_argument("--data", metavar="FILE", help="compare on this JSONL's first samples (the adapter on its base "
                   "is then the reference)")
    p.add_argument("--gguf", nargs="?", const="", metavar="FILE",
                   help="also run the merged model in llama.cpp: exported as f32 GGUF, or the GGUF FILE given")
    p.add_argument("--serve", metavar="URL", help="also ask a running server (lorafit serve, vLLM) for its log-probs")
    p.add_argument("--serve-model", metavar="NAME", help="the adapter's name on that server (default: its folder name)")
    p.add_argument("--api-key", default=os.environ.get("LORAFIT_API_KEY"), help="the server's key ($LORAFIT_API_KEY)")
    p.add_argument("--target", choices=TARGETS, help="check what this engine accepts (ollama: also write a Modelfile)")
    p.add_argument("--max-lora-rank", type=int, metavar="N", help="the engine's --max-lora-rank (vLLM's default: 16)")
    p.add_argument("--out", help="--target ollama: the folder for Modelfile and adapter.gguf (default: ADAPTER/ollama)")
    p.add_argument("--report", metavar="FILE", help="write every number (rows, per-layer survival) as JSON")
    p.add_argument("--quick", action="store_true",
                   help="only the adapter on its base (and --serve, --gguf FILE): is this the file that was trained?")
    p.add_argument("--device", default="cpu", help="where the models load (cpu keeps the fp32 comparison exact)")
    p.add_argument("--dtype", default="float32", help="compute dtype (16-bit widens the tolerances)")
    return p
