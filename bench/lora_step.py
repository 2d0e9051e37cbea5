"""One LoRA training step, lorafit vs PEFT, on CPU: throughput and peak memory side by side.

What is measured: a full training step (zero_grad, forward with the causal-LM loss, backward,
AdamW step over the adapter parameters only) on a SmolLM2-135M-shaped LlamaForCausalLM built from
config with random fp32 weights and SDPA attention; LoRA r=16, alpha=16, dropout 0 on every linear
layer of the blocks (q, k, v, o, gate, up, down; not lm_head); default batch 4 x 256 tokens.
Reported per side: tokens/s and step time (medians over the timed steps, after warmup), peak RSS
of the process, and the step overhead (peak RSS minus the RSS once model, adapters, optimizer and
batch exist, i.e. activations, gradients, optimizer state and allocator slack of training).

Why it is fair:
- each side runs in its own fresh subprocess (this script with --side), one after the other, so
  neither inherits the other's heap and ru_maxrss is that side's own peak;
- both build the same base weights (same seed), train on the same token batch, with the same
  number of intra-op threads, the same optimizer and learning rate;
- the adapters start identical: after injection every lora_A is refilled from one seeded
  generator in module-path order (kaiming-uniform bounds, as both libraries use), B stays zero.
  So the first-step losses must agree exactly (B = 0 makes the update vanish) and later losses to
  float rounding; the parent prints both and flags a mismatch, which proves both sides did the
  same computation rather than one of them skipping work.

The per-side model is made in two steps, `build_base` then `add_lora`, so that a quantized mode
(--quant nf4: lorafit's NF4 base vs a bitsandbytes Linear4bit base under PEFT) only needs a new
branch in `build_base`; injection, timing and reporting stay as they are.

    HF_HUB_OFFLINE=1 python bench/lora_step.py [--steps 5 --warmup 2 --json out.json]
    python bench/lora_step.py --smoke    # the same family at toy size, 1 + 1 steps of 32 tokens: checks the script
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time

SIDES = ("lorafit", "peft")
QUANT_MODES = ("none", "nf4")
CHILD_FLAGS = ("steps", "warmup", "batch", "seq", "rank", "threads", "seed", "lr", "quant", "smoke")  # passed on to each side


# -- child: build one side's model ----------------------------------------------------------------
def build_base(side: str, quant: str, seed: int, smoke: bool = False):
    """The frozen base model for one side. Both sides get the same fp32 weights from the same seed.
    SmolLM2-135M's shape, or with `smoke` its toy twin (bench.common.SMOLLM2_TOY).

    "nf4": lorafit swaps its linears for its own NF4 layers (lorafit.quant.quantize_model); PEFT's
    side gets bitsandbytes Linear4bit layers (nf4, double quant, fp32 compute), which is what
    BitsAndBytesConfig(load_in_4bit=True) builds. Both quantize the same fp32 weights to the same bytes.
    """
    from bench.common import SMOLLM2_TOY, build_smollm2_shaped

    model = build_smollm2_shaped(seed, SMOLLM2_TOY if smoke else None)
    if quant == "none":
        return model
    if side == "lorafit":
        from lorafit.quant.apply import quantize_model

        return quantize_model(model, "nf4")
    import torch

    from bench.common import bnb_nf4_linears

    return bnb_nf4_linears(model, torch.float32)


def add_lora(side: str, model, rank: int):
    """Inject LoRA (alpha = rank, dropout 0, all linear layers but lm_head) the way each library's
    user would. Returns (model to call, trainable parameters, {module path: lora_A weight})."""
    if side == "lorafit":
        import lorafit as lf
        from lorafit.lora.layer import LoraLayer
        from lorafit.train.config import TrainConfig
        from lorafit.train.prepare import prepare_model

        # what lorafit's Trainer does with its default settings (fused LoRA Function, GatedMLP)
        prepare_model(model, TrainConfig(lora=lf.LoraConfig(r=rank, alpha=rank, dropout=0.0,
                                                            target_modules="all-linear")))
        lora_A = {path: m.lora_A["default"] for path, m in model.named_modules() if isinstance(m, LoraLayer)}
        return model, lf.adapter_parameters(model), lora_A

    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules="all-linear",
                        bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    prefix = "base_model.model."  # PEFT's wrappers; strip them so paths match lorafit's
    lora_A = {path.removeprefix(prefix): m.lora_A["default"].weight
              for path, m in model.named_modules() if isinstance(m, LoraLayer)}
    return model, [p for p in model.parameters() if p.requires_grad], lora_A


def align_lora_A(lora_A: dict, seed: int) -> None:
    """Refill every A (r, in) from one generator in path order: U(-1/sqrt(in), 1/sqrt(in)), which
    is kaiming_uniform(a=sqrt(5)), both libraries' default. Identical adapters on both sides."""
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for path in sorted(lora_A):
            A = lora_A[path]
            bound = 1.0 / math.sqrt(A.shape[1])
            A.copy_(torch.rand(A.shape, generator=generator, dtype=A.dtype) * (2 * bound) - bound)


