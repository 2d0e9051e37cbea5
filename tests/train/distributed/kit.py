"""What the distributed tests and their worker processes share: the tiny model, the data, the configs.

Plain functions, no fixtures: `worker.py` runs under torchrun (or as bare processes) and builds the
same models and samples as the single-process references built in the tests.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import lorafit as lf
from lorafit.model import default_gguf
from lorafit.quant.apply import quantize_model
from lorafit.train.data import DataConfig, Splits, load_data
from lorafit.train.demo_task import make_dataset, write_jsonl
from lorafit.train.trainer import TrainConfig

ROOT = Path(__file__).resolve().parents[3]
WORKER = Path(__file__).with_name("worker.py")


def tiny_llama(seed: int = 0, quant: str | None = None) -> LlamaForCausalLM:
    """A 2-block Llama with SmolLM2's vocabulary (the real tokenizer's ids), random weights; its linears
    quantized (except the head) when `quant` is "nf4" or "ternary"."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config)
    return quantize_model(model, quant) if quant else model


def tokenizer():
    gguf = default_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def write_data(path: Path) -> Path:
    """The dates as SFT records, and beside them the same dates as preference pairs (`pairs_path`) and a
    start adapter for the tiny Llama (`adapter_path`)."""
    records = make_dataset(38, seed=3)
    pairs = [{"prompt": [{"role": "user", "content": f"{r['instruction']}\n\n{r['input']}"}],
              "chosen": [{"role": "assistant", "content": r["output"]}],
              "rejected": [{"role": "assistant", "content": r["output"][:8] + "99"}]} for r in records]
    write_jsonl(pairs_path(path), pairs)
    write_jsonl(prompts_path(path), [{"prompt": p["prompt"], "answer": r["output"]} for p, r in zip(pairs, records)])
    model = lf.apply_lora(tiny_llama(seed=1), lf.LoraConfig(r=4, alpha=8, target_modules="all-linear", init="random"))
    lf.save_adapter(model, adapter_path(path))
    return write_jsonl(path, records)


def pairs_path(data: Path) -> Path:
    return Path(data).with_name("pairs.jsonl")


def prompts_path(data: Path) -> Path:
    return Path(data).with_name("prompts.jsonl")


def prompt_samples(tok, data: Path) -> Splits:
    """The same questions as GRPO prompts (the ISO date as the `answer` column)."""
    return load_data(tok, DataConfig(path=str(prompts_path(data)), val_fraction=0.24, seed=0))


def grpo_config(out: Path, **kw) -> TrainConfig:
    """GRPO, 8 completion slots per micro-batch (2 prompts x 4), 2 micro-batches per step, 3 steps; the reward
    (a length target in characters) varies within every group, so every step has a gradient."""
    return config(out, method="grpo", batch_size=8, grad_accum=2, max_steps=3,
                  grpo={"num_generations": 4, "max_completion_length": 6, "loss_type": "bnpo",
                        "reward_funcs": [{"name": "length_target", "target": 20, "unit": "chars"}]}, **kw)


def adapter_path(data: Path) -> Path:
    return Path(data).with_name("start-adapter")


def pair_samples(tok, data: Path, unpair: bool = False) -> Splits:
    """The pairs split as `samples` splits the records (KTO: unpaired, two examples per pair)."""
    return load_data(tok, DataConfig(path=str(pairs_path(data)), val_fraction=0.24, seed=0), unpair=unpair)


def samples(tok, path: Path) -> Splits:
    """29 training and 9 validation samples: with batches of 4 the last batch of an epoch (and of an
    evaluation) holds 1 sample, so one of 2 ranks runs the masked stand-in there."""
    return load_data(tok, DataConfig(path=str(path), val_fraction=0.24, seed=0))


def config(out: Path, **kw) -> TrainConfig:
    """batch_size 4 over all processes (2 each on 2 ranks), 5 steps; B starts random so that every step
    has non-trivial gradients. AdamW moves each weight by about +-lr per step whatever the size of its
    gradient, so a weight whose gradient is ~0 can move either way on float noise alone (the summation
    order of 1 vs 2 processes, and the CPU's kernels: 1.5e-5 in one weight at lr 1e-3 on an AVX-512 Xeon):
    lr 3e-4 keeps that below the tests' 1e-5 over 5 steps."""
    lora = lf.LoraConfig(r=4, alpha=8, target_modules="all-linear", dropout=kw.pop("dropout", 0.0), init="random")
    return TrainConfig(**{"output_dir": str(out), "lora": lora, "batch_size": 4, "learning_rate": 3e-4,
                          "max_steps": 5, "warmup_ratio": 0.0, **kw})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.setdefault("LORAFIT_CACHE", str(ROOT / ".pytest_cache" / "lorafit"))
    return {**env, **extra}


def torchrun(args: list[str], timeout: float, nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 worker.py args...`, output captured."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(WORKER), *args]
    return subprocess.run(cmd, cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=timeout)
