"""Seconds and peak memory of `lorafit export` for the bundled SmolLM2-135M with a LoRA adapter.

    python bench/export.py [--outtypes f16,q8_0] [--rank 16] [--repeat 1] [--model M] [--json out.json]
    python bench/export.py --smoke    # a toy model of the same family: checks the script in seconds

Each export runs in a fresh interpreter (so one's heap does not inflate the next one's peak) and does
what `lorafit export --adapter A --outtype T` does: load the base, load the adapter (r=16 on every
projection, random B so the merge is real), merge exactly in fp32, write the GGUF. Reported per
outtype: load + merge seconds, write seconds (encode + quantize + write, with the progress bar),
total, the file size, and the process's peak resident memory (VmHWM) over the whole run and up to the
write (loading peaks above the model's size; the streamed write should add little), next to the fp32
model's size.
The machine is printed first; numbers on a busy machine are slower, and `other load` says how busy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def child(model_name: str, outtype: str, adapter: str, out: str, result: str) -> None:
    import torch

    from bench.common import peak_rss_mib
    from lorafit.export import export_gguf
    from lorafit.io import load_adapter
    from lorafit.merge import merge_to_dense
    from lorafit.model import load_model

    t0 = time.perf_counter()
    model, tokenizer = load_model(model_name)
    load_adapter(model, adapter)
    merge_to_dense(model, torch.float32)
    t1 = time.perf_counter()
    peak_before_write = peak_rss_mib()
    export_gguf(model, tokenizer, out, outtype)
    t2 = time.perf_counter()
    params = sum(p.numel() for p in model.parameters())
    Path(result).write_text(json.dumps({"load_merge_s": t1 - t0, "write_s": t2 - t1, "file_mib": os.path.getsize(out) / 2**20,
                                        "peak_rss_mib": peak_rss_mib(), "peak_before_write_mib": peak_before_write,
                                        "fp32_model_mib": params * 4 / 2**20}))


def make_adapter(model_name: str, folder: Path, rank: int) -> None:
    import torch

    import lorafit as lf
    from lorafit.io import save_adapter
    from lorafit.model import load_model

    model, _ = load_model(model_name)
    lf.apply_lora(model, lf.LoraConfig(r=rank, alpha=rank))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)
    save_adapter(model, folder)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--outtypes", default="f16,q8_0")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=1, help="runs per outtype; the fastest is reported")
    ap.add_argument("--model", help="HF folder or .gguf (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--json", help="also write every run's numbers and the machine here")
    ap.add_argument("--smoke", action="store_true",
                    help="check the script in seconds: a random toy model of SmolLM2's family unless --model is "
                         "given; the numbers mean nothing")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)  # model outtype adapter out result
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(*args.child)
        return

    from bench.common import (
        children_cpu_seconds,
        machine_busy_seconds,
        machine_info,
        toy_model_folder,
        write_json,
    )
    from lorafit.model import DEFAULT_MODEL, resolve_model

    info = machine_info()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        name = args.model or DEFAULT_MODEL
        if args.smoke and args.model is None:
            args.model, name = toy_model_folder(), "a toy model (--smoke: the numbers mean nothing)"
        model = str(resolve_model(args.model))  # a GGUF -> safetensors conversion happens once, not inside a timing
        make_adapter(model, Path(tmp) / "adapter", args.rank)
        print(f"{name} + LoRA r={args.rank} on every projection -> GGUF, each in a fresh process\n")
        print(f"{'outtype':>8} {'load+merge s':>13} {'write s':>8} {'total s':>8} {'file MiB':>9} {'peak RSS MiB':>13} "
              f"{'(before write)':>14} {'other load':>10}")
        for outtype in args.outtypes.split(","):
            runs = []
            for i in range(args.repeat):
                result = Path(tmp) / f"{outtype}-{i}.json"
                busy0, child0, wall0 = machine_busy_seconds(), children_cpu_seconds(), time.perf_counter()
                subprocess.run([sys.executable, __file__, "--child", model, outtype, str(Path(tmp) / "adapter"),
                                str(Path(tmp) / f"m-{outtype}.gguf"), str(result)], check=True, env=env)
                r = json.loads(result.read_text())
                foreign = (machine_busy_seconds() - busy0) - (children_cpu_seconds() - child0)
                r["other_load"] = max(0.0, foreign) / ((time.perf_counter() - wall0) * (os.cpu_count() or 1))
                runs.append(r)
            r = min(runs, key=lambda x: x["load_merge_s"] + x["write_s"])
            results[outtype] = {"best": r, "runs": runs}
            print(f"{outtype:>8} {r['load_merge_s']:13.1f} {r['write_s']:8.1f} {r['load_merge_s'] + r['write_s']:8.1f} "
                  f"{r['file_mib']:9.0f} {r['peak_rss_mib']:13.0f} {r['peak_before_write_mib']:14.0f} "
                  f"{100 * r['other_load']:9.0f}%")
        print(f"\n(the fp32 model itself: {r['fp32_model_mib']:.0f} MiB)")
    if args.json:
        write_json(args.json, {"machine": info, "args": vars(args), "results": results}, indent=2)


if __name__ == "__main__":
    main()
