"""`lorafit inspect ADAPTER [--model M] [--checkpoints RUN_DIR] --out DIR`: what an adapter changed.

Everything a user can get wrong (the adapter folder, the run folder, the numbers) is checked before
the model loads. The base is loaded as the adapter was trained on when told (`--quantize nf4`: the
analysis then uses the dequantized NF4 weights, the W the adapter really sat on), else in fp32.
"""

from __future__ import annotations

import re
from pathlib import Path

from tqdm.auto import tqdm

from lorafit.errors import LorafitError
from lorafit.inspect.analyze import analyze_model
from lorafit.inspect.checkpoints import norms_over_steps
from lorafit.inspect.report import write_report
from lorafit.io import load_adapter, read_adapter
from lorafit.model import load_model


def inspect_command(adapter: str, out: str, model: str | None = None, checkpoints: str | None = None,
                    quantize: str | None = None, energy: float = 0.9, intruder_k: int = 10,
                    modules: str | None = None, device="cpu") -> list[Path]:
    """Analyse `adapter` on `model` and write the report into `out`; returns the files written."""
    if not 0 < energy <= 1:
        raise LorafitError(f"--energy {energy} must be in (0, 1], e.g. 0.9 for 90% of each update's energy")
    if intruder_k < 0:
        raise LorafitError(f"--intruder-k {intruder_k} must be 0 (skip) or a positive number of singular vectors")
    if quantize not in (None, "nf4", "ternary"):
        raise LorafitError(f"--quantize {quantize!r}: use nf4 or ternary (the base the adapter was trained on)")
    if Path(out).exists() and not Path(out).is_dir():
        raise LorafitError(f"--out {out}: exists and is not a folder")
    if modules is not None:
        try:
            re.compile(modules)
        except re.error as e:
            raise LorafitError(f"--modules {modules!r} is not a valid regex ({e})") from None
    read_adapter(adapter)  # the folder and its files, checked before the slow part
    steps = norms_over_steps(checkpoints, modules) if checkpoints else None
    base, _ = load_model(model, quantize=quantize, device=device)
    load_adapter(base, adapter)
    bar = tqdm(desc="inspect", unit="module", dynamic_ncols=True)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    analysis = analyze_model(base, energy=energy, intruder_k=intruder_k, modules=modules, progress=progress)
    bar.close()
    if not analysis.modules:
        raise LorafitError(f"--modules {modules!r} matched no adapted module of {adapter}")
    files = write_report(analysis, out, f"lorafit inspect: {adapter}", steps)
    print(f"lorafit inspect: {len(analysis.modules)} modules; wrote {', '.join(f.name for f in files)} to {out}")
    return files
