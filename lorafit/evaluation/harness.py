"""lm-evaluation-harness on lorafit models: a registered `lorafit` model type, run in process.

    lm_eval.simple_evaluate(model="lorafit", model_args="model=runs/base,adapter=runs/demo/adapter,quantize=nf4")
    python -m lorafit.evaluation.harness run --model lorafit --model_args model=...,adapter=... --tasks ...
    lorafit eval --data held_out.jsonl --adapter demo=DIR --lm-eval lorafit_dates,lorafit_dates_mc

lm-eval finds model types in its own registry; importing this module adds `lorafit` to it (the
second line is lm-eval's own command line with that import done first). `lorafit eval --lm-eval`
reuses the model it already loaded (quantized bases included) and scores the base and every adapter
together: each `LorafitLM` is one view (base or adapter) of a shared `Scorer`, which answers a list of
requests for every view at once, their rows mixed in each batch (`lorafit.adapter_per_row`), and
keeps the other views' answers for when lm-eval asks them. Nothing is downloaded: the shipped tasks
(lorafit/evaluation/tasks: the demo's dates as `generate_until` and as multiple choice, and a
`loglikelihood_rolling` text) read their data files from the package.

Scoring follows lm-eval's HF model: a request's context and continuation are token ids (no special
tokens added; an empty context is the BOS token, else EOS); the log-likelihood is the sum of the
continuation's token log-probs (fp32 log-softmax), greedy when each is the argmax; rolling windows
of the model's context for `loglikelihood_rolling`; greedy generation cut at the `until` strings.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lorafit.device import model_device
from lorafit.errors import LorafitError
from lorafit.evaluation.score import batches_by_length, row_routing
from lorafit.generate import generate_ids

TASKS_DIR = Path(__file__).parent / "tasks"


def check_lm_eval(tasks: list[str], include_path: list[str] | None = None):
    """lm-eval is installed, every --include-path is a folder and every task is known; else one line
    saying what to do. Returns the TaskManager that knows them."""
    if importlib.util.find_spec("lm_eval") is None:
        raise LorafitError("--lm-eval needs lm-evaluation-harness: pip install 'lorafit[lm-eval]'")
    for path in include_path or []:
        if not Path(path).is_dir():
            raise LorafitError(f"--include-path {path}: not a folder of lm-eval task YAMLs")
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(TASKS_DIR), *(include_path or [])])
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise LorafitError(f"--lm-eval: unknown task(s) {', '.join(unknown)}; the shipped ones are lorafit_dates, "
                           "lorafit_dates_mc and lorafit_text (add your own folder with --include-path)")
    return manager


class Scorer:
    """One loaded model and the views lm-eval sees of it (None: the base, else an adapter's name)."""

    def __init__(self, model: nn.Module, tokenizer, views: list[str | None], batch_size: int = 16,
                 max_length: int | None = None) -> None:
        self.model, self.tokenizer, self.views = model.eval(), tokenizer, list(views)
        self.batch_size = batch_size
        self.max_length = max_length or int(getattr(model.config, "max_position_embeddings", 2048))
        self.loglikelihoods: dict[tuple, tuple[float, bool]] = {}
        self.generations: dict[tuple, str] = {}

    @torch.no_grad()
    def loglikelihood(self, view: str | None, requests: list[tuple[list[int], list[int]]],
                      disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probs, greedy?) of each (context ids, continuation ids), for
        `view`; computed for every view at once the first time."""
        todo = list(dict.fromkeys((v, tuple(c), tuple(x)) for v in self.views for c, x in requests
                                  if (v, tuple(c), tuple(x)) not in self.loglikelihoods))
        device = model_device(self.model)
        for batch in tqdm(batches_by_length(todo, self.batch_size, lambda key: len(key[1]) + len(key[2])),
                          desc="loglikelihood", unit="batch", disable=disable_tqdm or not todo, leave=False):
            rows = [todo[i] for i in batch]
            seqs = [list(c + x)[-(self.max_length + 1):] for _, c, x in rows]
            inputs = [s[:-1] for s in seqs]  # position t predicts token t+1
            width = max(map(len, inputs))
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for b, s in enumerate(inputs):
                ids[b, :len(s)], mask[b, :len(s)] = torch.tensor(s), 1
            with row_routing(self.model, [v for v, _, _ in rows]):
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits  # (B, T, V)
            for b, ((v, c, x), s) in enumerate(zip(rows, seqs)):
                n = len(x)
                target = torch.tensor(s[-n:], device=logits.device)
                logp = torch.log_softmax(logits[b, len(s) - 1 - n:len(s) - 1].float(), dim=-1)  # (n, V)
                total = float(logp.gather(-1, target[:, None]).sum())
                self.loglikelihoods[(v, c, x)] = (total, bool((logp.argmax(-1) == target).all()))
        return [self.loglikelihoods[(view, tuple(c), tuple(x))] for c, x in requests]

    def generate(self, view: str | None, requests: list[tuple[list[int], int, list[str]]],
                 disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations of (context ids, max new tokens, until strings), cut at the first `until`."""
        keys = [(tuple(c), n, tuple(u)) for c, n, u in requests]
        todo = list(dict.fromkeys((v, *k) for v in self.views for k in keys if (v, *k) not in self.generations))
        by_length: dict[int, list] = {}
        for key in todo:
            by_length.setdefault(key[2], []).append(key)
        for n, group in by_length.items():
            for batch in tqdm(batches_by_length(group, self.batch_size, lambda key: len(key[1])), desc="generate_until",
                              unit="batch", disable=disable_tqdm, leave=False):
                rows = [group[i] for i in batch]
                with row_routing(self.model, [v for v, *_ in rows]):
                    new = generate_ids(self.model, self.tokenizer, [list(c) for _, c, _, _ in rows], max_new_tokens=n,
                                       batch_size=len(rows))
                for (v, c, n_, until), ids in zip(rows, new):
                    text = self.tokenizer.decode(ids, skip_special_tokens=True)
                    for stop in until:
                        text = text.split(stop)[0] if stop else text
                    self.generations[(v, c, n_, until)] = text
        return [self.generations[(view, *k)] for k in keys]


def _lm_class():
    """`LorafitLM`, defined (and registered as lm-eval's `lorafit`) on first use, so that lorafit
    imports without lm-eval installed."""
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import model_registry, register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    if "lorafit" in model_registry:
        registered = model_registry.get("lorafit")
        if isinstance(registered, type):
            return registered

    class LorafitLM(TemplateLM):
        """lm-eval's `lorafit` model type: `model_args` model (a folder, .gguf or the bundled default),
        adapter (an adapter folder), quantize (nf4 / ternary), dtype, device, batch_size, max_length."""

        def __init__(self, model: str | None = None, adapter: str | None = None, quantize: str | None = None,
                     dtype: str = "auto", device: str | None = "auto", batch_size: int | str = 16,
                     max_length: int | None = None, scorer: Scorer | None = None, view: str | None = None,
                     **ignored: Any) -> None:
            super().__init__()
            if scorer is None:
                import lorafit as lf
                from lorafit.device import resolve_device, resolve_dtype
                from lorafit.model import load_model

                if device and str(device).startswith("cuda") and not torch.cuda.is_available():
                    device = "auto"  # lm-eval's command line passes cuda:0 by default; its HF model falls back too
                place = resolve_device(device or "auto")
                loaded, tokenizer = load_model(model, quantize=quantize or None, dtype=resolve_dtype(dtype, place),
                                               device=place)
                if adapter:
                    lf.load_adapter(loaded, adapter, adapter="adapter", activate=False)
                    view = "adapter"
                size = int(batch_size) if str(batch_size).isdigit() else 16  # "auto": lorafit's default
                scorer = Scorer(loaded, tokenizer, [view], size, int(max_length) if max_length else None)
            self.scorer, self.view, self.tokenizer = scorer, view, scorer.tokenizer

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            bos = self.tokenizer.bos_token_id
            return bos if bos is not None else self.tokenizer.eos_token_id

        @property
        def max_length(self) -> int:
            return self.scorer.max_length

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            out = self.scorer.loglikelihood(self.view, [(c, x) for _, c, x in requests], disable_tqdm)
            for (key, _, _), result in zip(requests, out):
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, result)
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            windows, owners = [], []
            for i, (text,) in enumerate(req.args for req in requests):
                for window in map(make_disjoint_window, get_rolling_token_windows(
                        token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length - 1, context_len=1)):
                    windows.append(window)
                    owners.append(i)
            scores = self.scorer.loglikelihood(self.view, windows, disable_tqdm)
            totals = [0.0] * len(requests)
            for i, (ll, _) in zip(owners, scores):
                totals[i] += ll
            for req, total in zip(requests, totals):
                self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            asks = []
            for context, kwargs in (req.args for req in requests):
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                n = int(kwargs.get("max_gen_toks") or 256)
                ids = self.tok_encode(context)[-(self.max_length - n):]
                asks.append((ids, n, until))
            out = self.scorer.generate(self.view, asks, disable_tqdm)
            for req, text in zip(requests, out):
                self.cache_hook.add_partial("generate_until", req.args, text)
            return out

    return register_model("lorafit")(LorafitLM)


