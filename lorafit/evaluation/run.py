"""`lorafit eval`: the base model and any number of adapters scored side by side on held-out data.

    lorafit eval --data held_out.jsonl --adapter demo=runs/demo/adapter [--adapter other=DIR ...]
                 [--model M] [--quantize nf4] [--metric exact] [--out runs/eval]
                 [--lm-eval TASKS [--include-path DIR] [--limit N]]

The model loads once (an HF folder, a merged folder or a .gguf is scored as a model in its own right;
`--quantize` gives the base adapters were trained on with QLoRA), every adapter is added to it, and
each batch mixes their rows (lorafit.evaluation.score). Written to --out, last: results.json,
results.md (the table it prints), and wrong/<model>.jsonl (the answers that scored below 1, with
their prompt and reference). `--no-base` leaves the base out; `--no-generate` scores loss only.

With --lm-eval, lm-evaluation-harness runs the tasks (its registry, the shipped tasks in
lorafit/evaluation/tasks, and --include-path) on the base and each adapter of the loaded model
(lorafit.evaluation.harness); its results go to lm_eval.json and a table in results.md.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from lorafit.config import check_adapter_name
from lorafit.errors import LorafitError
from lorafit.evaluation.metrics import load_scorer
from lorafit.evaluation.score import reference, score_models
from lorafit.io import read_adapter, read_prompt_format
from lorafit.paths import write_folder
from lorafit.train.data import read_records

BASE = "base"


def parse_adapters(specs: list[str]) -> dict[str, Path]:
    """`NAME=DIR` or `DIR` (named after its folder; a folder called adapter after its parent, as in
    runs/demo/adapter -> demo) -> {name: folder}, each folder read and checked first."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        folder = Path(path if sep else spec)
        if not sep:
            name = folder.resolve().parent.name if folder.name == "adapter" else folder.name
        try:
            check_adapter_name(name)
        except LorafitError as e:
            raise LorafitError(f"--adapter {spec}: {e}; give it a name as NAME=DIR") from None
        if name in out or name == BASE:
            raise LorafitError(f"--adapter {spec}: the name {name!r} is taken; give it another as NAME=DIR")
        read_adapter(folder)  # a missing or broken adapter fails here, before the model loads
        read_prompt_format(folder)
        out[name] = folder
    return out


