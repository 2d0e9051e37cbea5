"""Every benchmark in bench/ starts at its defaults and runs its whole code path at toy size.

Two checks per benchmark:
- `test_<bench>_defaults`: its argument parser with no arguments, and the set-up those defaults feed (the
  run config through `parse_run_config`, the flags handed to a child process, the outtypes, the LoRA
  config...), in this process and in well under a second: a broken default fails here, not for a user;
- `test_<bench>_smoke`: `python bench/<bench>.py --smoke` as a user runs it (a fresh interpreter, from
  another folder, no PYTHONPATH), which keeps every default but the sizes: a random toy model of SmolLM2's
  family (bench.common.SMOLLM2_TOY) and a step or two. What it printed or wrote (its table, its JSON) must
  have the expected keys and finite numbers, and both sides of a comparison must have done the same work.
  Timings are never asserted.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `bench` is a folder of scripts, importable from the repository root
    sys.path.insert(0, str(ROOT))

from bench.common import child_flags  # noqa: E402


def bench(name: str):
    return importlib.import_module(f"bench.{name}")


def finite(*values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def run_script(name: str, *args: str, cwd: Path) -> str:
    """`python bench/<name>.py ARGS` in a fresh interpreter, from `cwd`, without PYTHONPATH; its stdout.
    LORAFIT_CACHE is the test run's own (set by the smollm2_dir fixture), so the bundled model is converted once."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"bench/{name}.py {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def round_trip(module, args: argparse.Namespace, flags: tuple[str, ...], side: str) -> dict:
    """The values a child process parses back from the flags its parent hands it."""
    child = module.parse_args(["--side", side, "--child-out", "result.json", *child_flags(
        {f: getattr(args, f) for f in flags})])
    return {f: getattr(child, f) for f in flags}


def test_every_bench_script_is_covered():
    scripts = {p.stem for p in (ROOT / "bench").glob("*.py")} - {"common"}
    tested = {name.removeprefix("test_").removesuffix("_smoke") for name in globals() if name.endswith("_smoke")}
    assert scripts == tested


def test_child_flags():
    assert child_flags({"max_steps": 2, "model": None, "smoke": True, "quiet": False, "lr": 2e-4}) == [
        "--max-steps", "2", "--smoke", "--lr", "0.0002"]


# -- bench/train.py: lorafit train vs transformers Trainer + PEFT, one subprocess per side --------------------
def test_train_defaults(smollm2_dir, tmp_path):
    from lorafit.model import DEFAULT_MODEL, resolve_model
    from lorafit.train.run import parse_run_config

    train = bench("train")
    args = train.parse_args([])
    config = parse_run_config(train.train_config_raw(args, str(tmp_path)), "bench")  # the run each side makes
    assert config.model == DEFAULT_MODEL and resolve_model(config.model) == smollm2_dir
    assert config.train.max_steps == args.max_steps >= 2 and config.quantize is None
    for side in train.SIDES:
        assert round_trip(train, args, train.CHILD_FLAGS, side) == {f: getattr(args, f) for f in train.CHILD_FLAGS}


def test_train_smoke(smollm2_dir, tmp_path):
    out = run_script("train", "--smoke", "--json", str(tmp_path / "r.json"), cwd=tmp_path)
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    lf, hf = results["lorafit"], results["hf"]
    for r in (lf, hf):
        assert r["steps"] == 2 and finite(r["tokens_per_s"], r["loop_s"], r["peak_rss_mib"], *r["losses"])
    assert lf["tokens_per_step"] == hf["tokens_per_step"] and sum(lf["tokens_per_step"]) > 0
    assert lf["losses"][0] == pytest.approx(hf["losses"][0], rel=1e-3)  # same weights, B = 0
    assert "| lorafit / HF |" in out and "identical on both sides" in out and "MISMATCH" not in out


# -- bench/lora_step.py: one training step, lorafit vs PEFT, one subprocess per side --------------------------
def test_lora_step_defaults():
    lora_step = bench("lora_step")
    args = lora_step.parse_args([])
    assert args.quant in lora_step.QUANT_MODES and args.steps >= 1 and not args.smoke
    for side in lora_step.SIDES:
        assert round_trip(lora_step, args, lora_step.CHILD_FLAGS, side) == {
            f: getattr(args, f) for f in lora_step.CHILD_FLAGS}


