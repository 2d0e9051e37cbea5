"""Packing before and after per-sample isolation (issue 25), and the demo, side by side in one run.

Each side runs in its own interpreter over a copy of the code: "before" is a git revision (default: main),
extracted to a temporary folder and put first on PYTHONPATH; "after" is this tree. Each side:

    packed     the demo's task and model (SmolLM2-135M, NF4 base, LoRA r=16 with LoRA+ 16x, lr 1e-3) trained
               one epoch on packed rows (data.packing: true, rows of --row-length tokens: a demo sample is
               about 70, so three or four to a row of 256; --batch-size rows per step), then
               scored: the validation loss as the run itself computes it on packed rows, the validation
               loss of the same held-out samples unpacked (each alone: the model's true loss), and exact
               match of greedy answers to the 100 held-out prompts
    demo       `lorafit demo` with its defaults (--demo): held-out exact match and validation loss

    python bench/packing.py [--before main] [--demo 1] [--packed 1] [--train-samples 600] [--val-samples 100] [--row-length 256]
                            [--batch-size 4]

Before the fix a packed sample attended to the samples before it in its row: the packed validation loss
the run reports is then not the model's loss on a sample, and training learned from that context.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench.common` importable, after PYTHONPATH (the before
    sys.path.append(str(Path(__file__).resolve().parents[1]))  # side's lorafit must come first)

from bench.common import machine_info, run_side_in_child

REPO = Path(__file__).resolve().parents[1]


def packed_run(row_length: int, batch_size: int, samples: tuple[int, int], out: Path) -> dict:
    """Train the demo's task on packed rows; the scores of the module docstring."""
    import torch

    from lorafit.config import LoraConfig
    from lorafit.generate import generate, render_prompt
    from lorafit.model import load_model
    from lorafit.train.data import DataConfig, load_data
    from lorafit.train.demo_task import accuracy, make_splits, write_jsonl
    from lorafit.train.trainer import TrainConfig, Trainer, evaluate

    torch.manual_seed(0)
    train_records, eval_records = make_splits(samples[0], samples[1], seed=0)
    train_path = write_jsonl(out / "train.jsonl", train_records)
    val_path = write_jsonl(out / "val.jsonl", eval_records)
    model, tokenizer = load_model(None, quantize="nf4")
    packed = load_data(tokenizer, DataConfig(path=str(train_path), val_path=str(val_path), max_seq_length=row_length,
                                             packing=True))
    alone = load_data(tokenizer, DataConfig(path=str(train_path), val_path=str(val_path), max_seq_length=row_length))
    config = TrainConfig(output_dir=str(out / "run"), lora=LoraConfig(r=16, alpha=16), epochs=1, batch_size=batch_size,
                         learning_rate=1e-3, loraplus_lr_ratio=16.0, warmup_ratio=0.1, eval_batch_size=100, seed=0)
    start = time.perf_counter()
    history = Trainer(config, model, tokenizer, packed.train, packed.val, packed.prompt_format).train()
    train_s = time.perf_counter() - start
    pad = tokenizer.pad_token_id
    prompts = [render_prompt(tokenizer, r["instruction"], packed.prompt_format, input=r["input"]) for r in eval_records]
    answers = generate(model, tokenizer, prompts, max_new_tokens=12, batch_size=100)
    return {"rows": len(packed.train), "samples": len(alone.train), "steps": len(history),
            "samples_per_row": sum(s.position_ids.count(0) for s in packed.train) / len(packed.train),
            "val_loss_packed_rows": evaluate(model, packed.val, pad, 100)["val_loss"],
            "val_loss_each_alone": evaluate(model, alone.val, pad, 100)["val_loss"],
            "exact_match": accuracy(answers, [r["output"] for r in eval_records]),
            "train_s": train_s, "train_tokens_per_s": sum(h["tokens_per_s"] for h in history) / len(history)}


def demo_run(out: Path) -> dict:
    from lorafit.demo import DemoConfig, run_demo

    result = run_demo(DemoConfig(output_dir=str(out / "demo")))
    return {k: result[k] for k in ("acc_before", "acc_after", "val_before", "val_after", "wall_s")}


def child(args: argparse.Namespace) -> None:
    import lorafit

    out = Path(tempfile.mkdtemp(prefix=f"lorafit-packing-{args.side}-"))
    result = {"lorafit": lorafit.__file__, "load_start": os.getloadavg()[0]}
    if args.packed:
        result["packed"] = packed_run(args.row_length, args.batch_size, (args.train_samples, args.val_samples), out)
    if args.demo:
        result["demo"] = demo_run(out)
    result["load_end"] = os.getloadavg()[0]
    Path(args.child_out).write_text(json.dumps(result))


def checkout(ref: str, into: Path) -> Path:
    """The package of revision `ref` (git archive), for the before side's PYTHONPATH."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "lorafit"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default="main", help="git revision of the before side")
    p.add_argument("--row-length", type=int, default=256, help="tokens per packed row (data.max_seq_length)")
    p.add_argument("--batch-size", type=int, default=4, help="packed rows per step")
    p.add_argument("--demo", type=int, default=0, help="1: also run lorafit demo on each side")
    p.add_argument("--packed", type=int, default=1, help="0: skip the packed training run (--demo 1 alone)")
    p.add_argument("--train-samples", type=int, default=600, help="demo-task training samples of the packed run")
    p.add_argument("--val-samples", type=int, default=100, help="held-out demo-task samples of the packed run")
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        return child(args)
    info = machine_info()
    print(f"machine: {info}; load {os.getloadavg()}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="lorafit-before-") as tmp:
        before = checkout(args.before, Path(tmp))
        for side, tree in (("before", before), ("after", REPO)):
            env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
            results[side] = run_side_in_child(__file__, side, {"row_length": args.row_length, "batch_size": args.batch_size,
                                                               "demo": args.demo, "packed": args.packed,
                                                               "train_samples": args.train_samples,
                                                               "val_samples": args.val_samples}, env)
            if not results[side]["lorafit"].startswith(str(tree)):
                raise SystemExit(f"the {side} side imported {results[side]['lorafit']}, not its tree {tree}")
    if args.packed:
        print(f"\n{'side':<7} {'code':<28} {'rows':>5} {'per row':>7} {'steps':>5} {'val loss (packed rows)':>23} "
              f"{'val loss (each alone)':>22} {'exact match':>11} {'train s':>8} {'other load':>10}")
        for side, r in results.items():
            k = r["packed"]
            code = args.before if side == "before" else "this tree"
            print(f"{side:<7} {code:<28} {k['rows']:>5} {k['samples_per_row']:>7.2f} {k['steps']:>5} "
                  f"{k['val_loss_packed_rows']:>23.4f} {k['val_loss_each_alone']:>22.4f} "
                  f"{100 * k['exact_match']:>10.0f}% {k['train_s']:>8.0f} {100 * r['other_load']:>9.0f}%")
    if args.demo:
        print(f"\n{'side':<7} {'demo exact match':>17} {'demo validation loss':>21} {'wall s':>7} {'other load':>10}")
        for side, r in results.items():
            d = r["demo"]
            print(f"{side:<7} {100 * d['acc_before']:>6.0f}% -> {100 * d['acc_after']:.0f}%"
                  f" {d['val_before']:>10.3f} -> {d['val_after']:.3f} {d['wall_s']:>7.0f} {100 * r['other_load']:>9.0f}%")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
