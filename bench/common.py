"""Helpers shared by the benchmarks: the reference model shape, its toy twin for `--smoke` runs, memory
readings, machine facts."""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

# SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M config.json). Built from config with random
# weights, so the benchmark needs no download and both sides of a comparison get identical weights.
SMOLLM2_135M = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
}


# The same family at toy size: what every benchmark's --smoke runs on, so that its whole code path (argument
# defaults, set-up, one step, the report) is checked in seconds. Numbers from it mean nothing.
SMOLLM2_TOY = {**SMOLLM2_135M, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}


def build_smollm2_shaped(seed: int, shape: dict | None = None):
    """A random-weight LlamaForCausalLM with SmolLM2-135M's shape (or `shape`), fp32, SDPA attention, in train mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**(shape or SMOLLM2_135M))
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.config.use_cache = False
    return model


def toy_model_folder() -> str:
    """The model --smoke runs on, made once into `<lorafit cache>/models/smollm2-toy-<key>/` (seed 0, so always
    the same): the bundled SmolLM2-135M-Instruct's config, tokenizer and chat template with SMOLLM2_TOY's sizes
    and random weights. Two runs making it at once both succeed; the first one's folder is kept."""
    from lorafit.paths import cache_dir

    key = hashlib.sha256(json.dumps(SMOLLM2_TOY, sort_keys=True).encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"smollm2-toy-{key}"
    if (target / "config.json").is_file():
        return str(target)
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from lorafit.model import resolve_model

    bundled = resolve_model(None)
    config = AutoConfig.from_pretrained(bundled)
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim"):
        setattr(config, name, SMOLLM2_TOY[name])
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-")
    try:
        torch.manual_seed(0)
        LlamaForCausalLM(config).to(torch.float32).save_pretrained(tmp)
        AutoTokenizer.from_pretrained(bundled).save_pretrained(tmp)
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():  # not a run beside this one that finished first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def rss_mib() -> float:
    """Resident set size of this process right now, in MiB (from /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """Highest resident set size this process has had so far, in MiB.

    VmHWM rather than ru_maxrss: a child's ru_maxrss starts at its parent's peak at fork time."""
    with open("/proc/self/status") as f:
        return int(f.read().split("VmHWM:")[1].split()[0]) / 1024


def median(values: list[float]) -> float:
    return statistics.median(values)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, str | int]:
    """What the numbers depend on: CPU, cores this process may use, library versions (read from the installed
    packages' metadata, without importing them), date."""
    version = importlib.metadata.version
    return {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "torch": version("torch"),
        "transformers": version("transformers"),
        "peft": version("peft"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used since boot (from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    """CPU seconds used by this process's finished children (user + system)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def child_flags(flags: dict[str, object]) -> list[str]:
    """`{"max_steps": 2, "smoke": True, "model": None}` as the command line `--max-steps 2 --smoke`: None is
    left out (the child keeps its default), True is a bare switch."""
    argv: list[str] = []
    for flag, value in flags.items():
        if value is None or value is False:
            continue
        argv += [f"--{flag.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return argv


def run_side_in_child(script: str, side: str, flags: dict[str, object], env: dict[str, str]) -> dict:
    """Run `script --side SIDE --child-out F --flag value ...` in a fresh interpreter (so neither side
    inherits the other's heap) and return the JSON it wrote to F, plus `other_load`: the CPU used
    meanwhile by anything but the child, as a share of all cores (a neighbour's load slows one side
    and not the other, so the comparison says when it was taken on a busy machine)."""
    busy0, child0, wall0 = machine_busy_seconds(), children_cpu_seconds(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.abspath(script), "--side", side, "--child-out", out, *child_flags(flags)]
        print(f"[{side}] running ...", file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, env=env)
        with open(out) as f:
            result = json.load(f)
    foreign = (machine_busy_seconds() - busy0) - (children_cpu_seconds() - child0)
    result["other_load"] = max(0.0, foreign) / ((time.perf_counter() - wall0) * (os.cpu_count() or 1))
    return result


def write_json(path: str, data: object, indent: int | None = None) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=indent)


def bnb_nf4_linears(model, compute_dtype, device="cpu"):
    """PEFT's QLoRA base: every nn.Linear but the head becomes a bitsandbytes Linear4bit (nf4, double
    quant, `compute_dtype`) quantized from the same weights, which is what
    `from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True, ...))` builds, without
    writing a checkpoint first. Layer by layer, so the dense copy of one layer at most is added."""
    import bitsandbytes as bnb
    import torch

    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")
        new.weight = bnb.nn.Params4bit(old.weight.data, requires_grad=False, compress_statistics=True,
                                       quant_type="nf4", blocksize=64)
        setattr(parent, child, new.to(device))
        del old
    model.is_loaded_in_4bit = True
    return model
