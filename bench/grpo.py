"""GRPO with lorafit vs TRL 1.16's GRPOTrainer + PEFT (generation through transformers), on CPU, in one run.

Per side: seconds per optimizer step (median over the timed steps; the first step is untimed warmup), split into
generation (sampling the completions) and the rest (rewards, log-probs, forward, backward, optimizer), the
completion tokens generated, the process's peak RSS (VmHWM, whole run), and the ratios lorafit / TRL.

The lorafit side is `lorafit train` with method grpo: the rollouts come from the serving engine in process, on
the model being trained (KV cache, one prefill per prompt for its G completions, the adapter read live). The TRL
side is what a TRL user writes without vLLM: `AutoModelForCausalLM.from_pretrained`, `PeftModel.from_pretrained(
..., is_trainable=True)`, `GRPOTrainer`; it generates with `model.generate` on the PEFT model.

Why it is fair:
- each side runs in its own fresh subprocess, one after the other, in the same run;
- the same model folder, the same prompts (the demo's date task, as chat messages), the same G, completion
  length, sampling (temperature 1, no top-k / top-p), reward (exact match with the ISO date), loss (dapo,
  beta 0), LoRA (same PEFT start adapter: r 16 on every linear layer, B = 0), AdamW at a constant lr, fp32;
- the completions' lengths are random on both sides; each side reports how many tokens it generated.

    HF_HUB_OFFLINE=1 python bench/grpo.py [--prompts 4 --generations 8 --new-tokens 32 --steps 4 --json out.json]
    python bench/grpo.py --smoke      (a toy model and 2 steps: checks the code path; its numbers mean nothing)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SIDES = ("lorafit", "trl")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--generations", type=int, default=8, help="completions per prompt (num_generations)")
    p.add_argument("--new-tokens", type=int, default=32, help="max_completion_length")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps (the first is warmup)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=None, help="torch threads per side (default: all cores)")
    p.add_argument("--smoke", action="store_true", help="a toy model, 2 prompts x 2 completions, 2 steps")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--side", choices=SIDES, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.prompts, args.generations, args.new_tokens, args.steps, args.rank = 2, 2, 4, 2, 2
    return args


# -- shared set-up (parent) ---------------------------------------------------------------------------
def write_prompts(path: str, n: int) -> str:
    from lorafit.demo_grpo import prompt_records
    from lorafit.train.demo_task import make_dataset

    with open(path, "w") as f:
        for r in prompt_records(make_dataset(n, seed=0)):
            f.write(json.dumps(r) + "\n")
    return path


def write_start_adapter(path: str, model: str, rank: int) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32)
    peft = get_peft_model(base, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules="all-linear"))
    peft.save_pretrained(path)
    return path


# -- the sides (children) ------------------------------------------------------------------------------
def run_lorafit(args) -> dict:
    import torch

    from lorafit.model import load_model
    from lorafit.train.data import DataConfig, load_data
    from lorafit.train.trainer import TrainConfig, Trainer

    model, tokenizer = load_model(args.model, dtype=torch.float32, device="cpu")
    splits = load_data(tokenizer, DataConfig(path=os.path.join(args.workdir, "prompts.jsonl"), val_fraction=0.0))
    cfg = TrainConfig(output_dir=os.path.join(args.workdir, "lorafit"), method="grpo",
                      adapter=os.path.join(args.workdir, "start"), max_steps=args.steps,
                      batch_size=args.prompts * args.generations, learning_rate=args.lr, warmup_ratio=0.0,
                      schedule="constant", max_grad_norm=1.0, seed=0,
                      grpo={"num_generations": args.generations, "max_completion_length": args.new_tokens,
                            "reward_funcs": [{"name": "exact_match", "column": "answer", "first_line": True}]})
    history = Trainer(cfg, model, tokenizer, splits.train).train()
    steps = [{"step_s": h["step_time"], "generation_s": h["time/generation"],
              "tokens": h["completions/mean_length"] * args.prompts * args.generations, "reward": h["reward"]}
             for h in history]
    return {"steps": steps}


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lorafit.train.rewards import exact_match

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(model, os.path.join(args.workdir, "start"), is_trainable=True)
    with open(os.path.join(args.workdir, "prompts.jsonl")) as f:
        data = Dataset.from_list([json.loads(line) for line in f])

    def exact_match_answer(prompts, completions, answer, **kwargs):
        return exact_match(prompts, completions, answer=answer, column="answer", first_line=True)

    config = GRPOConfig(output_dir=os.path.join(args.workdir, "trl"), use_cpu=True, bf16=False, report_to=[],
                        per_device_train_batch_size=args.prompts * args.generations,
                        num_generations=args.generations, max_completion_length=args.new_tokens,
                        max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
                        logging_steps=1, save_strategy="no", seed=0, gradient_checkpointing=False,
                        dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=[exact_match_answer], args=config, train_dataset=data,
                          processing_class=tokenizer)
    generation = []
    generate = trainer._generate

    def timed(*a, **kw):
        t0 = time.perf_counter()
        out = generate(*a, **kw)
        generation.append((time.perf_counter() - t0, sum(len(ids) for ids in out[1])))
        return out

    trainer._generate = timed
    marks = [time.perf_counter()]

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **kw):
            marks.append(time.perf_counter())

    trainer.add_callback(Clock())
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    steps = [{"step_s": marks[i + 1] - marks[i], "generation_s": generation[i][0], "tokens": generation[i][1],
              "reward": rewards[i] if i < len(rewards) else float("nan")} for i in range(len(marks) - 1)]
    return {"steps": steps}


def child(args) -> None:
    import torch

    from bench.common import peak_rss_mib

    if args.threads:
        torch.set_num_threads(args.threads)
    result = (run_lorafit if args.side == "lorafit" else run_trl)(args)
    timed = result["steps"][1:] or result["steps"]
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    result.update(step_s=median([s["step_s"] for s in timed]), generation_s=median([s["generation_s"] for s in timed]),
                  tokens_per_step=sum(s["tokens"] for s in timed) / len(timed), peak_rss_mib=peak_rss_mib(),
                  threads=torch.get_num_threads())
    result["training_s"] = result["step_s"] - result["generation_s"]
    with open(args.child_out, "w") as f:
        json.dump(result, f)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.side:
        child(args)
        return {}
    from bench.common import machine_info, run_side_in_child, toy_model_folder, write_json

    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as work:
        model = args.model or (toy_model_folder() if args.smoke else None)
        if model is None:
            from lorafit.model import resolve_model

            model = str(resolve_model(None))
        write_prompts(os.path.join(work, "prompts.jsonl"), max(16, args.prompts * args.steps))
        write_start_adapter(os.path.join(work, "start"), model, args.rank)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1"}
        flags = {"model": model, "prompts": args.prompts, "generations": args.generations,
                 "new_tokens": args.new_tokens, "steps": args.steps, "rank": args.rank, "lr": args.lr,
                 "threads": args.threads, "workdir": work}
        results = {side: run_side_in_child(__file__, side, flags, env) for side in SIDES}
    ours, theirs = results["lorafit"], results["trl"]
    report = {"machine": machine_info(), "loadavg_before": load, "loadavg_after": os.getloadavg(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "config": {k: v for k, v in flags.items()
                                                                                    if k != "workdir"},
              "lorafit": ours, "trl": theirs,
              "speedup": theirs["step_s"] / ours["step_s"], "generation_speedup": theirs["generation_s"] / ours["generation_s"],
              "training_speedup": theirs["training_s"] / max(ours["training_s"], 1e-9),
              "memory_ratio": ours["peak_rss_mib"] / theirs["peak_rss_mib"]}
    print(f"GRPO, {args.prompts} prompts x {args.generations} generations x <= {args.new_tokens} new tokens, "
          f"{args.steps} steps (first untimed), {os.path.basename(model.rstrip('/'))}")
    print(f"{'side':8} {'s/step':>8} {'gen s':>8} {'train s':>8} {'gen tok':>8} {'peak MiB':>9} {'other load':>10}")
    for side, r in results.items():
        print(f"{side:8} {r['step_s']:8.2f} {r['generation_s']:8.2f} {r['training_s']:8.2f} {r['tokens_per_step']:8.0f} "
              f"{r['peak_rss_mib']:9.0f} {r['other_load']:10.2f}")
    print(f"lorafit is {report['speedup']:.2f}x TRL's speed per step (generation {report['generation_speedup']:.2f}x, "
          f"the rest {report['training_speedup']:.2f}x) at {report['memory_ratio']:.2f}x its peak memory")
    print(f"machine: {report['machine']}; load average before {load[0]:.2f}, after {report['loadavg_after'][0]:.2f}")
    if args.json:
        write_json(args.json, report, indent=1)
    return report


if __name__ == "__main__":
    main()
