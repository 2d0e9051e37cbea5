"""A full `lorafit train` run vs the same run through transformers' Trainer + PEFT, on CPU.

What is measured, per side: train tokens/s (non-pad tokens of the timed optimizer steps divided by
their wall time; the first step is untimed warmup, model and data loading are excluded), the wall
time of the whole train loop (from `train()` to the end of the last optimizer step: the final
adapter save is not in it), and the process's peak RSS (VmHWM, the whole run included), then the
ratios lorafit / HF.

The lorafit side is what `lorafit train config.yaml` executes: the same mapping a YAML file would
give goes through `parse_run_config` and `lorafit.train.run.run`; only the trainer class is
swapped for a subclass that records a timestamp after each optimizer step.

The HF side is what a transformers user writes: `AutoModelForCausalLM.from_pretrained`, PEFT's
`get_peft_model` (with --quant nf4: `BitsAndBytesConfig` 4-bit NF4, double quant, fp32 compute, and
`prepare_model_for_kbit_training` without gradient checkpointing, as lorafit runs without it), and
`transformers.Trainer` with AdamW (torch), the same lr, cosine schedule, warmup steps, grad clipping,
batch size, gradient accumulation, max_steps and seed; no eval, no checkpoints, no logging backends.

Why it is fair:
- each side runs in its own fresh subprocess (this script with --side), one after the other;
- same model folder, same data file, same tokenization: both sides call lorafit.train.data.load_data
  with the same DataConfig, and the HF side is fed the very micro-batches lorafit's trainer builds
  (its own shuffling, `lorafit.train.order.EpochOrder`, padded by lorafit's `collate`), one prebuilt batch per
  dataset item, in order. Each side counts the non-pad tokens it actually consumed per step and the
  parent checks that the two lists agree;
- both models start from the same weights with B = 0, so the first-step losses must agree; the
  parent prints both. (Later losses differ a little: the random A matrices differ.)
- warmup: lorafit uses int(warmup_ratio * steps) steps; HF would round up, so it is given that
  same number as warmup_steps (with the default 10 steps that is 0 on both sides).

    HF_HUB_OFFLINE=1 python bench/train.py [--max-steps 10 --quant nf4 --json out.json]
    python bench/train.py --smoke      # a toy model of the same family, 2 steps of 64 tokens: checks the script
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

SIDES = ("lorafit", "hf")
CHILD_FLAGS = ("model", "data", "quant", "max_steps", "batch_size", "grad_accum", "lr", "warmup_ratio", "rank",
               "max_seq_length", "threads", "seed")  # what the parent passes on to each side
DEFAULT_DATA = "../shared/data/alpaca_seed_tasks.alpaca.jsonl"  # relative to the repository root
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- child: one side --------------------------------------------------------------------------------
def data_config(args: argparse.Namespace):
    from lorafit.train.data import DataConfig

    return DataConfig(path=args.data, max_seq_length=args.max_seq_length, seed=args.seed)


def train_config_raw(args: argparse.Namespace, output_dir: str) -> dict:
    """The mapping a YAML config file for `lorafit train` would hold (no `model:` line: the bundled default)."""
    return {
        **({"model": args.model} if args.model else {}), "quantize": None if args.quant == "none" else args.quant, "dtype": "float32",
        "device": "cpu",  # a CPU benchmark: the HF side runs on the CPU too
        "data": {"path": args.data, "max_seq_length": args.max_seq_length, "seed": args.seed},
        "lora": {"r": args.rank, "alpha": args.rank, "dropout": 0.0, "target_modules": "all-linear"},
        "output_dir": output_dir, "max_steps": args.max_steps, "batch_size": args.batch_size,
        "grad_accum": args.grad_accum, "learning_rate": args.lr, "warmup_ratio": args.warmup_ratio,
        "schedule": "cosine", "optimizer": "adamw", "max_grad_norm": 1.0, "seed": args.seed,
    }


def run_lorafit(args: argparse.Namespace, output_dir: str) -> dict:
    import lorafit.train.trainer as trainer_module
    from bench.common import rss_mib
    from lorafit.train.data import IGNORE
    from lorafit.train.run import parse_run_config, run

    marks: dict = {"steps": [], "tokens": []}
    base = trainer_module.Trainer

    class TimedTrainer(base):
        def train(self, resume: bool = False, overwrite: bool = False):
            marks["rss_before_loop"] = rss_mib()
            marks["start"] = time.perf_counter()
            return super().train(resume, overwrite)

        def accumulate(self, micro):
            marks["tokens"].append(sum(int(b["attention_mask"].sum()) for b in micro))
            marks.setdefault("targets", []).append(sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro))
            return super().accumulate(micro)

        def _optimizer_step(self):
            lr = super()._optimizer_step()
            marks["steps"].append(time.perf_counter())
            return lr

    config = parse_run_config(train_config_raw(args, output_dir), "bench")
    trainer_module.Trainer = TimedTrainer  # run() imports the class from this module when called
    try:
        history = run(config)
    finally:
        trainer_module.Trainer = base
    marks["losses"] = [h["loss"] for h in history]
    return marks


def prebuilt_batches(args: argparse.Namespace, samples: list, pad_id: int) -> list[dict]:
    """The micro-batches lorafit's trainer would draw (its `EpochOrder`, its `collate`), in order."""
    from lorafit.train.data import collate
    from lorafit.train.order import EpochOrder

    order = EpochOrder(len(samples), args.batch_size, args.seed)
    return [collate([samples[j] for j in order.indices(i)], pad_id) for i in range(args.max_steps * args.grad_accum)]


