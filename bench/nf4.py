"""NF4 quantize/dequantize throughput, lorafit vs bitsandbytes, on the same tensors.

Prints the machine (on CPU also lorafit's backend: its C kernel or the PyTorch fallback), then for each
shape parameters/s and GB/s (bytes of the dense fp32 tensor) and the lorafit/bitsandbytes speed ratio;
on CUDA it also prints the measured device copy bandwidth as the limit.
Run: python bench/nf4.py [--repeat N] [--device cpu|cuda] [--json out.json]
     python bench/nf4.py --smoke    # one toy shape, 1 repeat: checks the script in a second
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from lorafit.quant.nf4 import quantize_nf4

SHAPES = [(576, 1536), (2048, 2048), (4096, 4096)]  # SmolLM2-135M's MLP, then 2k and 4k square layers
TOY_SHAPES = [(64, 128)]


def _best(fn, repeat: int, sync) -> float:
    fn()  # warm-up (and compile, for the fused path)
    sync()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="default: cuda when there is a GPU, else cpu")
    ap.add_argument("--json", help="also write every row here")
    ap.add_argument("--smoke", action="store_true",
                    help=f"check the script in a second: shape {TOY_SHAPES[0]} only and unless given, --repeat 1")
    args = ap.parse_args(argv)
    if args.smoke:  # toy sizes as defaults: flags given explicitly still win
        ap.set_defaults(repeat=1)
        args = ap.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import bitsandbytes.functional as bnb

    from bench.common import cpu_model, write_json

    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    print(f"date {time.strftime('%Y-%m-%d %H:%M')}  torch {torch.__version__}  device {dev}")
    print(f"cpu {cpu_model()}  cores {os.cpu_count()}  torch threads {torch.get_num_threads()}")
    from lorafit.quant.backend import describe

    print(f"lorafit NF4 backend on {dev.type}: {describe(dev)}")
    if dev.type == "cuda":
        x = torch.empty(1 << 28, dtype=torch.uint8, device=dev)
        t = _best(lambda: x.clone(), args.repeat, sync)
        print(f"gpu {torch.cuda.get_device_name(dev)}  measured copy bandwidth {2 * x.numel() / t / 1e9:.0f} GB/s")
    print(f"{'shape':>14} {'op':>6} {'lorafit Mp/s':>13} {'GB/s':>6} {'bnb Mp/s':>10} {'GB/s':>6} {'ratio':>6}")
    table = []
    for shape in TOY_SHAPES if args.smoke else SHAPES:
        torch.manual_seed(0)
        w = torch.randn(shape, device=dev)
        n = w.numel()
        ours = quantize_nf4(w)
        p, s = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        rows = [
            ("quant", lambda w=w: quantize_nf4(w),
             lambda w=w: bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)),
            ("dequant", lambda t=ours: t.dequantize(), lambda p=p, s=s: bnb.dequantize_4bit(p, s)),
        ]
        for op, f_ours, f_bnb in rows:
            t_ours, t_bnb = _best(f_ours, args.repeat, sync), _best(f_bnb, args.repeat, sync)
            table.append({"shape": list(shape), "op": op, "lorafit_params_per_s": n / t_ours,
                          "bnb_params_per_s": n / t_bnb, "ratio": t_bnb / t_ours})
            print(f"{str(shape):>14} {op:>6} {n / t_ours / 1e6:13.0f} {4 * n / t_ours / 1e9:6.2f} "
                  f"{n / t_bnb / 1e6:10.0f} {4 * n / t_bnb / 1e9:6.2f} {t_bnb / t_ours:6.2f}")
    if args.json:
        write_json(args.json, {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "device": str(dev),
                               "cpu": cpu_model(), "backend": describe(dev), "rows": table}, indent=2)


if __name__ == "__main__":
    if __package__ in (None, ""):  # run as a file: make `bench.common` importable
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
