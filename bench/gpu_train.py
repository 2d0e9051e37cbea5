"""QLoRA training throughput on one GPU: lorafit vs transformers + PEFT + bitsandbytes, side by side.

    python bench/gpu_train.py                       # 1B and 8B Llama shapes, seq 2048, batch 4
    python bench/gpu_train.py --shapes 1b --steps 10 --batch 8
    python bench/gpu_train.py --probe               # first find the largest batch each side fits
    python bench/gpu_train.py --dry-run             # CPU, tiny shape: checks the script end to end (or --smoke)

Both sides train the same thing: a Llama-architecture model built from its config (random weights,
bf16), every linear layer except the head frozen in 4-bit NF4 with double-quantized statistics
(blocksize 64), LoRA r=16 alpha=16 on all of them (fp32 adapters), per-layer gradient checkpointing,
AdamW, next-token loss on random tokens.

* lorafit: lorafit.quant.quantize_model (NF4) + `lorafit.train.prepare.prepare_model` with the
  Trainer's defaults (fused LoRA Function, GatedMLP, Triton RMSNorm and SwiGLU on CUDA) and gradient
  checkpointing, + the chunked loss (lorafit.ops.chunked_loss) from the last hidden states: what
  `lorafit train` runs.
* peft: bitsandbytes Linear4bit (nf4, double quant, bf16 compute: what BitsAndBytesConfig(load_in_4bit)
  builds) + peft.get_peft_model + transformers' checkpointing + the model's own loss, under bf16
  autocast (what the HF Trainer does with bf16=True; without it PEFT runs its LoRA matmuls in fp32).

Each side runs in its own subprocess (a fresh CUDA context, so peak memory is its own), both at the same
batch (`--batch`; `--probe` first finds the largest batch each side fits by doubling, then uses the
largest both fit). Reported per side: tokens/s, peak torch.cuda.max_memory_allocated (and for lorafit
the estimate of `lorafit estimate` for the same setup, when the estimator offers one), and MFU:

    MFU = model FLOPs per second / measured bf16 matmul peak
    model FLOPs per token = 6 N + 12 L H T    (N = parameters of the linear layers incl. the head,
                                                L layers, H hidden size, T sequence length; PaLM's count)

(6N is the full-finetune convention; a frozen base skips weight gradients but checkpointing adds a
forward, so the hardware FLOPs are also about 6N.) The peak is measured here with large bf16 matmuls,
and the device copy bandwidth with a large device-to-device copy; NF4 dequantization throughput of
lorafit's Triton kernel and of bitsandbytes' dequantize_4bit is reported against it (bytes read +
bytes written per second).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    # Llama 3.2 1B and Llama 3 8B, as configs (no weights are downloaded).
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
}
RANK = 16


# -- one side (runs in its own subprocess) --------------------------------------------------------------


def _config(shape: str, seq: int):
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape], max_position_embeddings=max(seq, 128), use_cache=False,
                       attn_implementation="sdpa")


def _random_model(cls, shape: str, seq: int, device: torch.device, dtype: torch.dtype):
    """The model with random weights, created directly in `dtype` on `device` (no fp32 copy)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            return cls(_config(shape, seq))
    finally:
        torch.set_default_dtype(previous)


