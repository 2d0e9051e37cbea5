"""lm-evaluation-harness on lorafit, tiny models, no hub: the shipped tasks in process on the base and an
adapter, the rolling perplexity equal to lorafit's own loss, the `lorafit` model type from lm-eval's command
line, and `local-completions` with tokenizer_backend=remote against `lorafit serve` over loopback HTTP giving
the in-process scores."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lorafit as lf
from lorafit.evaluation.harness import Scorer, check_lm_eval, register, run_tasks
from lorafit.evaluation.score import mixed_losses
from lorafit.model import load_model
from lorafit.train.data import IGNORE, Sample
from tests.serve.live import API_KEY, start_server
from tests.serve.tiny import build

pytest.importorskip("lm_eval")
REPO = Path(__file__).resolve().parents[2]
TASKS = ["lorafit_dates", "lorafit_dates_mc", "lorafit_text"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    return build(tmp_path_factory.mktemp("harness"))


@pytest.fixture(scope="module")
def loaded(tiny):
    model_dir, adapters = tiny
    model, tok = load_model(model_dir)
    lf.load_adapter(model, adapters["alpha"], adapter="alpha", activate=False)
    return model, tok


@pytest.fixture(scope="module")
def manager():
    """lm-eval's task index with the shipped tasks (built once: it reads every task YAML lm-eval has)."""
    return check_lm_eval(TASKS)


def _evaluate(lm, tasks, manager, limit=None):
    import lm_eval

    return lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=True,
                                   bootstrap_iters=0)


def test_shipped_tasks_run_in_process_on_base_and_adapter(loaded, manager):
    model, tok = loaded
    results = run_tasks(model, tok, [None, "alpha"], TASKS, None, 6, 16, {None: "base", "alpha": "alpha"},
                        manager=manager)
    assert set(results) == {"base", "alpha"}
    for name in results:
        assert set(results[name]) == set(TASKS)
        assert 0 <= results[name]["lorafit_dates"]["exact_match"] <= 1
        assert 0 <= results[name]["lorafit_dates_mc"]["acc"] <= 1
        assert results[name]["lorafit_text"]["byte_perplexity"] > 1
    assert results["base"]["lorafit_text"] != results["alpha"]["lorafit_text"]  # the adapter is applied


def test_rolling_perplexity_equals_lorafits_own(loaded, manager):
    """lm-eval scores each paragraph after the prefix (BOS, else EOS) token; lorafit's loss over the same ids
    (mixed_losses, what `lorafit eval` reports) gives the same log-likelihoods and byte perplexity."""
    model, tok = loaded
    lm_class = register()
    scorer = Scorer(model, tok, [None, "alpha"], batch_size=4)
    for view in (None, "alpha"):
        result = _evaluate(lm_class(scorer=scorer, view=view), ["lorafit_text"], manager)
        docs = result["samples"]["lorafit_text"]
        prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        samples = []
        for d in docs:
            ids = tok.encode(d["doc"]["text"], add_special_tokens=False)
            samples.append(Sample([prefix, *ids], [IGNORE, *ids], "text"))
        own = mixed_losses(model, [(view, s) for s in samples], tok.pad_token_id, batch_size=3)
        harness = [d["filtered_resps"][0] if isinstance(d["filtered_resps"][0], float) else d["filtered_resps"][0][0]
                   for d in docs]
        assert harness == pytest.approx([-loss for loss, _ in own], abs=1e-4)
        n_bytes = sum(len(d["doc"]["text"].encode()) for d in docs)
        own_byte_ppl = math.exp(sum(loss for loss, _ in own) / n_bytes)
        assert result["results"]["lorafit_text"]["byte_perplexity,none"] == pytest.approx(own_byte_ppl, rel=1e-5)


def test_lm_evals_command_line_with_the_lorafit_model_type(tiny, tmp_path):
    model_dir, adapters = tiny
    out = subprocess.run([sys.executable, "-m", "lorafit.evaluation.harness", "run", "--model", "lorafit",
                          "--model_args", f"model={model_dir},adapter={adapters['alpha']}", "--tasks",
                          "lorafit_dates_mc", "--limit", "4", "--output_path", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "lorafit_dates_mc" in out.stdout and "acc" in out.stdout
    (saved,) = (tmp_path / "out").rglob("results_*.json")
    assert json.loads(saved.read_text())["results"]["lorafit_dates_mc"]["acc,none"] >= 0


def test_local_completions_against_lorafit_serve_gives_the_in_process_scores(tiny, loaded, manager, tmp_path,
                                                                           monkeypatch):
    """lm-eval's local-completions + tokenizer_backend=remote over real loopback HTTP: the server's /tokenize
    and echo + logprobs give the multiple-choice log-likelihoods lm-eval computes in process."""
    model_dir, adapters = tiny
    model, tok = loaded
    lm_class = register()
    in_process = _evaluate(lm_class(scorer=Scorer(model, tok, ["alpha"]), view="alpha"), ["lorafit_dates_mc"], manager,
                           limit=6)
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)  # what local-completions sends as its bearer token
    server = start_server(model_dir, {"alpha": adapters["alpha"]}, adapters["alpha"].parent, tmp_path / "server.log")
    try:
        from lm_eval.models.openai_completions import LocalCompletionsAPI

        remote = LocalCompletionsAPI(base_url=server.base_url + "/completions", model="alpha",
                                     tokenizer_backend="remote", tokenized_requests=True, max_length=512,
                                     auth_token=API_KEY, num_concurrent=1, max_retries=1)
        over_http = _evaluate(remote, ["lorafit_dates_mc"], manager, limit=6)
    finally:
        server.process.terminate()
        server.process.wait(10)

    def lls(result):
        return [[r[0] for r in d["filtered_resps"]] for d in result["samples"]["lorafit_dates_mc"]]
    assert lls(over_http) == [pytest.approx(x, abs=1e-4) for x in lls(in_process)]
    for metric in ("acc,none", "acc_norm,none"):
        assert over_http["results"]["lorafit_dates_mc"][metric] == in_process["results"]["lorafit_dates_mc"][metric]
