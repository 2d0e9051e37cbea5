"""`lorafit ablate CONFIG --grid KEY=V1,V2 ... --methods lora,qlora,dora,full --out DIR`.

Every point (lorafit.ablate.grid) is built and validated first; then the points run one after the
other in this process, each in DIR/points/<name>/ with the same data, seed and step budget (the base
config's). A point whose result.json exists is never run again, so a killed ablation started again with
the same command resumes at the first unfinished point (which starts over: its wall time stays
honest). The tables and plots are rewritten after every point, so they show what is done so far.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import re
import shutil
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from lorafit.ablate.grid import build_points, parse_axis, parse_methods
from lorafit.ablate.point import finished, run_point
from lorafit.ablate.report import write_results
from lorafit.errors import LorafitError
from lorafit.train.run import apply_override, load_yaml


def machine() -> str:
    """CPU model, cores (and the GPU when CUDA is there), torch version: for the results' header."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}"


def ablate_command(config: str, grids: list[str], methods: str, out: str, sets: list[str] | None = None,
                   max_eval: int | None = None, command: str | None = None, tag: str | None = None) -> list[dict]:
    """Run (or resume) the ablation; returns the rows {"name", "settings", "result"} of all points."""
    raw = load_yaml(config)
    method_sets: dict[str, list[tuple[str, str]]] = {}
    for spec in sets or []:
        key, eq, value = spec.partition("=")
        method, colon, key = key.strip().rpartition(":")
        if not eq or not key:
            raise LorafitError(f"--set {spec!r}: expected KEY=VALUE or METHOD:KEY=VALUE (e.g. full:learning_rate=1e-4)")
        if colon:
            method_sets.setdefault(parse_methods(method)[0], []).append((key, value))
        else:
            apply_override(raw, key, value)
    if max_eval is not None and max_eval < 1:
        raise LorafitError(f"--max-eval {max_eval}: give a positive number of held-out samples")
    if tag is not None and not re.fullmatch(r"[A-Za-z0-9_-]+", tag):
        raise LorafitError(f"--tag {tag!r}: use letters, digits, '_' or '-' (it prefixes file names)")
    axes = [parse_axis(spec) for spec in grids]
    method_list = parse_methods(methods)
    points = build_points(raw, axes, method_list, out, source=config, method_sets=method_sets)  # everything checked before training
    axes = [("method", method_list), *axes]
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LorafitError(f"--out {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    results = {p.name: finished(p.config.train.output_dir) for p in points}
    for p in points:  # a kept result must come from the same config, or the tables would mix two budgets
        saved = Path(p.config.train.output_dir) / "point.yaml"
        if results[p.name] is not None and saved.is_file() and yaml.safe_load(saved.read_text()) != p.raw:
            raise LorafitError(f"{saved}: this finished point was run with another config (data, steps, ...); "
                               "use another --out, or delete the point's folder to run it again")
    todo = [p for p in points if results[p.name] is None]
    print(f"lorafit ablate: {len(points)} points; {len(points) - len(todo)} finished before (kept), "
          f"{len(todo)} to run: {', '.join(p.name for p in todo) or 'none'}")
    title = f"lorafit ablate: {Path(config).name}" + (f" ({tag})" if tag else "")
    prefix = f"{tag}-" if tag else ""
    note = (f"Machine: {machine()}. Command: `{command or 'lorafit ablate ' + config}`. Every point trains "
            f"with the same data, seed and step budget; see points/<name>/point.yaml for its exact config.")

    def rows() -> list[dict]:
        return [{"name": p.name, "settings": p.settings, "result": results[p.name]} for p in points
                if results[p.name] is not None]

    def dated() -> str:
        times = sorted(r["result"].get("finished_at", "") for r in rows())
        return note + (f" Points finished between {times[0]} and {times[-1]}." if times else "")

    bar = tqdm(total=len(points), initial=len(points) - len(todo), desc="ablate", unit="point", dynamic_ncols=True)
    for point in todo:
        folder = Path(point.config.train.output_dir)
        if folder.exists():
            shutil.rmtree(folder)  # an unfinished point from a killed run starts over
        folder.mkdir(parents=True)
        (folder / "point.yaml").write_text(yaml.safe_dump(point.raw, sort_keys=False))
        bar.set_postfix_str(point.name)
        tqdm.write(f"lorafit ablate: point {point.name}")
        result = run_point(point.config, max_eval)
        results[point.name] = result
        gc.collect()
        write_results(out, title, rows(), axes, dated(), prefix)
        bar.update(1)
    bar.close()
    files = write_results(out, title, rows(), axes, dated(), prefix)
    print(f"lorafit ablate: done; {', '.join(f.name for f in files)} in {out}")
    return rows()