def run_hf(args: argparse.Namespace, output_dir: str) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from bench.common import rss_mib
    from lorafit.model import resolve_model
    from lorafit.train.data import load_data, pad_id_for

    folder = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if args.quant == "nf4":
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, dtype=torch.float32,
                                                     device_map="cpu")
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0,
                                             target_modules="all-linear", bias="none", task_type="CAUSAL_LM"))
    samples = load_data(tokenizer, data_config(args)).train
    batches = prebuilt_batches(args, samples, pad_id_for(tokenizer))
    del samples

    marks: dict = {"steps": [], "micro_tokens": []}

    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return len(batches)

        def __getitem__(self, i):
            return batches[i]

    def collator(items: list[dict]) -> dict:  # one prebuilt, already padded batch per item
        (batch,) = items
        marks["micro_tokens"].append(int(batch["attention_mask"].sum()))
        return {k: batch[k] for k in ("input_ids", "labels", "attention_mask")}

    class InOrder(Trainer):
        def _get_train_sampler(self, *a, **kw):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            marks["rss_before_loop"] = rss_mib()

        def on_step_end(self, *a, **kw):
            marks["steps"].append(time.perf_counter())

    targs = TrainingArguments(
        output_dir=output_dir, max_steps=args.max_steps, per_device_train_batch_size=1,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=int(args.warmup_ratio * args.max_steps), weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", seed=args.seed, data_seed=args.seed, use_cpu=True, save_strategy="no",
        eval_strategy="no", report_to=[], logging_steps=1, remove_unused_columns=False,
        dataloader_num_workers=0, label_names=["labels"], disable_tqdm=True)
    trainer = InOrder(model=model, args=targs, train_dataset=Batches(), data_collator=collator,
                      callbacks=[Timer()])
    marks["start"] = time.perf_counter()
    trainer.train()
    ga = args.grad_accum
    marks["tokens"] = [sum(marks["micro_tokens"][i:i + ga]) for i in range(0, len(marks["micro_tokens"]), ga)]
    marks["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return marks


def run_side(args: argparse.Namespace) -> dict:
    import torch

    from bench.common import peak_rss_mib

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as out:
        marks = (run_lorafit if args.side == "lorafit" else run_hf)(args, out)
    steps, tokens = marks["steps"], marks["tokens"][:len(marks["steps"])]
    if len(steps) < 2:
        raise SystemExit("bench/train.py: needs --max-steps of at least 2 (the first step is warmup)")
    timed_s = steps[-1] - steps[0]  # steps 2..N
    return {
        "side": args.side,
        "steps": len(steps),
        "threads": torch.get_num_threads(),
        "tokens_per_step": tokens,
        "tokens_per_s": sum(tokens[1:]) / timed_s,
        "timed_s": timed_s,
        "first_step_s": steps[0] - marks["start"],
        "loop_s": steps[-1] - marks["start"],
        "step_s_all": [b - a for a, b in zip([marks["start"], *steps[:-1]], steps, strict=True)],
        "losses": marks["losses"],
        "rss_before_loop_mib": marks["rss_before_loop"],
        "peak_rss_mib": peak_rss_mib(),
    }


# -- parent --------------------------------------------------------------------------------------------
def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def launch(side: str, args: argparse.Namespace) -> dict:
    from bench.common import run_side_in_child

    return run_side_in_child(__file__, side, {flag: getattr(args, flag) for flag in CHILD_FLAGS}, child_env())


def checks(results: dict[str, dict]) -> list[str]:
    lf, hf = results["lorafit"], results["hf"]
    same = lf["tokens_per_step"] == hf["tokens_per_step"]
    lines = [f"non-pad tokens per step: {'identical on both sides' if same else 'MISMATCH'} "
             f"({lf['tokens_per_step']}{'' if same else ' vs ' + str(hf['tokens_per_step'])})"]
    if lf["losses"] and hf["losses"]:
        a, b = lf["losses"][0], hf["losses"][0]
        ok = abs(a - b) <= 1e-3 * max(1.0, abs(b))
        lines.append(f"loss, first step (same weights, B = 0): lorafit {a:.5f}  hf {b:.5f}  "
                     f"{'ok' if ok else 'MISMATCH'}; last step: lorafit {lf['losses'][-1]:.5f}  "
                     f"hf {hf['losses'][-1]:.5f}")
    return lines


def report(results: dict[str, dict], machine: dict, args: argparse.Namespace) -> str:
    rows = ["| side | train tokens/s | train loop (s) | peak RSS (MiB) |", "|---|---:|---:|---:|"]
    for side in SIDES:
        r = results[side]
        rows.append(f"| {side} | {r['tokens_per_s']:.0f} | {r['loop_s']:.1f} | {r['peak_rss_mib']:.0f} |")
    lf, hf = results["lorafit"], results["hf"]
    rows.append(f"| lorafit / HF | {lf['tokens_per_s'] / hf['tokens_per_s']:.3f} | "
                f"{lf['loop_s'] / hf['loop_s']:.3f} | {lf['peak_rss_mib'] / hf['peak_rss_mib']:.3f} |")
    hf_stack = "Trainer + PEFT" + (" + bitsandbytes" if args.quant == "nf4" else "")
    model = "a toy model (--smoke: the numbers mean nothing)" if args.smoke else args.model
    settings = (f"model {model or 'bundled SmolLM2-135M-Instruct'}, data {args.data}, quant={args.quant} "
                f"(HF side: transformers {hf_stack}), fp32 on CPU, LoRA r={args.rank} alpha={args.rank} "
                f"dropout 0 all-linear, batch {args.batch_size} x grad_accum {args.grad_accum}, "
                f"max_seq_length {args.max_seq_length}, {args.max_steps} steps (tokens/s over steps 2..N), "
                f"AdamW lr={args.lr} cosine warmup_ratio={args.warmup_ratio}, clip 1.0, seed {args.seed}, "
                f"{args.threads} threads")
    machine_line = (f"{machine['cpu']}, {machine['cores']} cores; python {machine['python']}, "
                    f"torch {machine['torch']}, transformers {machine['transformers']}, peft {machine['peft']}; "
                    f"{machine['date']}")
    load = ", ".join(f"{s} {results[s]['other_load']:.0%}" for s in SIDES)
    busy = any(results[s]["other_load"] > 0.05 for s in SIDES)
    steps = "; ".join(f"{s}: " + ", ".join(f"{t:.1f}" for t in results[s]["step_s_all"]) for s in SIDES)
    rss = ", ".join(f"{s} {results[s]['rss_before_loop_mib']:.0f}" for s in SIDES)
    return "\n".join([
        f"Machine: {machine_line}", f"Settings: {settings}", "", *rows, "",
        f"Step times (s): {steps}", f"RSS when the train loop starts (MiB): {rss}",
        f"Other load on the machine during each side (share of all cores): {load}"
        + ("  WARNING: busy machine, timings are not trustworthy" if busy else ""),
        *checks(results)])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--data", default=os.path.normpath(os.path.join(ROOT, DEFAULT_DATA)),
                   help="Alpaca/chat/text JSONL (default: the shared Alpaca seed tasks; generated if missing)")
    p.add_argument("--quant", choices=("none", "nf4"), default="none",
                   help="nf4: lorafit quantize=nf4 vs bitsandbytes 4-bit (QLoRA)")
    p.add_argument("--max-steps", type=int, default=10, help="optimizer steps; the first is untimed warmup")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank; alpha is set equal to it")
    p.add_argument("--max-seq-length", type=int, default=512)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="also write all results (both sides, machine) here")
    p.add_argument("--smoke", action="store_true",
                   help="check the script in seconds: a random toy model of SmolLM2's family (unless --model), "
                        "and unless given, --max-steps 2 --max-seq-length 64; the numbers mean nothing")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # child mode
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:  # toy sizes as defaults: flags given explicitly still win
        p.set_defaults(max_steps=2, max_seq_length=64)
        args = p.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from bench.common import machine_info, write_json

    if args.side:  # child: one side, numbers to a file
        write_json(args.child_out, run_side(args))
        return

    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke and args.model is None:
            from bench.common import toy_model_folder

            args.model = toy_model_folder()
        if not os.path.isfile(args.data):  # no shared data here: the demo task, generated
            from lorafit.train.demo_task import make_dataset, write_jsonl

            print(f"{args.data} not found: using 200 generated demo-task records", file=sys.stderr)
            args.data = str(write_jsonl(os.path.join(tmp, "demo.jsonl"), make_dataset(200, args.seed)))
        machine = machine_info()
        results = {side: launch(side, args) for side in SIDES}
    print(report(results, machine, args))
    if args.json:
        write_json(args.json, {"machine": machine, "args": vars(args), "results": results}, indent=2)


if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a file: make `bench.common` importable
        sys.path.insert(0, ROOT)
    main()
