"""One point of an ablation: train it as `lorafit train` would, then measure it.

Measured, in the point's own folder (result.json, written last and atomically: its presence means
"finished"):

* val_loss, perplexity: mean next-token loss over the held-out samples' target tokens, exp of it (a
  preference method: its validation loss and metrics, val_rewards/accuracies...);
* exact_match: greedy generation from each held-out prompt, first line compared with the target's
  (`lorafit.train.demo_task.exact_match`; of a preference pair, its chosen completion); for
  classification given as label generation this is the accuracy;
* trainable / total parameters and their ratio (`lorafit.lora.inject.trainable_parameters`);
* peak memory: CUDA: torch's peak allocated bytes; CPU: the process's peak resident set size (VmHWM),
  reset before the point where Linux allows it (/proc/self/clear_refs), else the process's peak so far;
* wall time of the whole point (load, train, evaluate), training time and training tokens/s (the
  tokens of the batches trained on, padding excluded).
"""

from __future__ import annotations

import datetime as dt
import json
import resource
import time
from pathlib import Path

import torch

from lorafit.device import resolve_device, resolve_dtype
from lorafit.generate import generate
from lorafit.io import atomic_write_bytes
from lorafit.lora.inject import trainable_parameters
from lorafit.model import load_model
from lorafit.train.data import IGNORE, PairSample, Sample, UnpairedSample, load_data
from lorafit.train.demo_task import accuracy
from lorafit.train.run import RunConfig
from lorafit.train.trainer import Trainer, evaluate

RESULT = "result.json"


def reset_peak_memory(device: torch.device) -> bool:
    """Start a fresh peak-memory count; False where the CPU's peak cannot be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def prompt_and_target(sample: Sample | PairSample | UnpairedSample, tokenizer) -> tuple[str, str]:
    """The prompt text (everything before the first trained token) and the target text of a sample; of a
    preference sample, its prompt and its chosen (desirable) completion."""
    if isinstance(sample, (PairSample, UnpairedSample)):
        target = sample.chosen_ids if isinstance(sample, PairSample) else sample.completion_ids
        return (tokenizer.decode(sample.prompt_ids, skip_special_tokens=False),
                tokenizer.decode(target, skip_special_tokens=True))
    first = next((i for i, label in enumerate(sample.labels) if label != IGNORE), len(sample.labels))
    target_ids = [t for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE]
    return (tokenizer.decode(sample.input_ids[:first], skip_special_tokens=False),
            tokenizer.decode(target_ids, skip_special_tokens=True))


def trained_tokens(trainer: Trainer, steps: int) -> int:
    """Tokens (padding excluded) of the micro-batches the first `steps` optimizer steps trained on."""
    micro = steps * trainer.config.grad_accum
    return sum(len(trainer.train_samples[j]) for i in range(micro) for j in trainer.order.indices(i))


def run_point(config: RunConfig, max_eval: int | None = None) -> dict:
    """Train and measure one point; writes output_dir/result.json and returns its contents."""
    start = time.perf_counter()
    device = resolve_device(config.device)
    exact_peak = reset_peak_memory(device)
    model, tokenizer = load_model(config.model, quantize=config.quantize, dtype=resolve_dtype(config.dtype, device),
                                  device=device)
    splits = load_data(tokenizer, config.data, unpair=config.train.method == "kto")
    held_out = splits.val[:max_eval] if max_eval else splits.val
    trainer = Trainer(config.train, model, tokenizer, splits.train, splits.val)
    trainable, total = trainable_parameters(model)
    t_train = time.perf_counter()
    history = trainer.train(overwrite=True)  # an unfinished point starts over (see the module docstring)
    train_s = time.perf_counter() - t_train
    result: dict = {"trainable_params": trainable, "total_params": total,
                    "trainable_pct": 100 * trainable / max(total, 1), "steps": len(history)}
    if held_out:
        result.update(evaluate(model, held_out, trainer.pad_id, config.train.batch_size, objective=trainer.objective))
        answered = [s for s in held_out if getattr(s, "label", True)]  # KTO: the desirable completions only
        pairs = [prompt_and_target(s, tokenizer) for s in answered]
        longest = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for _, t in pairs)
        answers = generate(model, tokenizer, [p for p, _ in pairs], max_new_tokens=longest + 4)
        result["exact_match"] = accuracy(answers, [t for _, t in pairs])
        result["n_eval"] = len(answered)
        result["examples"] = [{"target": t, "answer": a} for (_, t), a in list(zip(pairs, answers))[:3]]
    tokens = trained_tokens(trainer, len(history))
    result.update({"peak_memory_mib": peak_memory_mib(device), "peak_memory_since_point": exact_peak,
                   "wall_s": time.perf_counter() - start, "train_s": train_s, "train_tokens": tokens,
                   "tokens_per_s": tokens / train_s if train_s > 0 else None, "device": str(device),
                   "loss_curve": [[h["step"], h["loss"]] for h in history],
                   "finished_at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")})
    out = Path(config.train.output_dir)
    atomic_write_bytes(out / RESULT, (json.dumps(result, indent=1) + "\n").encode())
    return result


def finished(folder: str | Path) -> dict | None:
    """The result of a point whose folder holds a readable result.json, else None."""
    path = Path(folder) / RESULT
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