def make_batch(seed: int, batch: int, seq: int, vocab: int):
    import torch

    generator = torch.Generator().manual_seed(seed + 2)
    return torch.randint(0, vocab, (batch, seq), generator=generator)


def step_loss(side: str, model, input_ids):
    """Each library's own training loss: lorafit's trainer computes it from the last hidden states
    in chunks (lorafit.train.trainer.token_loss_sum); a PEFT user gets transformers' loss on full logits."""
    if side == "lorafit":
        import torch

        from lorafit.train.trainer import token_loss_sum

        batch = {"input_ids": input_ids, "labels": input_ids, "attention_mask": torch.ones_like(input_ids),
                 "position_ids": torch.arange(input_ids.shape[1]).expand_as(input_ids)}
        loss_sum, n = token_loss_sum(model, batch)
        return loss_sum / n
    return model(input_ids=input_ids, labels=input_ids).loss


# -- child: time the step -------------------------------------------------------------------------
def run_side(args: argparse.Namespace) -> dict:
    """Build one side, run warmup + timed steps, return its numbers (the child's whole job)."""
    import torch

    from bench.common import median, peak_rss_mib, rss_mib

    torch.set_num_threads(args.threads)
    model = build_base(args.side, args.quant, args.seed, args.smoke)
    model.train()
    rss_model = rss_mib()
    model, params, lora_A = add_lora(args.side, model, args.rank)
    align_lora_A(lora_A, args.seed)
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    input_ids = make_batch(args.seed, args.batch, args.seq, model.config.vocab_size)
    gc.collect()
    rss_ready = rss_mib()
    peak_before_steps = peak_rss_mib()

    step_times, cpu_times, losses = [], [], []
    for _ in range(args.warmup + args.steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        loss = step_loss(args.side, model, input_ids)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        step_times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - start_cpu)

    step_s = median(step_times[args.warmup:])
    peak = peak_rss_mib()
    return {
        "side": args.side,
        "quant": args.quant,
        "adapted_modules": len(lora_A),
        "trainable_params": sum(p.numel() for p in params),
        "threads": torch.get_num_threads(),
        "step_s": step_s,
        "step_s_min": min(step_times[args.warmup:]),
        "cpu_s": median(cpu_times[args.warmup:]),  # CPU seconds of all threads: less sensitive to a busy machine
        "step_s_all": step_times,
        "cpu_s_all": cpu_times,
        "tokens_per_s": args.batch * args.seq / step_s,
        "losses": losses,
        "rss_model_mib": rss_model,
        "rss_ready_mib": rss_ready,
        "peak_before_steps_mib": peak_before_steps,
        "peak_rss_mib": peak,
        "step_overhead_mib": peak - rss_ready,
    }


# -- parent: launch both sides, compare ---------------------------------------------------------
def launch(side: str, args: argparse.Namespace) -> dict:
    """Run this script with --side in a fresh interpreter; the child writes its JSON to a file.

    Also measures how busy the rest of the machine was meanwhile (CPU used by anything but the
    child, as a share of all cores): a neighbour's load slows one side and not the other."""
    from bench.common import run_side_in_child

    return run_side_in_child(__file__, side, {flag: getattr(args, flag) for flag in CHILD_FLAGS}, child_env(args))


def child_env(args: argparse.Namespace) -> dict[str, str]:
    """Same environment for both children; the repository root on sys.path for `bench.common`."""
    env = dict(os.environ)
    if args.malloc_mmap_threshold is not None:  # fixed threshold: big frees go straight back to the OS
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def loss_check(results: dict[str, dict]) -> list[str]:
    """First-step losses must match (same weights, B = 0); the last ones to float rounding."""
    a, b = results["lorafit"]["losses"], results["peft"]["losses"]
    lines = []
    for label, i, tol in (("first step", 0, 1e-5), ("last step", -1, 1e-4)):
        diff = abs(a[i] - b[i])
        verdict = "ok" if diff <= tol * max(1.0, abs(b[i])) else "MISMATCH"
        lines.append(f"loss, {label}: lorafit {a[i]:.7f}  peft {b[i]:.7f}  |diff| {diff:.1e}  {verdict}")
    return lines