def eval_command(data: str, adapters: list[str], model: str | None = None, quantize: str | None = None,
                 device: str = "auto", dtype: str = "auto", out: str = "runs/eval", metrics: list[str] | None = None,
                 max_new_tokens: int = 64, batch_size: int = 32, max_examples: int | None = None,
                 base: bool = True, generate: bool = True, lm_eval: str | None = None,
                 include_path: list[str] | None = None, limit: int | None = None) -> dict[str, Any]:
    """Check every argument, load once, score, write the report; returns what results.json holds."""
    import lorafit as lf
    from lorafit.device import resolve_device, resolve_dtype
    from lorafit.model import load_model

    metrics = metrics or ["exact"]
    scorers = {m: load_scorer(m) for m in dict.fromkeys(metrics)}
    if batch_size < 1 or max_new_tokens < 1 or (max_examples is not None and max_examples < 1):
        raise LorafitError("--batch-size, --max-new-tokens and --max-examples must be positive")
    if quantize not in (None, "nf4", "ternary"):
        raise LorafitError(f"--quantize {quantize}: use nf4 or ternary (the base an adapter trained on)")
    check_out(Path(out))
    records = read_records(data)[:max_examples]
    folders = parse_adapters(adapters)
    if not base and not folders:
        raise LorafitError("--no-base needs at least one --adapter: there is nothing else to score")
    tasks = [t.strip() for t in (lm_eval or "").split(",") if t.strip()]
    manager = None
    if tasks:
        from lorafit.evaluation.harness import check_lm_eval

        manager = check_lm_eval(tasks, include_path)
    device_ = resolve_device(device)
    loaded, tokenizer = load_model(model, quantize=quantize, dtype=resolve_dtype(dtype, device_), device=device_)
    for name, folder in folders.items():
        lf.load_adapter(loaded, folder, adapter=name, activate=False)
    formats = ({None: None} if base else {}) | {name: read_prompt_format(folder) for name, folder in folders.items()}
    label = {None: BASE, **{n: n for n in folders}}
    print(f"lorafit eval: {len(records)} held-out records from {data}; models: "
          f"{', '.join(label[n] for n in formats)} (one loaded base, mixed-adapter batches)")
    start = time.perf_counter()
    gen = generate and any(reference(r) is not None for r in records)
    scores = score_models(loaded, tokenizer, records, formats, generate=gen, max_new_tokens=max_new_tokens,
                          batch_size=batch_size)
    seconds = time.perf_counter() - start
    results: dict[str, Any] = {"data": str(data), "model": model or "default", "quantize": quantize,
                               "records": len(records), "metrics": list(scorers), "seconds": round(seconds, 2),
                               "models": {}}
    wrong: dict[str, list[dict]] = {}
    for name, s in scores.items():
        row: dict[str, Any] = {"loss": s.loss, "perplexity": math.exp(min(s.loss, 50)), "tokens": s.n_tokens}
        if name is not None:
            row["adapter"] = str(folders[name])
        mistakes = []
        if gen:
            asked = [(i, r) for i, r in enumerate(records) if reference(r) is not None]
            for metric, scorer in scorers.items():
                values = [scorer(s.answers[i], reference(r), r.fields) for i, r in asked]
                row[metric] = sum(values) / len(values)
                mistakes += [(i, metric, v) for (i, _), v in zip(asked, values) if v < 1]
            row["answered"] = len(asked)
        by_record: dict[int, dict] = {}
        for i, metric, v in mistakes:
            entry = by_record.setdefault(i, {"source": records[i].source, "reference": reference(records[i]),
                                             "answer": s.answers[i], "scores": {}})
            entry["scores"][metric] = v
        wrong[label[name]] = [by_record[i] for i in sorted(by_record)]
        results["models"][label[name]] = row
    if tasks:
        from lorafit.evaluation.harness import run_tasks

        results["lm_eval"] = run_tasks(loaded, tokenizer, list(formats), tasks, include_path, limit, batch_size,
                                       names=label, manager=manager)
    table = format_table(results)
    _write(Path(out), results, table, wrong)
    print(table)
    print(f"lorafit eval: written to {out}/ (results.md, results.json, wrong/<model>.jsonl) in {seconds:.0f} s")
    return results


def format_table(results: dict[str, Any]) -> str:
    """The Markdown report: one row per model; lm-eval's metrics in a second table."""
    metrics = [m for m in results["metrics"] if any(m in row for row in results["models"].values())]
    header = ["model", "loss", "perplexity", *metrics]
    lines = [f"Held-out: {results['data']} ({results['records']} records), base {results['model']}"
             + (f" ({results['quantize']})" if results.get("quantize") else ""), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in results["models"].items():
        lines.append(f"| {name} | {row['loss']:.4f} | {row['perplexity']:.3f} | "
                     + " | ".join(f"{100 * row[m]:.1f}%" for m in metrics) + (" |" if metrics else "|"))
    if results.get("lm_eval"):
        lines += ["", "lm-evaluation-harness:", "", "| model | task | metric | value |", "|---|---|---|---|"]
        for name, tasks in results["lm_eval"].items():
            for task, values in tasks.items():
                for metric, value in values.items():
                    lines.append(f"| {name} | {task} | {metric} | {value:.4f} |")
    return "\n".join(lines)


def _write(out: Path, results: dict[str, Any], table: str, wrong: dict[str, list[dict]]) -> None:
    """The report folder, built beside its target and renamed into place (lorafit.paths.write_folder)."""
    def fill(folder: Path) -> None:
        (folder / "wrong").mkdir()
        for name, entries in wrong.items():
            (folder / "wrong" / f"{name}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
        (folder / "results.md").write_text(table + "\n")
        (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_folder(out, fill)


def check_out(out: Path) -> None:
    """--out is replaced whole: refuse a folder (or file) that is not an earlier report."""
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / "results.json").is_file()):
        raise LorafitError(f"{out}: exists and is not a lorafit eval report (it would be replaced); choose another --out")
