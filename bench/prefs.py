"""DPO with `lorafit train` vs TRL 1.16's DPOTrainer + PEFT (+ bitsandbytes for NF4), on CPU, in one run.

What is measured, per side: train tokens/s (the tokens of the timed optimizer steps, chosen and
rejected rows with their prompts and no padding, as TRL counts `num_tokens`, divided by their wall time;
the first step is untimed warmup, model and data loading are excluded), the wall time of the train
loop, the process's peak RSS (VmHWM, the whole run included), the loss of every step, then the
ratios lorafit / TRL.

The lorafit side is what `lorafit train config.yaml` executes (parse_run_config + run, the trainer class
swapped for a subclass that records a timestamp after each optimizer step). The TRL side is what a TRL
user writes: `AutoModelForCausalLM.from_pretrained` (with --quant nf4: `BitsAndBytesConfig` 4-bit NF4,
double quant, fp32 compute), `PeftModel.from_pretrained(..., is_trainable=True)` and `DPOTrainer`.

Why it is fair:
- each side runs in its own fresh subprocess, one after the other, on the same machine in the same run;
- the same model folder, the same preference pairs (the demo's date task: the ISO date chosen, a wrong
  date rejected, as chat messages), the same batches in the same order (TRL is given the pairs in the
  order lorafit's seeded `EpochOrder` draws them, through a sequential sampler); each side counts the
  tokens it consumed per step and the parent checks that the two lists agree;
- both start from the same PEFT adapter file (random A, B = 0), so both references are that adapter (TRL
  copies it to a "ref" adapter, lorafit holds it as its reference slot) and the losses are comparable
  step by step: the first is ln 2 on both sides;
- same LoRA (r, alpha = r, dropout 0, all linear layers), AdamW, constant lr, clipping 1.0, fp32 compute,
  no gradient checkpointing, beta 0.1, sigmoid loss. TRL casts a quantized model's adapter to bf16 by
  default; it is cast back to fp32 here so both sides train the same fp32 adapter
  (--trl-bf16-adapter keeps TRL's default).

    HF_HUB_OFFLINE=1 python bench/prefs.py [--quant nf4 --max-steps 8 --batch-size 8 --json out.json]
    python bench/prefs.py --smoke      # a toy model of the same family, 2 steps of 2 pairs: checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

SIDES = ("lorafit", "trl")
CHILD_FLAGS = ("model", "data", "adapter", "quant", "max_steps", "batch_size", "lr", "max_seq_length", "threads",
               "seed", "trl_bf16_adapter")  # what each side's process is told (`--rank` shaped the start adapter)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- data and the start adapter (parent) ----------------------------------------------------------------
def wrong_date(iso: str, rng: random.Random) -> str:
    """A plausible wrong answer: one of day / month / year changed."""
    import datetime as dt

    d = dt.date.fromisoformat(iso)
    kind = rng.choice(["day", "month", "year"])
    if kind == "day":
        return d.replace(day=1 + (d.day + rng.randint(1, 27) - 1) % 28).isoformat()
    if kind == "month":
        return d.replace(month=1 + (d.month + rng.randint(1, 11) - 1) % 12, day=min(d.day, 28)).isoformat()
    return d.replace(year=d.year + rng.choice([-10, -1, 1, 10]), day=min(d.day, 28)).isoformat()


def write_pairs(path: str, n: int, seed: int) -> str:
    from lorafit.prompt import alpaca_user_text
    from lorafit.train.demo_task import make_dataset

    rng = random.Random(seed)
    with open(path, "w") as f:
        for r in make_dataset(n, seed):
            prompt = [{"role": "user", "content": alpaca_user_text(r["instruction"], r["input"])}]
            f.write(json.dumps({"prompt": prompt, "chosen": [{"role": "assistant", "content": r["output"]}],
                                "rejected": [{"role": "assistant", "content": wrong_date(r["output"], rng)}]}) + "\n")
    return path


def write_start_adapter(path: str, model: str | None, rank: int, seed: int) -> str:
    """A PEFT adapter of the base's shape: kaiming A (PEFT's init), B = 0."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorafit.model import resolve_model

    folder = resolve_model(model)
    torch.manual_seed(seed)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    base = base.to_empty(device="cpu")
    peft = get_peft_model(base, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules="all-linear"))
    peft.save_pretrained(path)  # only the adapter is written: the base's (uninitialized) weights never are
    return path


# -- child: one side --------------------------------------------------------------------------------------
def order(args: argparse.Namespace, n: int) -> list[list[int]]:
    from lorafit.train.trainer import EpochOrder

    epoch = EpochOrder(n, args.batch_size, args.seed)
    return [epoch.indices(i) for i in range(args.max_steps)]


