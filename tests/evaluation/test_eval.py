"""`lorafit eval` on a tiny Llama: mixed-adapter batches give every model its solo numbers, the report files,
a merged folder and a .gguf scored as models, the metrics, and one-line errors for user mistakes."""

from __future__ import annotations

import json
import math

import pytest
import torch

import lorafit as lf
from lorafit.cli import main
from lorafit.errors import LorafitError
from lorafit.evaluation.metrics import contains, exact, load_scorer, regex
from lorafit.evaluation.run import eval_command
from lorafit.evaluation.score import held_out
from lorafit.generate import generate
from lorafit.io import read_prompt_format
from lorafit.model import load_model
from lorafit.train.data import pad_id_for, read_records
from lorafit.train.demo_task import make_dataset, write_jsonl
from lorafit.train.trainer import evaluate
from tests.serve.tiny import build

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval")
    model_dir, adapters = build(root)
    records = make_dataset(10, seed=4)
    records.append({"instruction": "Say hi.", "input": "", "output": "hello world"})
    data = write_jsonl(root / "held.jsonl", records)
    return model_dir, adapters, data


def solo(model_dir, adapter_dir, data):
    """The reference: the adapter loaded alone and active, the trainer's validation loss, plain generate."""
    model, tok = load_model(model_dir)
    if adapter_dir is not None:
        lf.load_adapter(model, adapter_dir)
    records = read_records(data)
    held = held_out(tok, records, read_prompt_format(adapter_dir) if adapter_dir else None)
    loss = evaluate(model, held.samples, pad_id_for(tok), batch_size=4)["val_loss"]
    answers = generate(model, tok, held.prompts, max_new_tokens=NEW_TOKENS, batch_size=3)
    return loss, answers


def test_mixed_batches_give_each_model_its_solo_numbers(tiny, tmp_path):
    model_dir, adapters, data = tiny
    out = tmp_path / "report"
    results = eval_command(str(data), [f"a={adapters['alpha']}", str(adapters["beta"]), f"g={adapters['gamma']}"],
                           model=str(model_dir), out=str(out), metrics=["exact", "contains"],
                           max_new_tokens=NEW_TOKENS, batch_size=8)  # 8 rows of 44: every batch mixes models
    assert list(results["models"]) == ["base", "a", "beta", "g"]
    for name, folder in (("base", None), ("a", adapters["alpha"]), ("beta", adapters["beta"]), ("g", adapters["gamma"])):
        loss, answers = solo(model_dir, folder, data)
        row = results["models"][name]
        assert row["loss"] == pytest.approx(loss, rel=1e-5) and row["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
        wrong = [json.loads(line) for line in (out / "wrong" / f"{name}.jsonl").read_text().splitlines()]
        refs = [r["output"] for r in map(json.loads, data.read_text().splitlines())]
        assert row["exact"] == sum(exact(a, r, {}) for a, r in zip(answers, refs)) / len(refs)
        assert [w["answer"] for w in wrong] == [a for a, r in zip(answers, refs) if not exact(a, r, {})
                                                or not contains(a, r, {})]
    assert len({results["models"][n]["loss"] for n in results["models"]}) == 4  # the adapters matter
    saved = json.loads((out / "results.json").read_text())
    assert saved["models"] == results["models"] and saved["records"] == 11
    table = (out / "results.md").read_text()
    assert "| model | loss | perplexity | exact | contains |" in table and "| beta |" in table


def test_a_merged_folder_and_a_gguf_are_scored_as_models(tiny, tmp_path):
    from lorafit.export.model_gguf import export_gguf

    model_dir, adapters, data = tiny
    model, tok = load_model(model_dir)
    lf.load_adapter(model, adapters["beta"])
    merged = lf.merge_and_unload(model)
    merged.save_pretrained(tmp_path / "merged")
    tok.save_pretrained(tmp_path / "merged")
    export_gguf(merged, tok, tmp_path / "merged.gguf", "f32", name="merged")
    with_adapter = eval_command(str(data), ["beta=" + str(adapters["beta"])], model=str(model_dir), out=str(tmp_path / "a"),
                                max_new_tokens=NEW_TOKENS, base=False)["models"]["beta"]
    for model_path in (tmp_path / "merged", tmp_path / "merged.gguf"):
        alone = eval_command(str(data), [], model=str(model_path), out=str(tmp_path / f"report-{model_path.suffix or 'dir'}"),
                             max_new_tokens=NEW_TOKENS)["models"]["base"]
        assert alone["loss"] == pytest.approx(with_adapter["loss"], rel=1e-4)
        assert alone["exact"] == with_adapter["exact"]


def test_metrics():
    assert exact("1998-03-03\nmore", " 1998-03-03 ", {}) == 1 and exact("1998-03-04", "1998-03-03", {}) == 0
    assert contains("the answer is  42 today", "42 today", {}) == 1 and contains("4 2", "42", {}) == 0
    assert regex("1998-03-03", r"\d{4}-\d\d-\d\d", {}) == 1 and regex("March", r"\d+", {}) == 0
    with pytest.raises(LorafitError, match="not a regular expression"):
        regex("x", "(", {})


def test_a_python_scorer(tmp_path, tiny):
    model_dir, adapters, data = tiny
    (tmp_path / "my_scorer.py").write_text("def length(prediction, reference, record):\n"
                                           "    return min(1.0, len(prediction) / 100)\n")
    scorer = load_scorer(f"{tmp_path / 'my_scorer.py'}:length")
    assert scorer("x" * 50, "", {}) == 0.5
    results = eval_command(str(data), [], model=str(model_dir), out=str(tmp_path / "r"),
                           metrics=[f"{tmp_path / 'my_scorer.py'}:length"], max_new_tokens=NEW_TOKENS)
    assert 0 <= results["models"]["base"][f"{tmp_path / 'my_scorer.py'}:length"] <= 1


@pytest.mark.parametrize("args, words", [
    (["--data", "{tmp}/missing.jsonl"], ["missing.jsonl"]),
    (["--adapter", "{tmp}/nowhere"], ["nowhere", "adapter folder not found"]),
    (["--metric", "nonsense"], ["--metric 'nonsense'", "module:function"]),
    (["--metric", "no_such_module_xyz:f"], ["cannot import no_such_module_xyz"]),
    (["--adapter", "base={alpha}"], ["'base' is taken"]),
    (["--out", "{tmp}/taken"], ["taken", "not a lorafit eval report"]),
    (["--no-base"], ["--no-base needs at least one --adapter"]),
    (["--lm-eval", "no_such_task"], ["unknown task(s) no_such_task"]),
])
def test_user_mistakes_are_one_line_exit_2(tiny, tmp_path, capsys, args, words):
    model_dir, adapters, data = tiny
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    argv = {"--data": str(data), "--model": str(model_dir), "--out": str(tmp_path / "out")}
    extra = []
    for flag, value in zip(args[::2], args[1::2]):
        value = value.format(tmp=tmp_path, alpha=adapters["alpha"])
        (argv.__setitem__(flag, value) if flag in argv else extra.extend([flag, value]))
    if args == ["--no-base"]:
        extra = ["--no-base"]
    code = main(["eval", *[x for kv in argv.items() for x in kv], *extra, "--max-new-tokens", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and err.startswith("lorafit eval: error:"), err
    for word in words:
        assert word in err, err
    assert not (tmp_path / "out").exists() and (tmp_path / "taken" / "notes.txt").read_text() == "mine"
