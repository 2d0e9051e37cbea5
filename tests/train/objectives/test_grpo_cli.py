"""`lorafit train --method grpo`: bad input is one line naming the reward function or field, exit status 2,
before the model loads where the mistake can be seen without it (those cases name a model folder that does not
exist: loading it would be a different error); a good run writes TRL's metric names, rewards.png and
samples.jsonl."""

from __future__ import annotations

import json

import pytest

from lorafit.cli import main
from tests.train.objectives.test_preference_cli import model_dir, one_line, write  # noqa: F401 (fixture)

PROMPTS = [{"prompt": [{"role": "user", "content": f"What is {a} plus {a}?"}], "answer": str(2 * a)} for a in range(6)]
REWARDS = '''
def two_args(prompts, completions):
    return [0.0] * len(completions)


def one_arg(completions):
    return [0.0] * len(completions)


def too_few(prompts, completions, **kwargs):
    return [1.0]


def raises(prompts, completions, **kwargs):
    raise KeyError("score")
'''


def grpo(model, tmp_path, *flags: str) -> list[str]:
    data = write(tmp_path / "prompts.jsonl", PROMPTS)
    return ["train", "--model", str(model), "--data", data, "--device", "cpu", "--method", "grpo", "--max-steps", "2",
            "--batch-size", "4", "--lora.r", "2", "--output-dir", str(tmp_path / "out"),
            "--grpo.num-generations", "2", "--grpo.max-completion-length", "4", *flags]


BEFORE_LOADING = [
    (["--grpo.reward-funcs", "[no_such_module_xyz:score]"], "grpo.reward_funcs[0]: cannot import module "
                                                             "'no_such_module_xyz'"),
    (["--grpo.reward-funcs", "[{rewards}:missing]"], "has no 'missing'"),
    (["--grpo.reward-funcs", "[{rewards}:one_arg]"], "one_arg takes"),
    (["--grpo.reward-funcs", "[exact_match]", "--grpo.num-generations", "1"], "grpo.num_generations must be at least 2"),
    (["--grpo.reward-funcs", "[exact_match]", "--grpo.num-generations", "3"], "batch_size 4 is not divisible by "
                                                                              "grpo.num_generations 3"),
    (["--grpo.reward-funcs", "[{name: exact_match, column: solution}]"], "exact_match compares with the column 'solution', "
                                                                   "which the records do not have (they have answer)"),
]


@pytest.mark.parametrize("flags,message", BEFORE_LOADING, ids=[m[1][:40] for m in BEFORE_LOADING])
def test_bad_input_is_one_line_before_the_model_loads(tmp_path, capsys, flags, message):
    rewards = tmp_path / "my_rewards.py"
    rewards.write_text(REWARDS)
    flags = [f.replace("{rewards}", str(rewards)) for f in flags]
    line = one_line(capsys, main(grpo(tmp_path / "no-such-model", tmp_path, *flags)))
    assert message in line, line
    assert "no-such-model" not in line  # the model was never looked at


@pytest.mark.parametrize("name,message", [("too_few", "too_few ({rewards}:too_few) returned 1 value(s) for 4 "
                                                      "completions"),
                                          ("raises", "raises ({rewards}:raises) raised KeyError: 'score'")])
def test_a_failing_reward_stops_the_first_step_in_one_line(model_dir, tmp_path, capsys, name, message):  # noqa: F811
    rewards = tmp_path / "my_rewards.py"
    rewards.write_text(REWARDS)
    line = one_line(capsys, main(grpo(model_dir, tmp_path, "--grpo.reward-funcs", f"[{rewards}:{name}]")))
    assert message.replace("{rewards}", str(rewards)) in line, line
    assert not (tmp_path / "out" / "adapter").exists()


def test_a_grpo_run_logs_trls_metrics_rewards_png_and_samples(model_dir, tmp_path, capsys):  # noqa: F811
    rewards = tmp_path / "my_rewards.py"
    rewards.write_text(REWARDS)
    status = main(grpo(model_dir, tmp_path, "--grpo.reward-funcs", f"[exact_match, {rewards}:two_args]",
                       "--grpo.beta", "0.04", "--eval-steps", "2", "--data.val-fraction", "0.34"))
    assert status == 0, capsys.readouterr().err[-3000:]
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    names = {"reward", "reward_std", "rewards/exact_match/mean", "rewards/exact_match/std", "rewards/two_args/mean",
             "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio", "kl", "entropy",
             "clip_ratio/region_mean", "sampling/sampling_logp_difference/max", "time/generation", "time/scoring",
             "step_time"}
    assert names <= set(records[0]), names - set(records[0])
    assert records[0]["sampling/sampling_logp_difference/max"] <= 1e-4
    assert "val_reward" in records[-1]
    assert (out / "rewards.png").stat().st_size > 1000
    # the adapter's fingerprint probes the first completion token's distribution after each prompt
    fingerprint = json.loads((out / "adapter" / "lorafit_fingerprint.json").read_text())
    assert fingerprint["probes"], fingerprint
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and {"step", "prompt", "completion", "rewards", "reward"} <= set(samples[0])


def test_the_grpo_demo_runs_its_whole_path(model_dir, tmp_path, capsys):  # noqa: F811
    """`lorafit demo --method grpo` at toy size (the tiny model, 2 steps): held-out exact match before and
    after, the reward curve and the time split are written (what it learns on SmolLM2: docs/grpo.md)."""
    from lorafit.demo_grpo import GRPODemoConfig, run_grpo_demo

    result = run_grpo_demo(GRPODemoConfig(output_dir=str(tmp_path / "demo"), model=str(model_dir), n_train=8,
                                          n_eval=4, steps=2, prompts_per_step=2, num_generations=2,
                                          max_completion_length=4, rank=2, device="cpu"))
    assert 0 <= result["acc_before"] <= 1 and 0 <= result["acc_after"] <= 1
    assert result["generation_s"] > 0 and result["training_s"] > 0
    assert json.loads((tmp_path / "demo" / "demo.json").read_text()) == result
    assert (tmp_path / "demo" / "rewards.png").stat().st_size > 1000
    assert "held-out exact match" in capsys.readouterr().out