def run_lorafit(args: argparse.Namespace, output_dir: str) -> dict:
    import lorafit.train.trainer as trainer_module
    from bench.common import rss_mib
    from lorafit.train.run import parse_run_config, run

    marks: dict = {"steps": [], "tokens": []}
    base = trainer_module.Trainer

    class TimedTrainer(base):
        def train(self, *args, **kwargs):
            marks["rss_before_loop"] = rss_mib()
            marks["start"] = time.perf_counter()
            return super().train(*args, **kwargs)

        def accumulate(self, micro):
            marks["tokens"].append(sum(int(b["attention_mask"].sum()) for b in micro))
            return super().accumulate(micro)

        def _optimizer_step(self):
            lr = super()._optimizer_step()
            marks["steps"].append(time.perf_counter())
            return lr

    from lorafit.model import DEFAULT_MODEL

    raw = {"model": args.model or DEFAULT_MODEL, "quantize": None if args.quant == "none" else args.quant, "dtype": "float32",
           "device": "cpu", "data": {"path": args.data, "max_seq_length": args.max_seq_length},
           "method": "dpo", "adapter": args.adapter, "output_dir": output_dir, "max_steps": args.max_steps,
           "batch_size": args.batch_size, "learning_rate": args.lr, "warmup_ratio": 0.0, "schedule": "constant",
           "optimizer": "adamw", "max_grad_norm": 1.0, "seed": args.seed, "gradient_checkpointing": False}
    config = parse_run_config(raw, "bench")
    trainer_module.Trainer = TimedTrainer  # run() imports the class from this module when called
    try:
        history = run(config)
    finally:
        trainer_module.Trainer = base
    marks["losses"] = [h["loss"] for h in history]
    marks["accuracies"] = [h["rewards/accuracies"] for h in history]
    return marks


def run_trl(args: argparse.Namespace, output_dir: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from bench.common import rss_mib
    from lorafit.model import resolve_model

    folder = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if args.quant == "nf4":
        from transformers import BitsAndBytesConfig

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, dtype=torch.float32,
                                                     device_map="cpu")
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, args.adapter, is_trainable=True)
    with open(args.data) as f:
        records = [json.loads(line) for line in f]
    ordered = [records[j] for step in order(args, len(records)) for j in step]
    marks: dict = {"steps": [], "micro_tokens": []}

    class InOrder(DPOTrainer):
        def _get_train_sampler(self, *a, **kw):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            marks["rss_before_loop"] = rss_mib()

        def on_step_end(self, *a, **kw):
            marks["steps"].append(time.perf_counter())

    targs = DPOConfig(
        output_dir=output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", seed=args.seed, data_seed=args.seed, use_cpu=True, bf16=False,
        gradient_checkpointing=False, save_strategy="no", eval_strategy="no", report_to=[], logging_steps=1,
        dataloader_num_workers=0, disable_tqdm=True, max_length=args.max_seq_length, beta=0.1)
    trainer = InOrder(model=model, args=targs, train_dataset=Dataset.from_list(ordered), processing_class=tokenizer,
                      callbacks=[Timer()])
    if not args.trl_bf16_adapter:  # TRL casts a quantized model's adapter to bf16; train fp32 as lorafit does
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    collate = trainer.data_collator

    def counting(examples):
        batch = collate(examples)
        marks["micro_tokens"].append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting
    marks["start"] = time.perf_counter()
    trainer.train()
    marks["tokens"] = marks["micro_tokens"]
    history = [h for h in trainer.state.log_history if "loss" in h]
    marks["losses"] = [h["loss"] for h in history]
    marks["accuracies"] = [h["rewards/accuracies"] for h in history]
    return marks


def run_side(args: argparse.Namespace) -> dict:
    import torch

    from bench.common import peak_rss_mib

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as out:
        marks = (run_lorafit if args.side == "lorafit" else run_trl)(args, out)
    steps, tokens = marks["steps"], marks["tokens"][:len(marks["steps"])]
    if len(steps) < 2:
        raise SystemExit("bench/prefs.py: needs --max-steps of at least 2 (the first step is warmup)")
    timed_s = steps[-1] - steps[0]
    return {"side": args.side, "steps": len(steps), "threads": torch.get_num_threads(), "tokens_per_step": tokens,
            "tokens_per_s": sum(tokens[1:]) / timed_s, "timed_s": timed_s, "loop_s": steps[-1] - marks["start"],
            "step_s_all": [b - a for a, b in zip([marks["start"], *steps[:-1]], steps, strict=True)],
            "losses": marks["losses"], "accuracies": marks["accuracies"],
            "rss_before_loop_mib": marks["rss_before_loop"], "peak_rss_mib": peak_rss_mib()}


# -- parent ------------------------------------------------------------------------------------------------
def launch(side: str, args: argparse.Namespace) -> dict:
    from bench.common import run_side_in_child

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run_side_in_child(__file__, side, {f: getattr(args, f) for f in CHILD_FLAGS}, env)


