"""The evidence for the demo's defaults (issue 13, line 6): train the demo's task with one setting and
score it on a larger held-out set than the demo's 40, so that settings are told apart by more than one
seed's noise. One JSON line per run is appended to --out; the phases' wall times are printed.

    OMP_NUM_THREADS=1 python bench/demo_search.py --lr 3e-3 --seed 1 --n-eval 200 --out /tmp/search.jsonl

Training data, model, quantization and loop are the demo's (`lorafit.demo`); only the knobs given differ.
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    p.add_argument("--out", default="bench/demo_search.jsonl")
    a = p.parse_args()

    t0 = time.perf_counter()
    torch.manual_seed(a.seed)
    records = make_dataset(a.n_train + a.n_eval, seed=a.seed)
    train_records, eval_records = records[:a.n_train], records[a.n_train:]
    work = Path(tempfile.mkdtemp(prefix="demo-search-"))
    train_path = write_jsonl(work / "train.jsonl", train_records)
    val_path = write_jsonl(work / "val.jsonl", eval_records[:40])
    model, tok = load_model(DEFAULT_MODEL, quantize=None if a.quantize == "none" else a.quantize, dtype=torch.float32)
    splits = load_data(tok, DataConfig(path=str(train_path), val_path=str(val_path), max_seq_length=256))
    t_load = time.perf_counter() - t0

    targets = a.targets.split(",") if a.targets else None
    cfg = TrainConfig(output_dir=str(work / "run"), lora=LoraConfig(r=a.rank, alpha=a.alpha or a.rank,
                      use_rslora=a.rslora, target_modules=targets),
                      max_steps=a.steps, batch_size=a.batch_size, learning_rate=a.lr, warmup_ratio=a.warmup,
                      schedule=a.schedule, loraplus_lr_ratio=a.loraplus, seed=a.seed)
    t1 = time.perf_counter()
    history = Trainer(cfg, model, tok, splits.train, splits.val, splits.prompt_format).train()
    t_train = time.perf_counter() - t1

    t2 = time.perf_counter()
    prompts = [render_prompt(tok, r["instruction"], splits.prompt_format, input=r["input"]) for r in eval_records]
    preds = generate(model, tok, prompts, max_new_tokens=16)
    t_eval = time.perf_counter() - t2
    wrong = [(r["input"], r["output"], p) for r, p in zip(eval_records, preds) if not exact_match(p, r["output"])]
    acc = 1 - len(wrong) / len(eval_records)
    row = {k: v for k, v in vars(a).items() if k != "out"} | {
        "exact_match": acc, "n_wrong": len(wrong), "loss_last5": sum(h["loss"] for h in history[-5:]) / 5,
        "load_s": round(t_load, 1), "train_s": round(t_train, 1), "eval_s": round(t_eval, 1),
        "wrong": wrong[:20], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with open(a.out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"exact match {100 * acc:.1f}% of {len(eval_records)}  load {t_load:.0f}s train {t_train:.0f}s "
          f"eval {t_eval:.0f}s")
    for w in wrong[:20]:
        print("  ", w)


if __name__ == "__main__":
    main()
