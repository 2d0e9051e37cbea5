"""LoftQ vs plain QLoRA on the bundled SmolLM2: initial weight error and the first steps on the date task.

Both runs: the same generated date-task data (lorafit.train.demo_task, the demo's split), the same
TrainConfig (rank, alpha = rank, lr, batch, warmup 10%, cosine, seed 0) on every attention and MLP
projection, fp32 compute on the CPU.
- plain QLoRA: `load_model(quantize="nf4")`, then `apply_lora` (A kaiming, B = 0: the model at step 0
  is deq(NF4(W))).
- LoftQ: `load_model()` in fp32, then `apply_lora(init="loftq")`: every adapted projection becomes
  NF4 codes chosen together with A, B (lorafit.lora.loftq); the output head stays fp32 in both.

Printed: the mean/min/max per-layer relative weight error ||W - (deq(Q) + s·BA)||_F / ||W||_F of each,
the validation loss before training, the loss of each training step, and the mean of the first and
last five steps.

    HF_HUB_OFFLINE=1 python bench/loftq.py [--steps 40 --rank 16 --loftq-iter 1 --batch-size 8 --out DIR
                                            --sides plain,loftq --model M --json out.json]
    python bench/loftq.py --smoke    # a toy model of the same family, 2 steps: checks the script in seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: make `bench.common` importable

import lorafit as lf  # noqa: E402
from bench.common import machine_info, toy_model_folder, write_json  # noqa: E402
from lorafit.lora.inject import lora_layers  # noqa: E402
from lorafit.model import load_model, resolve_model  # noqa: E402
from lorafit.train.data import DataConfig, load_data  # noqa: E402
from lorafit.train.demo_task import make_splits, write_jsonl  # noqa: E402
from lorafit.train.trainer import TrainConfig, Trainer, evaluate  # noqa: E402

SIDES = ("plain", "loftq")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_config(side: str, args) -> lf.LoraConfig:
    return lf.LoraConfig(r=args.rank, alpha=args.rank, target_modules=TARGETS,
                         **({"init": "loftq", "loftq_iter": args.loftq_iter} if side == "loftq" else {}))


def run(side: str, args, data_dir: Path, weights: dict[str, torch.Tensor]) -> dict:
    t0 = time.perf_counter()
    lora = lora_config(side, args)
    torch.manual_seed(0)
    model, tokenizer = load_model(resolve_model(args.model), quantize=None if side == "loftq" else "nf4")
    lf.apply_lora(model, lora)
    init_s = time.perf_counter() - t0
    errors = []
    for path, layer in lora_layers(model):
        W = weights[path]
        approx = layer.base_layer.dequantize(torch.float32) + layer.delta_weight("default")
        errors.append(float(torch.linalg.matrix_norm(W - approx) / torch.linalg.matrix_norm(W)))
    splits = load_data(tokenizer, DataConfig(path=str(data_dir / "train.jsonl"), val_path=str(data_dir / "val.jsonl"),
                                             max_seq_length=256))
    val_before = evaluate(model, splits.val, tokenizer.pad_token_id)["val_loss"]
    config = TrainConfig(output_dir=str(data_dir / side), lora=lora, max_steps=args.steps, batch_size=args.batch_size,
                         learning_rate=args.lr, warmup_ratio=0.1, seed=0, logging_steps=args.steps)
    history = Trainer(config, model, tokenizer, splits.train).train(overwrite=True)
    losses = [h["loss"] for h in history if "loss" in h]
    out = {"side": side, "layers": len(errors), "weight_error_mean": sum(errors) / len(errors),
           "weight_error_min": min(errors), "weight_error_max": max(errors), "val_loss_before": val_before,
           "losses": losses, "first5": mean(losses[:5]), "last5": mean(losses[-5:]), "init_s": init_s,
           "total_s": time.perf_counter() - t0}
    print(json.dumps({k: v for k, v in out.items() if k != "losses"}), file=sys.stderr, flush=True)
    return out


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF folder or .gguf (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--loftq-iter", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sides", default="plain,loftq", help="which runs, in order (one per process is fine)")
    parser.add_argument("--out", default=None, help="keep data and each side's metrics.jsonl here (default: a temp dir)")
    parser.add_argument("--json", help="also write every side's numbers (losses included) and the machine here")
    parser.add_argument("--smoke", action="store_true",
                        help="check the script in seconds: a random toy model of SmolLM2's family unless --model is "
                             "given, and unless given, --steps 2; the numbers mean nothing")
    args = parser.parse_args(argv)
    if args.smoke:  # toy sizes as defaults: flags given explicitly still win
        parser.set_defaults(steps=2)
        args = parser.parse_args(argv)
    if unknown := [side for side in args.sides.split(",") if side not in SIDES]:
        parser.error(f"--sides: unknown {', '.join(unknown)}; use {' and/or '.join(SIDES)}, comma-separated")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    machine = machine_info()
    print(json.dumps(machine), file=sys.stderr)
    if args.smoke and args.model is None:
        args.model = toy_model_folder()
        print("a toy model (--smoke): the numbers mean nothing", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        fp, _ = load_model(resolve_model(args.model))
        weights = {f"{n}": m.weight.detach().clone() for n, m in fp.named_modules() if isinstance(m, torch.nn.Linear)}
        del fp
        data_dir = Path(args.out or tmp)
        data_dir.mkdir(parents=True, exist_ok=True)
        train, val = make_splits(600, 40, seed=0)
        write_jsonl(data_dir / "train.jsonl", train)
        write_jsonl(data_dir / "val.jsonl", val)
        results = [run(side, args, data_dir, weights) for side in args.sides.split(",")]
    if args.json:
        write_json(args.json, {"machine": machine, "args": vars(args), "results": results}, indent=2)
    if len(results) != 2:
        print(json.dumps(results[0]))
        return
    print(f"\n{'step':>4} | {'plain QLoRA':>11} | {'LoftQ':>8}")
    for i, (a, b) in enumerate(zip(results[0]["losses"], results[1]["losses"]), 1):
        print(f"{i:>4} | {a:>11.4f} | {b:>8.4f}")
    for r in results:
        print(f"{r['side']:>6}: weight error mean {r['weight_error_mean']:.4f} (min {r['weight_error_min']:.4f}, max "
              f"{r['weight_error_max']:.4f}) over {r['layers']} layers; val loss before {r['val_loss_before']:.4f}; "
              f"loss first 5 {r['first5']:.4f}, last 5 {r['last5']:.4f}; init {r['init_s']:.0f} s, all {r['total_s']:.0f} s")


if __name__ == "__main__":
    main()