def register() -> type:
    """Add the `lorafit` model type to lm-eval's registry; returns the class."""
    return _lm_class()


def run_tasks(model: nn.Module, tokenizer, views: list[str | None], tasks: list[str],
              include_path: list[str] | None, limit: int | None, batch_size: int,
              names: dict[str | None, str], manager=None) -> dict[str, dict[str, dict[str, float]]]:
    """lm-eval's `tasks` on each view of one loaded model: {model name: {task: {metric: value}}}."""
    import lm_eval

    lm_class = register()
    scorer = Scorer(model, tokenizer, views, batch_size)
    manager = manager or check_lm_eval(tasks, include_path)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for view in views:
        result = lm_eval.simple_evaluate(model=lm_class(scorer=scorer, view=view), tasks=tasks, task_manager=manager,
                                         limit=limit, log_samples=False, bootstrap_iters=0)
        out[names[view]] = {task: {k.split(",")[0]: float(v) for k, v in metrics.items()
                                   if isinstance(v, int | float) and not k.startswith(("alias", "sample"))
                                   and "stderr" not in k}
                            for task, metrics in result["results"].items()}
    return out


def main() -> None:
    """lm-eval's own command line, with the `lorafit` model type registered and the shipped tasks on the
    include path (`python -m lorafit.evaluation.harness run --model lorafit --model_args ... --tasks ...`)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    register()
    argv = sys.argv[1:]
    if "--include_path" not in argv and any(a.startswith("lorafit_") for a in argv):
        argv += ["--include_path", str(TASKS_DIR)]
    sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()