def _build_lorafit(shape: str, seq: int, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaForCausalLM

    import lorafit as lf
    from lorafit.ops.chunked_loss import causal_lm_loss
    from lorafit.quant.apply import quantize_model
    from lorafit.train.config import TrainConfig
    from lorafit.train.prepare import prepare_model

    model = _random_model(LlamaForCausalLM, shape, seq, device, dtype)
    quantize_model(model, compute_dtype=dtype)
    # what the Trainer does with its defaults (checkpointing is on by default for a GPU model; the CPU
    # dry run sets it so that the same code path runs)
    prepare_model(model, TrainConfig(lora=lf.LoraConfig(r=RANK, alpha=RANK, target_modules="all-linear"),
                                     gradient_checkpointing=True))
    model.train()

    def loss_fn(ids: torch.Tensor) -> torch.Tensor:
        hidden = model.model(input_ids=ids).last_hidden_state  # (B, T, H)
        return causal_lm_loss(hidden, model.lm_head.weight, ids, reduction="mean")

    return model, loss_fn


def _build_peft(shape: str, seq: int, device: torch.device, dtype: torch.dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from bench.common import bnb_nf4_linears  # the children run with the repository root on PYTHONPATH

    model = _random_model(LlamaForCausalLM, shape, seq, device, dtype)
    bnb_nf4_linears(model, dtype, device)  # what BitsAndBytesConfig(load_in_4bit=True, bf16 compute) builds
    for p in model.parameters():
        p.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=RANK, target_modules="all-linear",
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    model.train()

    def loss_fn(ids: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            return model(input_ids=ids, labels=ids).loss

    return model, loss_fn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _try_steps(model, loss_fn, opt, batch: int, seq: int, vocab: int, steps: int,
               device: torch.device) -> dict:
    """Run `steps` timed optimizer steps after one warm-up; {"ok": False} on out-of-memory."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        times, losses = [], []
        for i in range(steps + 1):
            _sync(device)
            start = time.perf_counter()
            loss = loss_fn(ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            if i:  # the first step warms up kernels and allocator
                times.append(time.perf_counter() - start)
            losses.append(loss.item())
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
        return {"ok": True, "batch": batch, "tokens_per_s": batch * seq * len(times) / sum(times),
                "step_s": sum(times) / len(times), "peak_gib": peak / 2**30, "loss": losses[-1]}
    except torch.OutOfMemoryError:
        opt.zero_grad(set_to_none=True)
        return {"ok": False, "batch": batch}


def run_side(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    dtype = torch.bfloat16
    torch.manual_seed(0)
    build = _build_lorafit if args.side == "lorafit" else _build_peft
    model, loss_fn = build(args.shape, args.seq, device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    # both sides: torch's AdamW, fused on CUDA (lorafit's Trainer does so; so does the HF Trainer's
    # default "adamw_torch_fused" on recent transformers)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True if device.type == "cuda" else None)
    vocab = SHAPES[args.shape]["vocab_size"]
    if args.batch:  # 0: probe
        result = _try_steps(model, loss_fn, opt, args.batch, args.seq, vocab, args.steps, device)
    else:  # probe: double until out of memory, report the largest that fit
        result, batch = {"ok": False, "batch": 0}, 1
        while batch <= args.max_batch:
            r = _try_steps(model, loss_fn, opt, batch, args.seq, vocab, 1, device)
            if not r["ok"]:
                break
            result, batch = r, batch * 2
    result["trainable"] = sum(p.numel() for p in params)
    if args.side == "lorafit" and result.get("ok"):
        try:  # what `lorafit estimate --device cuda` predicts for this very setup
            from lorafit.train.estimate import peak_allocated

            result["estimate_gib"] = peak_allocated(model.config, result["batch"], args.seq, RANK) / 2**30
        except Exception as e:  # noqa: BLE001 - report, do not fail the benchmark
            result["estimate_error"] = repr(e)
    print("RESULT " + json.dumps(result), flush=True)


def _side(side: str, args: argparse.Namespace, shape: str, batch: int | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--shape", shape, "--seq", str(args.seq),
           "--steps", str(args.steps), "--device", args.device, "--max-batch", str(args.max_batch),
           "--batch", str(batch or 0)]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"ok": False, "error": (proc.stderr or proc.stdout).strip().splitlines()[-5:]}


# -- device measurements (main process) -----------------------------------------------------------------


def _time(fn, device: torch.device, reps: int) -> float:
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / reps


def matmul_peak_tflops(device: torch.device, n: int) -> float:
    """Measured bf16 matmul throughput (TFLOP/s) on n x n x n products."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / _time(lambda: a @ b, device, 10 if device.type == "cuda" else 2) / 1e12


def copy_gbps(device: torch.device, nbytes: int) -> float:
    """Device-to-device copy bandwidth, GB/s (bytes read + bytes written)."""
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    return 2 * nbytes / _time(lambda: y.copy_(x), device, 20) / 1e9


def dequant_gbps(device: torch.device, rows: int, cols: int) -> dict[str, float]:
    """NF4 -> bf16 dequantization throughput, GB/s of (packed + statistics read, bf16 written)."""
    from lorafit.quant.nf4 import quantize_nf4

    w = torch.randn(rows, cols, device=device, dtype=torch.bfloat16) * 0.02
    t = quantize_nf4(w)
    moved = t.nbytes() + w.numel() * 2
    out = {}
    if device.type == "cuda":
        from lorafit.quant.reference import nf4_levels
        from lorafit.quant.triton.nf4_dequant import LAYOUT, dequantize_4bit_triton

        stats = {k: (float(v) if k == "offset" else v) for k, v in t.stats().items()}
        for layout in ("elements", "bytes"):  # both layouts of the kernel; LAYOUT is lorafit's default
            def run(layout=layout):
                return dequantize_4bit_triton(t.packed, t.shape, t.blocksize, torch.bfloat16,
                                              nf4_levels(device), layout=layout, **stats)
            key = f"lorafit_triton_{layout}" + (" (default)" if layout == LAYOUT else "")
            out[key] = moved / _time(run, device, 20) / 1e9
        try:
            import bitsandbytes.functional as bf

            packed, state = bf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            out["bitsandbytes"] = moved / _time(lambda: bf.dequantize_4bit(packed, state), device, 20) / 1e9
        except Exception as e:  # noqa: BLE001 - report, do not fail the benchmark
            out["bitsandbytes_error"] = repr(e)
    out["lorafit_reference"] = moved / _time(lambda: t.dequantize(torch.bfloat16, backend="torch"), device, 3) / 1e9
    return out


def model_flops_per_token(shape: str, seq: int) -> float:
    s = SHAPES[shape]
    h, inter, layers, v = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    kv = h // s["num_attention_heads"] * s["num_key_value_heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * inter  # q, o, k, v, gate/up/down
    n = layers * per_layer + v * h  # + the head
    return 6 * n + 12 * layers * h * seq


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1b,8b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side (after one warm-up step)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step, the same for both sides")
    parser.add_argument("--probe", action="store_true", help="find each side's largest batch first (slow)")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", help="also write every number to this file")
    parser.add_argument("--dry-run", "--smoke", action="store_true", help="CPU, tiny shape, 1 step: checks the script")
    parser.add_argument("--side", choices=["lorafit", "peft"], help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        return run_side(args)
    if args.dry_run:
        args.shapes, args.seq, args.steps, args.device, args.max_batch, args.batch = "tiny", 32, 1, "cpu", 2, 1
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.exit(2, f"bench/gpu_train.py: --device {args.device}, but torch {torch.__version__} sees no CUDA GPU "
                       "here; run it on a GPU machine, or with --dry-run to check the script on the CPU\n")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    print(f"device: {name}   date: {datetime.datetime.now().isoformat(timespec='seconds')}   "
          f"torch {torch.__version__}", flush=True)
    big = device.type == "cuda"
    peak = matmul_peak_tflops(device, 8192 if big else 256)
    copy = copy_gbps(device, 2**30 if big else 2**22)
    print(f"bf16 matmul peak (measured): {peak:.4g} TFLOP/s   device copy: {copy:.4g} GB/s (read + write)")
    deq = dequant_gbps(device, 8192 if big else 128, 8192 if big else 128)
    print("NF4 dequant -> bf16, GB/s: " + ", ".join(
        f"{k} {v:.4g} ({100 * v / copy:.0f}% of copy)" if isinstance(v, float) else f"{k} {v}"
        for k, v in deq.items()), flush=True)
    report = {"device": name, "torch": torch.__version__, "matmul_peak_tflops": peak, "copy_gbps": copy,
              "dequant_gbps": deq, "seq": args.seq, "shapes": {}}
    for shape in args.shapes.split(","):
        batch = args.batch
        if args.probe:
            probes = {side: _side(side, args, shape, None) for side in ("lorafit", "peft")}
            fits = [p["batch"] for p in probes.values() if p.get("ok")]
            print(f"[{shape}] largest batch: " + ", ".join(
                f"{s} {p['batch'] if p.get('ok') else 'failed: ' + str(p.get('error'))}" for s, p in probes.items()))
            if not fits:
                continue
            batch = min(fits)
        flops = model_flops_per_token(shape, args.seq)
        print(f"[{shape}] seq {args.seq}, batch {batch}, {args.steps} timed steps per side", flush=True)
        print(f"  {'side':8} {'tokens/s':>10} {'step s':>8} {'peak GiB':>9} {'est. GiB':>9} {'MFU':>6} {'loss':>8}")
        rows = {}
        for side in ("lorafit", "peft"):
            r = rows[side] = _side(side, args, shape, batch)
            if not r.get("ok"):
                print(f"  {side:8} failed: {r.get('error')}", flush=True)
                continue
            r["mfu"] = r["tokens_per_s"] * flops / (peak * 1e12)
            est = f"{r['estimate_gib']:9.2f}" if r.get("estimate_gib") else f"{'-':>9}"
            print(f"  {side:8} {r['tokens_per_s']:10.0f} {r['step_s']:8.3f} {r['peak_gib']:9.2f} {est} "
                  f"{100 * r['mfu']:5.1f}% {r['loss']:8.3f}", flush=True)
        if all(r.get("ok") for r in rows.values()):
            speed = rows["lorafit"]["tokens_per_s"] / rows["peft"]["tokens_per_s"]
            memory = rows["lorafit"]["peak_gib"] / max(rows["peft"]["peak_gib"], 1e-9)  # 0 on the CPU
            print(f"  lorafit / peft: {speed:.2f}x tokens/s (target >= 2), {memory:.2f}x peak memory (target <= 0.6)")
        report["shapes"][shape] = {"batch": batch, "flops_per_token": flops, **rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return None


if __name__ == "__main__":
    main()