def report(results: dict[str, dict], machine: dict, args: argparse.Namespace) -> str:
    from importlib.metadata import version

    lf, tr = results["lorafit"], results["trl"]
    rows = ["| side | train tokens/s | train loop (s) | peak RSS (MiB) |", "|---|---:|---:|---:|"]
    for side in SIDES:
        r = results[side]
        rows.append(f"| {side} | {r['tokens_per_s']:.1f} | {r['loop_s']:.1f} | {r['peak_rss_mib']:.0f} |")
    rows.append(f"| lorafit / TRL | {lf['tokens_per_s'] / tr['tokens_per_s']:.3f} | {lf['loop_s'] / tr['loop_s']:.3f} | "
                f"{lf['peak_rss_mib'] / tr['peak_rss_mib']:.3f} |")
    stack = "DPOTrainer + PEFT" + (" + bitsandbytes" if args.quant == "nf4" else "")
    same = lf["tokens_per_step"] == tr["tokens_per_step"]
    losses = "\n".join(f"| {i + 1} | {a:.5f} | {b:.5f} | {ra:.2f} | {rb:.2f} |" for i, (a, b, ra, rb) in enumerate(
        zip(lf["losses"], tr["losses"], lf["accuracies"], tr["accuracies"])))
    load = ", ".join(f"{s} {results[s]['other_load']:.0%}" for s in SIDES)
    busy = any(results[s]["other_load"] > 0.05 for s in SIDES)
    model = "a toy model (--smoke: the numbers mean nothing)" if args.smoke else args.model
    steps = "; ".join(f"{s}: " + ", ".join(f"{t:.1f}" for t in results[s]["step_s_all"]) for s in SIDES)
    return "\n".join([
        f"Machine: {machine['cpu']}, {machine['cores']} cores; python {machine['python']}, torch {machine['torch']}, "
        f"transformers {machine['transformers']}, peft {machine['peft']}, bitsandbytes {version('bitsandbytes')}, "
        f"trl {version('trl')}; {machine['date']}; load average (1 min) {machine['load_start']:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end",
        f"Settings: model {model or 'bundled SmolLM2-135M-Instruct'}, quant={args.quant} (TRL side: {stack}), "
        f"fp32 compute on CPU, {args.max_steps} steps of {args.batch_size} pairs (tokens/s over steps 2..N), "
        f"max_length {args.max_seq_length}, LoRA r={args.rank} all-linear from the same start adapter, DPO sigmoid "
        f"beta 0.1, AdamW lr {args.lr} constant, clip 1.0, {args.threads} threads, seed {args.seed}", "", *rows, "",
        "| step | loss lorafit | loss TRL | reward acc. lorafit | reward acc. TRL |", "|---:|---:|---:|---:|---:|",
        losses, "",
        f"Tokens per step: {'identical on both sides' if same else 'MISMATCH'} ({lf['tokens_per_step']}"
        + ("" if same else f" vs {tr['tokens_per_step']}") + ")",
        f"Step times (s): {steps}",
        f"Other load on the machine during each side (share of all cores): {load}"
        + ("  WARNING: busy machine, compare the two sides of this run only" if busy else "")])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--data", default=None, help="preference pairs JSONL (default: generated from the date task)")
    p.add_argument("--adapter", default=None, help="start adapter (default: a new PEFT adapter, B = 0)")
    p.add_argument("--quant", choices=("none", "nf4"), default="nf4")
    p.add_argument("--max-steps", type=int, default=8, help="optimizer steps; the first is untimed warmup")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trl-bf16-adapter", action="store_true", help="keep TRL's bf16 cast of a QLoRA adapter")
    p.add_argument("--json", metavar="PATH", help="also write all results (both sides, machine) here")
    p.add_argument("--smoke", action="store_true",
                   help="check the script in seconds: a random toy model of SmolLM2's family (unless --model), "
                        "and unless given, --max-steps 2 --batch-size 2 --max-seq-length 64 --rank 4; the numbers "
                        "mean nothing")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:  # toy sizes as defaults: flags given explicitly still win
        p.set_defaults(max_steps=2, batch_size=2, max_seq_length=64, rank=4)
        args = p.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from bench.common import machine_info, write_json

    if args.side:
        write_json(args.child_out, run_side(args))
        return
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke and args.model is None:
            from bench.common import toy_model_folder

            args.model = toy_model_folder()
        if args.data is None:
            args.data = write_pairs(os.path.join(tmp, "pairs.jsonl"), args.max_steps * args.batch_size, args.seed)
        if args.adapter is None:
            args.adapter = write_start_adapter(os.path.join(tmp, "start"), args.model, args.rank, args.seed)
        machine = {**machine_info(), "load_start": load_start}
        results = {side: launch(side, args) for side in SIDES}
    print(report(results, machine, args))
    if args.json:
        write_json(args.json, {"machine": machine, "args": vars(args), "results": results}, indent=2)


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, ROOT)
    main()
