"""The evidence for the demo's defaults (issue 13, line 6): train the demo's task with one setting and
score it on a larger held-out set than the demo's 40, so that settings are told apart by more than one
seed's noise. One JSON line per run is appended to --out; the phases' wall times are printed.

    OMP_NUM_THREADS=1 python bench/demo_search.py --lr 3e-3 --seed 1 --n-eval 200 --out /tmp/search.jsonl
    python bench/demo_search.py --smoke    # a toy model, 2 steps, 4 held out, row to stdout: checks the script

Training data, model, quantization and loop are the demo's (`lorafit.demo`); only the knobs given differ.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from lorafit.config import LoraConfig
from lorafit.generate import generate, render_prompt
from lorafit.model import DEFAULT_MODEL, load_model
from lorafit.train.data import DataConfig, load_data
from lorafit.train.demo_task import exact_match, make_dataset, write_jsonl
from lorafit.train.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="HF folder or .gguf (default: the bundled %(default)s)")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=None, help="default: the rank (scaling 1)")
    p.add_argument("--rslora", action="store_true")
    p.add_argument("--loraplus", type=float, default=None)
    p.add_argument("--schedule", default="cosine")
    p.add_argument("--warmup", type=float, default=0.1)
    p.add_argument("--targets", default=None, help="comma-separated module names; default: the family's (the demo's)")
    p.add_argument("--quantize", default="nf4", help="nf4 or none")
    p.add_argument("--n-train", type=int, default=600)
    p.add_argument("--n-eval", type=int, default=200)
    p.add_argument("--seed", type=int, default=0, help="data, adapter init and order")
    p.add_argument("--out", default=str(ROOT / "bench" / "demo_search.jsonl"),
                   help="JSONL file the run's row is appended to; - for stdout (default: %(default)s)")
    p.add_argument("--smoke", action="store_true",
                   help="check the script in seconds: a random toy model of SmolLM2's family unless --model is given, "
                        "and unless given, --steps 2 --n-train 16 --n-eval 4 --out -; the numbers mean nothing")
    a = p.parse_args(argv)
    if a.smoke:  # toy sizes as defaults: flags given explicitly still win
        p.set_defaults(model=None, steps=2, n_train=16, n_eval=4, out="-")
        a = p.parse_args(argv)
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.model is None:  # --smoke without --model
        sys.path.insert(0, str(ROOT))
        from bench.common import toy_model_folder

        a.model = toy_model_folder()
    with tempfile.TemporaryDirectory(prefix="demo-search-") as tmp:
        row = search(a, Path(tmp))
    line = json.dumps(row)
    if a.out == "-":
        print(line)
    else:
        with open(a.out, "a") as f:
            f.write(line + "\n")
    print(f"exact match {100 * row['exact_match']:.1f}% of {a.n_eval}  load {row['load_s']:.0f}s "
          f"train {row['train_s']:.0f}s eval {row['eval_s']:.0f}s")
    for w in row["wrong"]:
        print("  ", w)


def train_config(a: argparse.Namespace, work: Path) -> TrainConfig:
    """The demo's TrainConfig with the knobs given (checked by TrainConfig and LoraConfig themselves)."""
    targets = a.targets.split(",") if a.targets else None
    return TrainConfig(output_dir=str(work / "run"), lora=LoraConfig(r=a.rank, alpha=a.alpha or a.rank,
                       use_rslora=a.rslora, target_modules=targets),
                       max_steps=a.steps, batch_size=a.batch_size, learning_rate=a.lr, warmup_ratio=a.warmup,
                       schedule=a.schedule, loraplus_lr_ratio=a.loraplus, seed=a.seed)


def search(a: argparse.Namespace, work: Path) -> dict:
    """Train and score one setting in `work`; the row that goes to --out."""
    t0 = time.perf_counter()
    cfg = train_config(a, work)  # first: a bad knob fails before the model loads
    torch.manual_seed(a.seed)
    records = make_dataset(a.n_train + a.n_eval, seed=a.seed)
    train_records, eval_records = records[:a.n_train], records[a.n_train:]
    train_path = write_jsonl(work / "train.jsonl", train_records)
    val_path = write_jsonl(work / "val.jsonl", eval_records[:40])
    model, tok = load_model(a.model, quantize=None if a.quantize == "none" else a.quantize, dtype=torch.float32)
    splits = load_data(tok, DataConfig(path=str(train_path), val_path=str(val_path), max_seq_length=256))
    t_load = time.perf_counter() - t0

    t1 = time.perf_counter()
    history = Trainer(cfg, model, tok, splits.train, splits.val, splits.prompt_format).train()
    t_train = time.perf_counter() - t1

    t2 = time.perf_counter()
    prompts = [render_prompt(tok, r["instruction"], splits.prompt_format, input=r["input"]) for r in eval_records]
    preds = generate(model, tok, prompts, max_new_tokens=16)
    t_eval = time.perf_counter() - t2
    wrong = [(r["input"], r["output"], p) for r, p in zip(eval_records, preds) if not exact_match(p, r["output"])]
    acc = 1 - len(wrong) / len(eval_records)
    last5 = [h["loss"] for h in history[-5:]]
    return {k: v for k, v in vars(a).items() if k not in ("out", "smoke")} | {
        "exact_match": acc, "n_wrong": len(wrong), "loss_last5": sum(last5) / len(last5),
        "load_s": round(t_load, 1), "train_s": round(t_train, 1), "eval_s": round(t_eval, 1),
        "wrong": wrong[:20], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


if __name__ == "__main__":
    main()