def test_lora_step_smoke(tmp_path):
    out = run_script("lora_step", "--smoke", "--json", str(tmp_path / "r.json"), cwd=tmp_path)
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    lf, pf = results["lorafit"], results["peft"]
    for r in (lf, pf):
        assert finite(r["tokens_per_s"], r["step_s"], r["peak_rss_mib"], r["step_overhead_mib"], *r["losses"])
        assert len(r["losses"]) == 2  # 1 warmup + 1 timed
    assert lf["adapted_modules"] == pf["adapted_modules"] == 14  # 7 linears x 2 toy layers
    assert lf["trainable_params"] == pf["trainable_params"]
    assert lf["losses"][0] == pytest.approx(pf["losses"][0], rel=1e-5)
    assert "| lorafit / PEFT |" in out and "MISMATCH" not in out


# -- bench/serve.py: mixed-adapter batches vs the base alone vs PEFT, in one process --------------------------
def test_serve_defaults(smollm2_dir):
    from transformers import AutoTokenizer

    serve = bench("serve")
    args = serve.parse_args([])
    assert args.model is None and args.rounds >= 1 and not args.skip_peft
    jobs = serve.make_jobs(AutoTokenizer.from_pretrained(smollm2_dir), [Path(f"a{i}") for i in range(args.adapters)],
                           args.per_adapter)
    assert len(jobs) == args.adapters * args.per_adapter >= 2  # latency percentiles need two requests
    assert all(ids and adapter.startswith("a") for ids, adapter in jobs)


def test_serve_smoke(smollm2_dir, tmp_path):
    run_script("serve", "--smoke", "--json", str(tmp_path / "r.json"), cwd=tmp_path)
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["tokens"] == 2 * 2 * 4  # 2 adapters x 2 requests x 4 tokens
    assert set(result["sides"]) == {"lorafit mixed batch", "lorafit base only", "PEFT set_adapter per group"}
    assert all(finite(s["tok_s_best"], s["tok_s_median"]) and len(s["runs"]) == 1 for s in result["sides"].values())
    assert set(result["ratios"]) >= {"mixed / base only", "mixed / PEFT"} and finite(*result["ratios"].values())


# -- bench/dist.py: 1 process vs 2 (torchrun), ddp and fsdp --------------------------------------------------
def test_dist_defaults(smollm2_dir, tmp_path):
    from lorafit.model import DEFAULT_MODEL
    from lorafit.train.run import parse_run_config

    dist = bench("dist")
    args = dist.parse_args([])
    for strategy in ["auto", *args.strategies.split(",")]:  # the 1-process run, then each 2-process one
        args.strategy = strategy
        config = parse_run_config(dist.run_config_raw(args, str(tmp_path / "d.jsonl"), str(tmp_path)), "bench")
        assert config.model == DEFAULT_MODEL and config.train.distributed == strategy
        command = dist.child_command(args, 2, strategy, "out", 1)
        assert command[1:3] == ["-m", "torch.distributed.run"]
        child = dist.parse_args(command[command.index("--child"):])
        assert (child.child, child.model, child.strategy, child.max_steps) == (True, None, strategy, args.max_steps)


def test_dist_smoke(smollm2_dir, tmp_path):
    # fsdp only: ddp differs from it by the name handed to the run config (checked above for both), and
    # each 2-process run costs three fresh interpreters
    run_script("dist", "--smoke", "--strategies", "fsdp", "--json", str(tmp_path / "r.json"), cwd=tmp_path)
    runs = json.loads((tmp_path / "r.json").read_text())["runs"]
    assert list(runs) == ["1 process", "2 processes, fsdp"]
    assert [len(ranks) for ranks in runs.values()] == [1, 2]
    one = runs["1 process"][0]
    for ranks in runs.values():
        for r in ranks:
            assert finite(r["tokens_per_s"], r["peak_rss_mib"], r["base_mib"], r["adapter_mib"], *r["losses"])
            assert r["tokens_per_step"] == one["tokens_per_step"]  # the same global batches
            assert r["losses"] == pytest.approx(one["losses"], rel=1e-4)
    assert runs["2 processes, fsdp"][0]["strategy"] == "fsdp"
    assert runs["2 processes, fsdp"][0]["base_mib"] < one["base_mib"]  # each process holds a shard


