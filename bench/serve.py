"""Mixed-adapter batching vs one adapter at a time, on the same requests.

    python bench/serve.py [--model M] [--adapters 8] [--per-adapter 4] [--max-tokens 32] [--no-share-prefixes]

Every request arrives at t=0, spread evenly over N adapters. lorafit's engine runs them all in
one continuous batch, each row on its own adapter; prompts on one adapter that start alike (the
chat template's system prompt) prefill that prefix once, unless --no-share-prefixes. The baseline is what a PEFT user does: one
PeftModel with the same adapters loaded, requests grouped by adapter, `set_adapter` per group,
each group one batched `generate`. Both decode greedily and exactly --max-tokens tokens, so the
work is identical; a request's latency is from t=0 to its last token.
"""

from __future__ import annotations

import argparse
import os
import platform
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lorafit as lf  # noqa: E402
from lorafit.lora.inject import lora_layers  # noqa: E402
from lorafit.model import load_model  # noqa: E402
from lorafit.serve import Engine, SamplingParams  # noqa: E402

PROMPTS = ["Write a SQL query that counts users by country.", "Summarize the plot of Hamlet in two lines.",
           "What is the derivative of x squared?", "Give three tips for writing clear emails.",
           "Translate 'good morning' into French.", "Explain what a hash map is.",
           "Name the planets of the solar system.", "Why is the sky blue?"]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (info.read_text().splitlines() if info.exists() else [])
             if line.startswith("model name")]
    cpu = names[0] if names else cpu
    return (f"{cpu}; {os.cpu_count()} logical CPUs; torch {torch.__version__} with {torch.get_num_threads()} threads; "
            f"Python {platform.python_version()}; {platform.system()} {platform.release()}")


def make_adapters(model_name: str | None, n: int, rank: int, out: Path) -> list[Path]:
    """n random rank-`rank` adapters (trained-looking: A and B both non-zero) in PEFT's format."""
    model, _ = load_model(model_name)
    paths = []
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        name = f"a{i}"
        lf.add_adapter(model, lf.LoraConfig(r=rank, target_modules="all-linear"), name)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                for p in (layer.lora_A[name], layer.lora_B[name]):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        paths.append(lf.save_adapter(model, out / name, adapter=name))
    return paths


def percentiles(latencies: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(latencies, n=20)
    return q[9], q[18]


def run_lorafit(model_name, tokenizer, adapters, jobs, max_tokens, batch_size,
                share_prefixes=True) -> tuple[float, list[float]]:
    model, _ = load_model(model_name)
    engine = Engine(model, tokenizer, base_name="base", max_batch_size=batch_size, max_wait_ms=50,
                    share_prefixes=share_prefixes)
    for path in adapters:
        engine.load_adapter(path.name, path)
    engine.start()
    try:
        def once(batch):
            done: queue.Queue = queue.Queue()
            start = time.perf_counter()
            requests = [engine.submit(ids, adapter, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                                      lambda e: e.finish_reason and done.put(e)) for ids, adapter in batch]
            for _ in requests:
                done.get()
            return time.perf_counter() - start, [r.t_done - start for r in requests]

        once(jobs[:2])  # warm-up
        return once(jobs)
    finally:
        engine.stop()


def run_peft(model_name, tokenizer, adapters, jobs, max_tokens) -> tuple[float, list[float]]:
    from peft import PeftModel

    base, _ = load_model(model_name)
    model = PeftModel.from_pretrained(base, adapters[0], adapter_name=adapters[0].name)
    for path in adapters[1:]:
        model.load_adapter(path, adapter_name=path.name)
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"

    def group(batch):
        model.set_adapter(batch[0][1])
        enc = tokenizer.pad({"input_ids": [ids for ids, _ in batch]}, return_tensors="pt")
        with torch.inference_mode():
            model.generate(**enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)

    try:
        group(jobs[:1])  # warm-up
        start = time.perf_counter()
        latencies = []
        for adapter in dict.fromkeys(a for _, a in jobs):
            batch = [j for j in jobs if j[1] == adapter]
            group(batch)
            latencies += [time.perf_counter() - start] * len(batch)
        return time.perf_counter() - start, latencies
    finally:
        tokenizer.padding_side = side


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--per-adapter", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-share-prefixes", action="store_true", help="lorafit prefills every prompt in full")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    print("machine:", machine())
    _, tokenizer = load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(args.model, args.adapters, args.rank, Path(tmp))
        jobs = []
        for i in range(args.per_adapter):
            for j, path in enumerate(adapters):
                prompt = PROMPTS[(i + j) % len(PROMPTS)]
                ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                    tokenize=True, return_dict=True)["input_ids"]
                jobs.append((list(ids), path.name))
        tokens = len(jobs) * args.max_tokens
        print(f"{len(jobs)} requests over {len(adapters)} rank-{args.rank} adapters (all-linear), "
              f"{args.max_tokens} tokens each, all arriving at t=0")
        results = {
            "lorafit mixed batch": run_lorafit(args.model, tokenizer, adapters, jobs, args.max_tokens, len(jobs),
                                               share_prefixes=not args.no_share_prefixes),
            "PEFT set_adapter per group": run_peft(args.model, tokenizer, adapters, jobs, args.max_tokens),
        }
    for name, (seconds, latencies) in results.items():
        p50, p95 = percentiles(latencies)
        print(f"{name:28s} {tokens / seconds:7.1f} tok/s  wall {seconds:6.2f}s  p50 {p50:6.2f}s  p95 {p95:6.2f}s")
    (a, la), (b, lb) = results.values()
    print(f"mixed / per-adapter: throughput x{b / a:.2f}, p95 latency x{percentiles(lb)[1] / percentiles(la)[1]:.2f} lower")


if __name__ == "__main__":
    main()
