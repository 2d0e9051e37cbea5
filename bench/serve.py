"""Serving throughput: mixed-adapter batches vs the base model alone vs PEFT's one adapter at a time.

    python bench/serve.py [--model M] [--adapters 8] [--per-adapter 4] [--max-tokens 32] [--rounds 3]
                          [--threads N] [--no-share-prefixes] [--skip-peft] [--json out.json]
    python bench/serve.py --smoke    # a toy model of the same family, 2 x 2 requests of 4 tokens: checks the script

Every request arrives at t=0, spread evenly over N adapters. Three ways to serve the same requests:

* lorafit mixed batch: one continuous batch, each row on its own adapter; prompts on one adapter
  that start alike (the chat template's system prompt) prefill that prefix once, unless
  --no-share-prefixes.
* lorafit base only: the same prompts on the bare base model (no adapter loaded anywhere), the
  ceiling for the mixed batch: what the adapters cost is the gap to it (target: mixed >= 0.85x).
* PEFT set_adapter per group: what a PEFT user does, one PeftModel with the same adapters loaded,
  requests grouped by adapter, `set_adapter` per group, each group one batched `generate`
  (target: mixed >= 5x).

All decode greedily and exactly --max-tokens tokens, so the work is identical; a request's latency
is from t=0 to its last token. The two lorafit sides alternate for --rounds rounds (the best round
of each is reported, and the median next to it), so a neighbour's load hits both alike; each side
also prints `other load`: the CPU other processes used meanwhile, as a share of all cores.
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lorafit as lf  # noqa: E402
from bench.common import machine_busy_seconds, machine_info, toy_model_folder, write_json  # noqa: E402
from lorafit.lora.inject import lora_layers  # noqa: E402
from lorafit.model import load_model  # noqa: E402
from lorafit.serve import Engine, SamplingParams  # noqa: E402

PROMPTS = ["Write a SQL query that counts users by country.", "Summarize the plot of Hamlet in two lines.",
           "What is the derivative of x squared?", "Give three tips for writing clear emails.",
           "Translate 'good morning' into French.", "Explain what a hash map is.",
           "Name the planets of the solar system.", "Why is the sky blue?"]


@dataclass
class Run:
    """One timed pass over all requests."""

    seconds: float
    latencies: list[float]
    other_load: float  # CPU used by other processes meanwhile, as a share of all cores
    cpu_seconds: float  # CPU this process used (all threads): less sensitive to a neighbour than wall time


@dataclass
class Side:
    name: str
    runs: list[Run] = field(default_factory=list)

    def best(self) -> Run:
        return min(self.runs, key=lambda r: r.seconds)

    def tok_s(self, tokens: int) -> float:
        return tokens / self.best().seconds

    def median_tok_s(self, tokens: int) -> float:
        return tokens / statistics.median(r.seconds for r in self.runs)

    def tok_per_cpu_s(self, tokens: int) -> float:
        return tokens / min(r.cpu_seconds for r in self.runs)


def timed(work) -> Run:
    busy0, own0, wall0 = machine_busy_seconds(), time.process_time(), time.perf_counter()
    seconds, latencies = work()
    wall, own = time.perf_counter() - wall0, time.process_time() - own0
    foreign = (machine_busy_seconds() - busy0) - own
    return Run(seconds, latencies, max(0.0, foreign) / (wall * (os.cpu_count() or 1)), own)


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


def run_lorafit(model_name, tokenizer, adapters, jobs, max_tokens, share_prefixes=True) -> Run:
    """The requests through one engine; `adapters` empty and every job's adapter None: the base alone."""
    model, _ = load_model(model_name)
    engine = Engine(model, tokenizer, base_name="base", max_batch_size=len(jobs), max_wait_ms=50,
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

        once(jobs[: max(len(adapters), 2)])  # warm-up: one request per adapter (the first of each stacks them)
        return timed(lambda: once(jobs))
    finally:
        engine.stop()


def run_peft(model_name, tokenizer, adapters, jobs, max_tokens) -> Run:
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

    def all_groups():
        start = time.perf_counter()
        latencies = []
        for adapter in dict.fromkeys(a for _, a in jobs):
            batch = [j for j in jobs if j[1] == adapter]
            group(batch)
            latencies += [time.perf_counter() - start] * len(batch)
        return time.perf_counter() - start, latencies

    try:
        group(jobs[:1])  # warm-up
        return timed(all_groups)
    finally:
        tokenizer.padding_side = side


def make_jobs(tokenizer, adapters: list[Path], per_adapter: int) -> list[tuple[list[int], str]]:
    jobs = []
    for i in range(per_adapter):
        for j, path in enumerate(adapters):
            prompt = PROMPTS[(i + j) % len(PROMPTS)]
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"]
            jobs.append((list(ids), path.name))
    return jobs


def progress(side: Side, index: int, tokens: int, run: Run) -> None:
    """Keep the run and say so at once (a long benchmark shows where it is)."""
    side.runs.append(run)
    print(f"[{side.name}, round {index + 1}] {tokens / run.seconds:.1f} tok/s in {run.seconds:.2f}s, "
          f"other load {run.other_load:.0%}", file=sys.stderr, flush=True)


def report(sides: list[Side], tokens: int) -> dict:
    for side in sides:
        best = side.best()
        p50, p95 = percentiles(best.latencies)
        loads = ", ".join(f"{r.other_load:.0%}" for r in side.runs)
        print(f"{side.name:28s} {side.tok_s(tokens):7.1f} tok/s (median {side.median_tok_s(tokens):6.1f}, "
              f"{side.tok_per_cpu_s(tokens):6.1f} per CPU-s)  wall {best.seconds:6.2f}s  p50 {p50:6.2f}s  "
              f"p95 {p95:6.2f}s  other load {loads}")
    by = {s.name: s for s in sides}
    mixed, base, peft = by["lorafit mixed batch"], by["lorafit base only"], by.get("PEFT set_adapter per group")
    ratios = {"mixed / base only": mixed.tok_s(tokens) / base.tok_s(tokens),
              "mixed / base only (medians)": mixed.median_tok_s(tokens) / base.median_tok_s(tokens),
              "mixed / base only (per CPU-s)": mixed.tok_per_cpu_s(tokens) / base.tok_per_cpu_s(tokens)}
    print(f"mixed / base only: throughput x{ratios['mixed / base only']:.3f} "
          f"(medians x{ratios['mixed / base only (medians)']:.3f}, "
          f"per CPU-s x{ratios['mixed / base only (per CPU-s)']:.3f}; target >= 0.85)")
    if peft is not None:
        ratios["mixed / PEFT"] = mixed.tok_s(tokens) / peft.tok_s(tokens)
        p95 = percentiles(peft.best().latencies)[1] / percentiles(mixed.best().latencies)[1]
        print(f"mixed / PEFT per adapter: throughput x{ratios['mixed / PEFT']:.2f} (target >= 5), "
              f"p95 latency x{p95:.2f} lower")
    return {"tokens": tokens, "ratios": ratios,
            "sides": {s.name: {"tok_s_best": s.tok_s(tokens), "tok_s_median": s.median_tok_s(tokens),
                               "runs": [{"seconds": r.seconds, "cpu_seconds": r.cpu_seconds,
                                         "other_load": r.other_load} for r in s.runs]}
                      for s in sides}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--per-adapter", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3, help="alternating base-only / mixed rounds")
    parser.add_argument("--no-share-prefixes", action="store_true", help="lorafit prefills every prompt in full")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    parser.add_argument("--smoke", action="store_true",
                        help="check the script in seconds: a random toy model of SmolLM2's family (unless --model), "
                             "and unless given, --adapters 2 --per-adapter 2 --max-tokens 4 --rounds 1; "
                             "the numbers mean nothing")
    args = parser.parse_args(argv)
    if args.smoke:  # toy sizes as defaults: flags given explicitly still win
        parser.set_defaults(adapters=2, per_adapter=2, max_tokens=4, rounds=1)
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    info = {**machine_info(), "torch_threads": torch.get_num_threads()}
    print("machine:", "; ".join(f"{k} {v}" for k, v in info.items()))
    if args.smoke and args.model is None:
        args.model = toy_model_folder()
        print("a toy model (--smoke): the numbers mean nothing")
    _, tokenizer = load_model(args.model)
    share = not args.no_share_prefixes
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(args.model, args.adapters, args.rank, Path(tmp))
        jobs = make_jobs(tokenizer, adapters, args.per_adapter)
        tokens = len(jobs) * args.max_tokens
        print(f"{len(jobs)} requests over {len(adapters)} rank-{args.rank} adapters (all-linear), "
              f"{args.max_tokens} tokens each, all arriving at t=0")
        mixed, base = Side("lorafit mixed batch"), Side("lorafit base only")
        for i in range(args.rounds):
            progress(base, i, tokens, run_lorafit(args.model, tokenizer, [], [(ids, None) for ids, _ in jobs],
                                                  args.max_tokens, share_prefixes=share))
            progress(mixed, i, tokens, run_lorafit(args.model, tokenizer, adapters, jobs, args.max_tokens,
                                                   share_prefixes=share))
        sides = [mixed, base]
        if not args.skip_peft:
            sides.append(Side("PEFT set_adapter per group"))
            progress(sides[-1], 0, tokens, run_peft(args.model, tokenizer, adapters, jobs, args.max_tokens))
    result = report(sides, tokens)
    if args.json:
        write_json(args.json, {"machine": info, "args": vars(args), **result}, indent=2)


if __name__ == "__main__":
    main()