# -- bench/export.py: lorafit export to GGUF, one subprocess per outtype ---------------------------------------
def test_export_defaults():
    from lorafit.export.writer import check_outtype

    args = bench("export").parse_args([])
    assert args.model is None and args.repeat >= 1
    for outtype in args.outtypes.split(","):
        check_outtype(outtype)


def test_export_smoke(smollm2_dir, tmp_path):
    run_script("export", "--smoke", "--json", str(tmp_path / "r.json"), cwd=tmp_path)
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert list(results) == ["f16", "q8_0"]
    for r in results.values():
        best = r["best"]
        assert finite(best["load_merge_s"], best["write_s"], best["file_mib"], best["peak_rss_mib"])
    assert 0 < results["q8_0"]["best"]["file_mib"] < results["f16"]["best"]["file_mib"]


# -- bench/nf4.py: NF4 quantize / dequantize, lorafit vs bitsandbytes, in one process -------------------------
def test_nf4_defaults():
    nf4 = bench("nf4")
    args = nf4.parse_args([])
    assert args.device == ("cuda" if torch.cuda.is_available() else "cpu")  # falls back to the CPU
    assert args.repeat >= 1 and all(rows * cols % 64 == 0 for rows, cols in nf4.SHAPES)  # whole blocks of 64


def test_nf4_smoke(tmp_path):
    pytest.importorskip("bitsandbytes")
    out = run_script("nf4", "--smoke", "--device", "cpu", "--json", str(tmp_path / "r.json"), cwd=tmp_path)
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["device"] == "cpu" and result["backend"] and "lorafit NF4 backend on cpu" in out
    assert [(row["shape"], row["op"]) for row in result["rows"]] == [([64, 128], "quant"), ([64, 128], "dequant")]
    assert all(finite(r["lorafit_params_per_s"], r["bnb_params_per_s"], r["ratio"]) for r in result["rows"])


# -- bench/demo_search.py: one setting of the demo's recipe, scored on a larger held-out set -----------------
def test_demo_search_defaults(tmp_path):
    from lorafit.model import DEFAULT_MODEL

    demo_search = bench("demo_search")
    args = demo_search.parse_args([])
    assert args.model == DEFAULT_MODEL and args.quantize in ("nf4", "none")
    assert Path(args.out) == ROOT / "bench" / "demo_search.jsonl"  # the evidence file, wherever it is run from
    config = demo_search.train_config(args, tmp_path)
    assert (config.max_steps, config.batch_size, config.learning_rate) == (args.steps, args.batch_size, args.lr)


def test_demo_search_smoke(smollm2_dir, tmp_path):
    out = run_script("demo_search", "--smoke", cwd=tmp_path)
    row = json.loads(next(line for line in out.splitlines() if line.startswith("{")))  # --smoke: the row to stdout
    assert (row["steps"], row["n_eval"], row["quantize"]) == (2, 4, "nf4")
    assert 0 <= row["exact_match"] <= 1 and row["n_wrong"] == round(4 * (1 - row["exact_match"]))
    assert finite(row["loss_last5"], row["load_s"], row["train_s"], row["eval_s"])
    assert not list(tmp_path.iterdir())  # nothing written where it ran


# -- bench/loftq.py: LoftQ vs plain QLoRA initialisation -----------------------------------------------------
def test_loftq_defaults():
    loftq = bench("loftq")
    args = loftq.parse_args([])
    assert args.sides.split(",") == list(loftq.SIDES)
    assert loftq.lora_config("loftq", args).init == "loftq" and loftq.lora_config("plain", args).r == args.rank
    with pytest.raises(SystemExit):
        loftq.parse_args(["--sides", "plain,lotfq"])


