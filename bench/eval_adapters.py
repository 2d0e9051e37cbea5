"""`lorafit eval`: four adapters scored in one run (one load, mixed-adapter batches) against four runs of one
adapter each, on the bundled SmolLM2-135M and the demo's held-out dates.

Both sides call `eval_command` as `lorafit eval` does (model load included), one after the other in one
process, twice in alternating order; the wall times, the forwards each side ran and the machine's load
are printed. The four adapters are random r=16 LoRA adapters on every projection (their quality does not
matter here: each side scores the same ones, and the tables must agree).

    python bench/eval_adapters.py [--records 40] [--new-tokens 12] [--json results.json]
    python bench/eval_adapters.py --smoke   # a toy model of the same family, 4 records: checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import lorafit as lf  # noqa: E402
from bench.common import machine_info, toy_model_folder, write_json  # noqa: E402
from lorafit.evaluation.run import eval_command  # noqa: E402
from lorafit.model import load_model  # noqa: E402
from lorafit.train.demo_task import make_splits, write_jsonl  # noqa: E402


def make_adapters(root: Path, n: int, model_path: str | None) -> list[Path]:
    out = []
    for i in range(n):
        model, _ = load_model(model_path)
        lf.apply_lora(model, lf.LoraConfig(r=16, alpha=16))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in lf.adapter_parameters(model):
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        out.append(lf.save_adapter(model, root / f"adapter{i}"))
    return out


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--records", type=int, default=40)
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of both sides, the order alternating")
    ap.add_argument("--json", default=None, help="also write the times and both sides' scores here")
    ap.add_argument("--smoke", action="store_true",
                    help="a toy model of the same family, 4 records, 2 new tokens, 1 round: checks the script")
    args = ap.parse_args(argv)
    if args.smoke:
        args.records, args.new_tokens, args.rounds = min(args.records, 4), min(args.new_tokens, 2), 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.smoke and args.model is None:
        args.model = toy_model_folder()
        print("a toy model (--smoke): the numbers mean nothing", file=sys.stderr)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    root = Path(tempfile.mkdtemp(prefix="lorafit-eval-bench-"))
    _, held = make_splits(8, args.records, seed=0)
    data = str(write_jsonl(root / "held.jsonl", held))
    adapters = make_adapters(root, 4, args.model)
    specs = [f"a{i}={p}" for i, p in enumerate(adapters)]
    common = {"model": args.model, "max_new_tokens": args.new_tokens, "batch_size": 64, "base": False, "device": "cpu"}
    print(json.dumps(machine_info()), f"load {os.getloadavg()}", flush=True)

    def together():
        together.results = eval_command(data, specs, out=str(root / "together"), **common)["models"]

    def apart():
        apart.results = {}
        for i, spec in enumerate(specs):
            apart.results |= eval_command(data, [spec], out=str(root / f"apart{i}"), **common)["models"]

    times = {"one run, 4 adapters": [], "4 runs, 1 adapter each": []}
    for order in ([(together, apart), (apart, together)] * args.rounds)[:args.rounds]:
        for fn in order:
            key = "one run, 4 adapters" if fn is together else "4 runs, 1 adapter each"
            times[key].append(timed(fn))
            print(f"{key}: {times[key][-1]:.1f} s (load {os.getloadavg()[0]:.2f})", flush=True)
    for name in together.results:  # the same numbers either way
        a, b = together.results[name], apart.results[name]
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * b["loss"] and a["exact"] == b["exact"], (name, a, b)
    best = {k: min(v) for k, v in times.items()}
    print(f"\n{args.records} records x 4 adapters, {args.new_tokens} new tokens, {args.model or 'SmolLM2-135M'} fp32, CPU")
    for key, value in best.items():
        print(f"  {key:24s} best {value:6.1f} s   (runs: {', '.join(f'{t:.1f}' for t in times[key])})")
    ratio = best["4 runs, 1 adapter each"] / best["one run, 4 adapters"]
    print(f"  ratio (4 runs / one run): {ratio:.2f}x; load {os.getloadavg()}")
    if args.json:
        write_json(args.json, {"machine": machine_info(), "times": times, "ratio": ratio,
                               "together": together.results, "apart": apart.results}, indent=1)


if __name__ == "__main__":
    main()
