"""One real 2-process run (torchrun, gloo) for all the distributed tests, and its 1-process references.

The 2-process run executes the worker's phases one after another in the same process group (each
torchrun start costs two interpreters loading torch and transformers on a 2-core machine); its last
phase makes rank 1 fail on purpose, so the run itself exits non-zero and the failure test reads
that from the same run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from lorafit.train.trainer import Trainer
from tests.train.distributed import kit

PHASES = ["ddp", "fsdp", "dpo", "kto", "grpo", "ternary", "resume", "refuse", "raise"]


@dataclass
class Run:
    out: Path
    returncode: int
    output: str
    ranks: list[dict]


@pytest.fixture(scope="session")
def dist_data(tmp_path_factory) -> Path:
    return kit.write_data(tmp_path_factory.mktemp("dist-data") / "dates.jsonl")


@pytest.fixture(scope="session")
def two_ranks(dist_data, tmp_path_factory) -> Run:
    out = tmp_path_factory.mktemp("two-ranks")
    proc = kit.torchrun([str(dist_data), str(out), *PHASES], timeout=600)
    output = proc.stdout + proc.stderr
    files = [out / f"rank{r}.json" for r in range(2)]
    if not all(f.is_file() for f in files):
        pytest.fail(f"the 2-process run wrote no results (exit {proc.returncode}):\n{output[-6000:]}")
    ranks = [json.loads(f.read_text()) for f in files]
    missing = [p for p in PHASES[:-1] if not any(k.startswith(p) for k in ranks[0])]
    if missing:
        pytest.fail(f"the 2-process run stopped before {missing} (exit {proc.returncode}):\n{output[-6000:]}")
    return Run(out, proc.returncode, output, ranks)


@pytest.fixture(scope="session")
def dist_samples(tokenizer, dist_data):
    return kit.samples(tokenizer, dist_data)


@pytest.fixture(scope="session")
def one_rank(tokenizer, dist_samples, dist_data, tmp_path_factory) -> dict[str, tuple[Path, list[dict]]]:
    """The same trainings in one process with the whole batch: {"ddp": (out, history), "fsdp": ..., "ternary": ...}."""
    root = tmp_path_factory.mktemp("one-rank")
    ddp = Trainer(kit.config(root / "ddp", save_steps=2, save_total_limit=5, eval_steps=5, grad_accum=2),
                  kit.tiny_llama(), tokenizer, dist_samples.train, dist_samples.val).train()
    fsdp = Trainer(kit.config(root / "fsdp", eval_steps=5), kit.tiny_llama(quant="nf4"), tokenizer, dist_samples.train,
                   dist_samples.val).train()
    ternary = Trainer(kit.config(root / "ternary", max_steps=3), kit.tiny_llama(quant="ternary"), tokenizer,
                      dist_samples.train).train()
    pairs = kit.pair_samples(tokenizer, dist_data)
    dpo = Trainer(kit.config(root / "dpo", method="dpo", grad_accum=2, eval_steps=5, precompute_ref_log_probs=True),
                  kit.tiny_llama(), tokenizer, pairs.train, pairs.val).train()
    unpaired = kit.pair_samples(tokenizer, dist_data, unpair=True)
    kto = Trainer(kit.config(root / "kto", method="kto", adapter=str(kit.adapter_path(dist_data)), eval_steps=5),
                  kit.tiny_llama(quant="nf4"), tokenizer, unpaired.train, unpaired.val).train()
    prompts = kit.prompt_samples(tokenizer, dist_data)
    grpo = Trainer(kit.grpo_config(root / "grpo", eval_steps=3), kit.tiny_llama(), tokenizer, prompts.train,
                   prompts.val).train()
    return {"ddp": (root / "ddp", ddp), "fsdp": (root / "fsdp", fsdp), "ternary": (root / "ternary", ternary),
            "dpo": (root / "dpo", dpo), "kto": (root / "kto", kto), "grpo": (root / "grpo", grpo)}