def test_loftq_smoke(smollm2_dir, tmp_path):
    out = run_script("loftq", "--smoke", "--json", str(tmp_path / "r.json"), cwd=tmp_path)
    plain, loftq = json.loads((tmp_path / "r.json").read_text())["results"]
    assert (plain["side"], loftq["side"]) == ("plain", "loftq")
    for r in (plain, loftq):
        assert r["layers"] == 14 and r["losses"]
        assert finite(r["weight_error_mean"], r["weight_error_max"], r["val_loss_before"], *r["losses"])
    assert loftq["weight_error_mean"] < plain["weight_error_mean"]  # what LoftQ is for
    assert "plain QLoRA" in out and "weight error mean" in out


# -- bench/gpu_train.py: QLoRA training on one GPU, lorafit vs PEFT + bitsandbytes ----------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_gpu_train_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        bench("gpu_train").main([])
    message = capsys.readouterr().err
    assert e.value.code == 2 and message.count("\n") == 1 and "no CUDA GPU" in message and "--dry-run" in message


def test_gpu_train_smoke(tmp_path):
    pytest.importorskip("bitsandbytes")
    out = run_script("gpu_train", "--smoke", "--json", str(tmp_path / "r.json"), cwd=tmp_path)
    report = json.loads((tmp_path / "r.json").read_text())
    tiny = report["shapes"]["tiny"]
    for side in ("lorafit", "peft"):
        r = tiny[side]
        assert r["ok"] and finite(r["tokens_per_s"], r["step_s"], r["mfu"]) and r["trainable"] > 0
        assert 5.0 < r["loss"] < 6.0  # ~ln(256) at random init
    assert finite(report["matmul_peak_tflops"], report["copy_gbps"]) and "lorafit / peft" in out


def test_gpu_train_flops_formula():
    # Llama 3 8B: ~7.5e9 linear parameters incl. the head -> 6N = 4.5e10 plus 12 L H T = 3.2e9 attention FLOPs per
    # token at seq 2048
    assert 4.7e10 < bench("gpu_train").model_flops_per_token("8b", 2048) < 4.9e10


# -- bench/eval_adapters.py: four adapters in one `lorafit eval` run vs four runs ------------------------------
def test_eval_adapters_defaults():
    args = bench("eval_adapters").parse_args([])
    assert (args.model, args.records, args.new_tokens, args.rounds, args.smoke) == (None, 40, 12, 2, False)
    smoke = bench("eval_adapters").parse_args(["--smoke"])
    assert (smoke.records, smoke.new_tokens, smoke.rounds) == (4, 2, 1)


def test_eval_adapters_smoke(smollm2_dir, tmp_path):
    out = run_script("eval_adapters", "--smoke", "--json", str(tmp_path / "r.json"), cwd=tmp_path)
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["together"]) == set(report["apart"]) == {"a0", "a1", "a2", "a3"}
    for name, scores in report["together"].items():  # both sides scored the same adapters the same way
        assert finite(scores["loss"], report["apart"][name]["loss"], report["ratio"])
        assert scores["exact"] == report["apart"][name]["exact"]
    assert [len(t) for t in report["times"].values()] == [1, 1] and "ratio (4 runs / one run)" in out


# -- bench/packing.py: packed training, before (a git revision) and after (this tree), one subprocess per side -
def test_packing_smoke(smollm2_dir, tmp_path):
    """Both sides import their own lorafit (the script checks it), train on packed rows and score them; this
    tree's packed validation loss is each sample's loss alone."""
    out = run_script("packing", "--before", "HEAD", "--train-samples", "4", "--val-samples", "2", "--batch-size", "2",
                     cwd=tmp_path)
    report = json.loads(out.strip().splitlines()[-1])
    assert set(report) == {"before", "after"} and "lorafit-before-" in report["before"]["lorafit"]
    after = report["after"]["packed"]
    assert after["samples"] == 4 and after["steps"] >= 1 and finite(after["val_loss_each_alone"])
    assert after["val_loss_packed_rows"] == pytest.approx(after["val_loss_each_alone"], rel=1e-5)