def report(results: dict[str, dict], machine: dict, args: argparse.Namespace) -> str:
    """The markdown table plus machine and settings, as printed and as pasted into RESULTS.md."""
    header = "| side | tokens/s | step time (s) | peak RSS (MiB) | step overhead (MiB) |"
    rows = [header, "|---|---:|---:|---:|---:|"]
    for side in SIDES:
        r = results[side]
        rows.append(f"| {side} | {r['tokens_per_s']:.0f} | {r['step_s']:.3f} | "
                    f"{r['peak_rss_mib']:.0f} | {r['step_overhead_mib']:.0f} |")
    lf, pf = results["lorafit"], results["peft"]
    rows.append(f"| lorafit / PEFT | {lf['tokens_per_s'] / pf['tokens_per_s']:.3f} | "
                f"{lf['step_s'] / pf['step_s']:.3f} | {lf['peak_rss_mib'] / pf['peak_rss_mib']:.3f} | "
                f"{lf['step_overhead_mib'] / pf['step_overhead_mib']:.3f} |")
    model = "a toy model (--smoke: the numbers mean nothing)" if args.smoke else "SmolLM2-135M's shape"
    settings = (f"{model}, batch {args.batch} x {args.seq} tokens, r={args.rank}, alpha={args.rank}, dropout 0, "
                f"all-linear ({lf['adapted_modules']} modules, {lf['trainable_params']:,} trainable params; "
                f"PEFT {pf['adapted_modules']} / {pf['trainable_params']:,}), fp32, quant={args.quant}, "
                f"AdamW lr={args.lr}, {args.threads} threads, median of {args.steps} steps after "
                f"{args.warmup} warmup, MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold or 'glibc default'}")
    machine_line = (f"{machine['cpu']}, {machine['cores']} cores; python {machine['python']}, "
                    f"torch {machine['torch']}, transformers {machine['transformers']}, "
                    f"peft {machine['peft']}; {machine['date']}")
    load = ", ".join(f"{s} {results[s]['other_load']:.0%}" for s in SIDES)
    busy = any(results[s]["other_load"] > 0.05 for s in SIDES)
    load_line = (f"Other load on the machine during each side (share of all cores): {load}"
                 + ("  WARNING: busy machine, timings are not trustworthy" if busy else ""))
    memory = "; ".join(f"{s}: model {results[s]['rss_model_mib']:.0f}, ready {results[s]['rss_ready_mib']:.0f}, "
                       f"peak before steps {results[s]['peak_before_steps_mib']:.0f} MiB" for s in SIDES)
    lines = [f"Machine: {machine_line}", f"Settings: {settings}", "", *rows, "",
             "Min step time (s): " + ", ".join(f"{s} {results[s]['step_s_min']:.3f}" for s in SIDES),
             f"RSS detail: {memory}", load_line, *loss_check(results)]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps per side (median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (allocator, thread pool, Adam state)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank; alpha is set equal to it")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--quant", choices=QUANT_MODES, default="none", help="base weight format")
    p.add_argument("--malloc-mmap-threshold", type=int, metavar="BYTES",
                   help="glibc MALLOC_MMAP_THRESHOLD_ for both children (e.g. 65536): peak RSS then tracks "
                        "live tensors rather than heap the allocator kept")
    p.add_argument("--json", metavar="PATH", help="also write all results (both sides, machine) here")
    p.add_argument("--smoke", action="store_true",
                   help="check the script in seconds: SmolLM2's family at toy size, and unless given, --steps 1 "
                        "--warmup 1 --seq 32; the numbers mean nothing")
    p.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # child mode
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:  # toy sizes as defaults: flags given explicitly still win
        p.set_defaults(steps=1, warmup=1, seq=32)
        args = p.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from bench.common import machine_info, write_json

    if args.side:  # child: one side, numbers to a file
        write_json(args.child_out, run_side(args))
        return

    machine = machine_info()
    results = {side: launch(side, args) for side in SIDES}
    print(report(results, machine, args))
    if args.json:
        write_json(args.json, {"machine": machine, "args": vars(args), "results": results}, indent=2)


if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a file: make `bench.common` importable
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
