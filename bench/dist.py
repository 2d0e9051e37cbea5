"""Training on 2 processes vs 1 on the CPU, at the same global batch: tokens/s and memory per process.

    HF_HUB_OFFLINE=1 python bench/dist.py [--quant nf4] [--strategies ddp,fsdp] [--max-steps 6] [--json out.json]
    python bench/dist.py --smoke    # a toy model of the same family, 2 steps of 64 tokens: checks the script

Each run is `lorafit.train.run.run` (what `lorafit train` executes) on the bundled SmolLM2-135M-Instruct
(its real weights; or --model) and the same data, batch_size (the global micro-batch: 2 processes take half each),
steps, LoRA and seed, in fresh processes:

    1 process    `python bench/dist.py --child ...`, torch threads = the cores this benchmark may use
                 (and with --one-thread once more with 1 thread: the fair baseline on a loaded machine)
    2 processes  `torchrun --standalone --nproc-per-node 2 bench/dist.py --child ...`, half the threads
                 each, once per strategy (ddp, fsdp)

Measured in each process: train tokens/s (the tokens of all ranks in steps 2..N over their wall time,
on rank 0's clock; every step ends in collectives, so the ranks keep in step; the first step is
warmup, loading is not timed), the peak RSS (VmHWM, the whole process), and the bytes of the frozen
base and of the adapter that the process holds itself (a sharded tensor counts its shard). The
machine (CPU, cores, versions) and the load other processes put on it meanwhile are printed with
the numbers: on a machine with few cores, 2 processes of half the threads each are compared with 1
of all of them, so the ratio shows what the communication and the split batch cost, not a speedup
from more hardware. The peak RSS includes loading: every process reads the whole base before FSDP
keeps its shards, so FSDP lowers what a process holds while training (the base column, the RSS at
the end) but not the peak on the CPU. On one GPU nothing multi-GPU can be measured, and this
benchmark does not try.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- child: one process of a run --------------------------------------------------------------------
def run_config_raw(args: argparse.Namespace, data: str, output_dir: str) -> dict:
    """The mapping a YAML config file for `lorafit train` would hold (no `model:` line: the bundled default)."""
    return {**({"model": args.model} if args.model else {}), "quantize": None if args.quant == "none" else args.quant,
            "device": "cpu", "dtype": "float32", "data": {"path": data, "max_seq_length": args.max_seq_length},
            "lora": {"r": 16, "alpha": 16, "target_modules": "all-linear"}, "output_dir": output_dir,
            "max_steps": args.max_steps, "batch_size": args.batch_size, "learning_rate": 2e-4, "warmup_ratio": 0.0,
            "distributed": args.strategy, "seed": 0}


def run_child(args: argparse.Namespace) -> None:
    import torch

    import lorafit.train.trainer as trainer_module
    from bench.common import peak_rss_mib, rss_mib
    from lorafit.train.demo_task import make_dataset, write_jsonl
    from lorafit.train.distributed.wrap import local_bytes
    from lorafit.train.run import parse_run_config, run

    torch.set_num_threads(args.threads)
    marks: dict = {"steps": [], "tokens": []}
    base = trainer_module.Trainer

    class TimedTrainer(base):
        def train(self, resume: bool = False, overwrite: bool = False):
            marks["trainer"] = self
            marks["start"] = time.perf_counter()
            return super().train(resume, overwrite)

        def _optimizer_step(self):
            lr = super()._optimizer_step()
            marks["steps"].append(time.perf_counter())
            indices = range(self.micro, self.micro + self.config.grad_accum)  # this step's global batches
            marks["tokens"].append(sum(len(self.train_samples[j]) for i in indices for j in self.order.indices(i)))
            return lr

    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "dates.jsonl")
        write_jsonl(data, make_dataset(512, seed=1))  # the same file in every process (a fixed seed)
        config = parse_run_config(run_config_raw(args, data, os.path.join(tmp, "out")), "bench")
        trainer_module.Trainer = TimedTrainer  # run() imports the class from this module when called
        try:
            history = run(config)
        finally:
            trainer_module.Trainer = base
    steps, tokens = marks["steps"], marks["tokens"]
    trainer = marks["trainer"]
    result = {"rank": trainer.world.rank, "world_size": trainer.world.size, "strategy": trainer.parallel.strategy,
              "threads": torch.get_num_threads(), "tokens_per_step": tokens,
              "tokens_per_s": sum(tokens[1:]) / (steps[-1] - steps[0]), "losses": [h["loss"] for h in history],
              "peak_rss_mib": peak_rss_mib(), "rss_end_mib": rss_mib(), "base_mib": local_bytes(trainer.model) / 2**20,
              "adapter_mib": local_bytes(trainer.model, trainable=True) / 2**20}
    with open(f"{args.child_out}.rank{result['rank']}", "w") as f:
        json.dump(result, f)


# -- parent ----------------------------------------------------------------------------------------
def child_command(args: argparse.Namespace, nproc: int, strategy: str, out: str, threads: int) -> list[str]:
    flags = ["--child", "--child-out", out, *(["--model", args.model] if args.model else []),
             "--strategy", strategy, "--quant", args.quant,
             "--max-steps", str(args.max_steps), "--batch-size", str(args.batch_size),
             "--max-seq-length", str(args.max_seq_length), "--threads", str(threads)]
    script = os.path.abspath(__file__)
    if nproc == 1:
        return [sys.executable, script, *flags]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", script, *flags]


def measure(args: argparse.Namespace, nproc: int, strategy: str, threads: int | None = None) -> list[dict]:
    """One run of `nproc` processes of `threads` torch threads each (default: the cores shared out)."""
    from bench.common import children_cpu_seconds, machine_busy_seconds

    threads = threads or max(1, args.cores // nproc)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads)}
    busy0, child0, wall0 = machine_busy_seconds(), children_cpu_seconds(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        print(f"[{nproc} process(es), {strategy}] running ...", file=sys.stderr, flush=True)
        subprocess.run(child_command(args, nproc, strategy, out, threads), check=True, env=env, cwd=ROOT)
        ranks = []
        for r in range(nproc):
            with open(f"{out}.rank{r}") as f:
                ranks.append(json.load(f))
    foreign = (machine_busy_seconds() - busy0) - (children_cpu_seconds() - child0)
    ranks[0]["other_load"] = max(0.0, foreign) / ((time.perf_counter() - wall0) * (os.cpu_count() or 1))
    return ranks


def per_rank(ranks: list[dict], key: str, digits: int) -> str:
    return " / ".join(f"{r[key]:.{digits}f}" for r in ranks)


def report(runs: dict[str, list[dict]], machine: dict, args: argparse.Namespace) -> str:
    one = runs["1 process"][0]["tokens_per_s"]
    rows = ["| run | processes x threads | train tokens/s | vs 1 process | peak RSS per process (MiB) | "
            "RSS at the end (MiB) | base held per process (MiB) | adapter held per process (MiB) | other load |",
            "|---|---|---:|---:|---|---|---|---|---:|"]
    for name, ranks in runs.items():
        r0 = ranks[0]
        rows.append(f"| {name} | {r0['world_size']} x {r0['threads']} | {r0['tokens_per_s']:.0f} | "
                    f"{r0['tokens_per_s'] / one:.2f} | {per_rank(ranks, 'peak_rss_mib', 0)} | "
                    f"{per_rank(ranks, 'rss_end_mib', 0)} | "
                    f"{per_rank(ranks, 'base_mib', 1)} | {per_rank(ranks, 'adapter_mib', 2)} | {r0['other_load']:.0%} |")
    model = "a toy model (--smoke: the numbers mean nothing)" if args.smoke else args.model
    settings = (f"{model or 'bundled SmolLM2-135M-Instruct'}, quant={args.quant}, fp32 on CPU, LoRA r=16 all-linear, global "
                f"batch {args.batch_size} (each of 2 processes {args.batch_size // 2}), max_seq_length "
                f"{args.max_seq_length}, {args.max_steps} steps (tokens/s over steps 2..N), demo task data")
    machine_line = (f"{machine['cpu']}, {machine['cores']} cores used of {os.cpu_count()}; python {machine['python']}, "
                    f"torch {machine['torch']}, transformers {machine['transformers']}; {machine['date']}")
    return "\n".join([f"machine: {machine_line}", f"settings: {settings}", *rows])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="HF folder or .gguf (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--quant", choices=["none", "nf4"], default="none")
    parser.add_argument("--strategies", default="ddp,fsdp")
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--one-thread", action="store_true",
                        help="also run 1 process of 1 thread (on a loaded machine a process of several threads "
                             "waits for its slowest one at every op; a process of one thread does not)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--smoke", action="store_true",
                        help="check the script in seconds: a random toy model of SmolLM2's family (unless --model), "
                             "and unless given, --max-steps 2 --max-seq-length 64; the numbers mean nothing")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:  # toy sizes as defaults: flags given explicitly still win
        parser.set_defaults(max_steps=2, max_seq_length=64)
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return
    sys.path.insert(0, ROOT)
    from bench.common import machine_info, toy_model_folder

    if args.smoke and args.model is None:
        args.model = toy_model_folder()
    runs = {"1 process": measure(args, 1, "auto")}
    if args.one_thread and args.cores > 1:  # the same work on one core: no thread of its own kept waiting
        runs["1 process, 1 thread"] = measure(args, 1, "auto", threads=1)
    for strategy in args.strategies.split(","):
        runs[f"2 processes, {strategy}"] = measure(args, 2, strategy)
    machine = machine_info()
    print(report(runs, machine, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