# -- bench/prefs.py: DPO, lorafit train vs TRL's DPOTrainer + PEFT + bitsandbytes, one subprocess per side ------
def test_prefs_defaults(smollm2_dir, tmp_path):
    prefs = bench("prefs")
    args = prefs.parse_args([])
    assert args.quant == "nf4" and args.max_steps >= 2 and args.model is None and not args.smoke
    for side in prefs.SIDES:
        assert round_trip(prefs, args, prefs.CHILD_FLAGS, side) == {f: getattr(args, f) for f in prefs.CHILD_FLAGS}
    pairs = [json.loads(line) for line in Path(prefs.write_pairs(str(tmp_path / "p.jsonl"), 4, 0)).read_text().splitlines()]
    assert all(p["chosen"] != p["rejected"] and p["prompt"][0]["role"] == "user" for p in pairs)


def test_prefs_smoke(smollm2_dir, tmp_path):
    out = run_script("prefs", "--smoke", "--json", str(tmp_path / "r.json"), cwd=tmp_path)
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    lf, tr = results["lorafit"], results["trl"]
    for r in (lf, tr):
        assert r["steps"] == 2 and finite(r["tokens_per_s"], r["loop_s"], r["peak_rss_mib"], *r["losses"])
    assert lf["tokens_per_step"] == tr["tokens_per_step"] and sum(lf["tokens_per_step"]) > 0
    assert lf["losses"][0] == pytest.approx(math.log(2), abs=1e-5) and tr["losses"][0] == pytest.approx(math.log(2), abs=1e-5)  # B = 0
    assert "| lorafit / TRL |" in out and "identical on both sides" in out and "MISMATCH" not in out


# -- bench/dpo_demo.py: DPO on the demo's date task from the base and from the SFT demo adapter -----------------
def test_dpo_demo_defaults():
    dpo_demo = bench("dpo_demo")
    args = dpo_demo.parse_args([])
    assert (args.pairs, args.steps, args.eval_records, args.sft_steps) == (256, 32, 100, 80)
    assert args.runs.split(",") == ["dpo-base", "dpo-sft"]
    assert args.model is None and args.sft_adapter is None and not args.smoke


def test_dpo_demo_smoke(smollm2_dir, tmp_path):
    out = tmp_path / "out"
    run_script("dpo_demo", "--smoke", "--out", str(out), cwd=tmp_path)
    results = json.loads((out / "results.json").read_text())
    assert results["counts"]["train"]["records"] == 4 and (out / "rewards.png").stat().st_size > 0
    for name in ("dpo-base", "dpo-sft"):
        r, config = results[name], (out / f"{name}.yaml").read_text()
        assert 0 <= r["before"] <= 1 and 0 <= r["after"] <= 1 and len(r["history"]) == 2
        assert r["history"][0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the reference is the start
        assert finite(*(h["rewards/accuracies"] for h in r["history"]), r["history"][-1]["val_rewards/accuracies"])
        assert ("adapter:" in config) == (name == "dpo-sft") and (out / name / "adapter").is_dir()
    assert not (set(tmp_path.iterdir()) - {out})  # nothing written where it ran


def test_grpo_defaults():
    args = bench("grpo").parse_args([])
    assert (args.prompts, args.generations, args.new_tokens, args.steps) == (4, 8, 32, 4)  # the sizes
    assert args.model is None and not args.smoke


def test_grpo_smoke(smollm2_dir, tmp_path):
    """Both sides train the same number of steps on the toy model, and the report has every number."""
    out = tmp_path / "grpo.json"
    run_script("grpo", "--smoke", "--threads", "1", "--json", str(out), cwd=tmp_path)
    report = json.loads(out.read_text())
    for side in ("lorafit", "trl"):
        r = report[side]
        assert len(r["steps"]) == 2 and finite(r["step_s"], r["generation_s"], r["training_s"], r["peak_rss_mib"])
        assert r["tokens_per_step"] > 0
    assert finite(report["speedup"], report["memory_ratio"]) and report["config"]["generations"] == 2
