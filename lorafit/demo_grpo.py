"""`lorafit demo --method grpo`: reinforcement learning of a LoRA adapter on the date task, from the base model.

The embedded demo's task (lorafit.train.demo_task: dates in words -> ISO dates), but no answer is ever shown to
the model: each step it writes G completions of a few prompts (sampled by the serving engine, in process, on the
very model being trained), the shipped exact-match reward scores them against the record's answer, and GRPO
moves the adapter toward the completions that scored above their group's mean. The base answers a few held-out
dates right; the demo measures held-out exact match (greedy) before and after, the reward curve, and the time
split between generation, scoring and training.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafit.config import LoraConfig
from lorafit.device import resolve_device, resolve_dtype
from lorafit.generate import generate
from lorafit.model import DEFAULT_MODEL, load_model
from lorafit.train.data import DataConfig, load_data
from lorafit.train.demo_task import INSTRUCTION, accuracy, make_splits, write_jsonl
from lorafit.train.trainer import TrainConfig, Trainer

ANSWER_TOKENS = 12  # "YYYY-MM-DD" and the end token, with room to spare


@dataclass
class GRPODemoConfig:
    """Sizes for a 2-core CPU: 4 prompts x 8 completions of at most 16 tokens per step."""

    output_dir: str = "runs/demo-grpo"
    model: str = DEFAULT_MODEL
    n_train: int = 400
    n_eval: int = 100
    steps: int = 60
    prompts_per_step: int = 4
    num_generations: int = 8
    max_completion_length: int = 16
    learning_rate: float = 2e-4
    rank: int = 16
    quantize: str | None = None
    """None: an fp32 base (the fastest on a CPU); "nf4" runs the same with a 4-bit base."""
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0


def prompt_records(records: list[dict]) -> list[dict]:
    """The task's records as GRPO prompts: the question as a chat message, the ISO date as the reward's column."""
    return [{"prompt": [{"role": "user", "content": f"{INSTRUCTION}\n\n{r['input']}"}], "answer": r["output"]}
            for r in records]


def held_out_accuracy(model, tokenizer, samples, answers: list[str]) -> float:
    return accuracy(generate(model, tokenizer, [s.prompt_ids for s in samples], max_new_tokens=ANSWER_TOKENS,
                             batch_size=50), answers)


def run_grpo_demo(cfg: GRPODemoConfig | None = None) -> dict[str, float]:
    cfg = cfg or GRPODemoConfig()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    t_start = time.perf_counter()
    print(f"lorafit demo --method grpo: {cfg.model} learns to write dates as ISO dates from a reward alone.\n")
    train_records, eval_records = make_splits(cfg.n_train, cfg.n_eval, seed=cfg.seed)
    train_path = write_jsonl(out / "data" / "prompts.jsonl", prompt_records(train_records))
    val_path = write_jsonl(out / "data" / "val.jsonl", prompt_records(eval_records))
    model, tokenizer = load_model(cfg.model, quantize=cfg.quantize, dtype=dtype, device=device)
    splits = load_data(tokenizer, DataConfig(path=str(train_path), val_path=str(val_path)))
    answers = [r["output"] for r in eval_records]
    print(f"[1/4] {len(train_records)} prompts, {len(eval_records)} held out; reward: exact match of the first line "
          f"with the ISO date")
    t_phase = time.perf_counter()
    acc_before = held_out_accuracy(model, tokenizer, splits.val, answers)
    print(f"[2/4] before: held-out exact match {100 * acc_before:.0f}% (greedy; {time.perf_counter() - t_phase:.0f} s)")

    batch = cfg.prompts_per_step * cfg.num_generations
    train_cfg = TrainConfig(
        output_dir=str(out), method="grpo", lora=LoraConfig(r=cfg.rank, alpha=cfg.rank), max_steps=cfg.steps,
        batch_size=batch, learning_rate=cfg.learning_rate, warmup_ratio=0.0, seed=cfg.seed, logging_steps=1,
        grpo={"num_generations": cfg.num_generations, "max_completion_length": cfg.max_completion_length,
              "reward_funcs": [{"name": "exact_match", "column": "answer", "first_line": True}]})
    trainer = Trainer(train_cfg, model, tokenizer, splits.train, None, splits.prompt_format)
    print(f"[3/4] GRPO: {cfg.steps} steps of {cfg.prompts_per_step} prompts x {cfg.num_generations} completions "
          f"(<= {cfg.max_completion_length} tokens), LoRA r={cfg.rank}, lr {cfg.learning_rate}")
    t_phase = time.perf_counter()
    history = trainer.train()
    train_s = time.perf_counter() - t_phase
    gen_s = sum(h.get("time/generation", 0.0) for h in history)
    score_s = sum(h.get("time/scoring", 0.0) for h in history)
    step_s = sum(h["step_time"] for h in history)
    rewards = [h["reward"] for h in history if "reward" in h]
    window = max(1, len(rewards) // 5)
    first, last = sum(rewards[:window]) / window, sum(rewards[-window:]) / window
    print(f"      mean reward {first:.3f} (first {window} steps) -> {last:.3f} (last {window}); {train_s:.0f} s: "
          f"generation {gen_s:.0f} s, scoring and old log-probs {score_s:.0f} s, the rest of the steps "
          f"(training) {step_s - gen_s - score_s:.0f} s")
    t_phase = time.perf_counter()
    acc_after = held_out_accuracy(model, tokenizer, splits.val, answers)
    print(f"[4/4] after: held-out exact match {100 * acc_before:.0f}% -> {100 * acc_after:.0f}% "
          f"({time.perf_counter() - t_phase:.0f} s)")
    wall = time.perf_counter() - t_start
    result = {"acc_before": acc_before, "acc_after": acc_after, "reward_first": first, "reward_last": last,
              "steps": cfg.steps, "wall_s": wall, "train_s": train_s, "generation_s": gen_s, "scoring_s": score_s,
              "training_s": step_s - gen_s - score_s}
    (out / "demo.json").write_text(json.dumps(result, indent=1))
    print(f"Done in {wall / 60:.1f} min. Written to {out}/: adapter/, rewards.png (reward curve), metrics.jsonl, "
          "demo.json")
    return result
