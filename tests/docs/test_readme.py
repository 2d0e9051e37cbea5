"""The README is the front door: the two commands first, at most ~120 lines, and everything it used to
explain has a page in the docs. FORMER_HEADINGS are the README's headings before its content moved to
docs/ (and those added since), each with the page (and section) that now covers it."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.docs.conftest import ROOT

README = ROOT / "README.md"

FORMER_HEADINGS = {
    "Versions": "development.md#versions",
    "Use it from Python": "guides/python.md#adapters-on-any-transformers-model",
    "More adapter methods: (IA)³, AdaLoRA, LoRA on MoE experts": "guides/methods.md#ia3-adalora-lora-on-moe-experts",
    "Combine and hot-swap adapters": "guides/python.md#combine-and-hot-swap-adapters",
    "Command line": "reference/cli.md",
    "QLoRA: NF4 and ternary bases": "guides/quantization.md",
    "Which models fit: `lorafit estimate --method ternary`": "guides/estimate.md#which-models-fit-on-a-ternary-base",
    "Training": "guides/training.md",
    "Preference training: DPO (and its loss family), ORPO, SimPO, KTO": "preference.md",
    "Reinforcement learning: GRPO, with rollouts from lorafit's own engine": "grpo.md",
    "Watch the run: TensorBoard, MLflow, W&B, trackio":
        "guides/tracking.md#experiment-trackers-tensorboard-mlflow-wb-trackio",
    "Model cards": "guides/tracking.md#model-cards",
    "Judge the result: `lorafit eval`": "guides/eval.md",
    "What did my adapter learn, and which settings pay? `lorafit inspect`, `lorafit ablate`": "guides/inspect.md",
    "Model families and the prompt format": "guides/models.md",
    "On a GPU": "guides/gpu.md",
    "The GPU check (`bench/gpu_check.sh`)": "guides/gpu.md#the-gpu-check-bash-benchgpu_checksh",
    "Several GPUs or machines": "guides/distributed.md",
    "Export to GGUF (llama.cpp, Ollama, LM Studio)": "guides/export.md#export-to-gguf-llamacpp-ollama-lm-studio",
    "Serve many adapters at once": "guides/serving.md",
    "Is it what users will run? `lorafit verify`": "guides/verify.md",
    "Layout": "development.md#the-code",
}


def test_the_readme_opens_with_the_two_commands_and_stays_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= 120
    code = lines[lines.index("```bash") + 1:lines.index("```bash") + 3]
    assert lines.index("```bash") <= 3
    assert code[0].startswith("make demo") and code[1].startswith("make test")


def test_every_former_readme_heading_has_a_docs_page(site):
    for heading, target in FORMER_HEADINGS.items():
        page, _, anchor = target.partition("#")
        html = (site / page).with_suffix(".html").read_text()
        assert "<h1" in html, (heading, page)
        if anchor:
            assert f'id="{anchor}"' in html, f"{heading!r}: no section #{anchor} on {page}"


def test_every_heading_the_readme_ever_had_is_listed_above():
    """The README's history (git log) gives every heading it has had: each is in FORMER_HEADINGS (so the
    test above checks its page) or one of today's. A section added to the README and later moved out is
    caught here too."""
    try:
        log = subprocess.run(["git", "log", "-p", "-U0", "--format=", "--", "README.md"], cwd=ROOT,
                             capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the README's history is unknown")
    ever = set(re.findall(r"^\+#{2,3} (.+?)\s*$", log, re.M))
    today = set(re.findall(r"^#{2,} (.+)$", README.read_text(), re.M))
    assert ever, "no README history"
    assert ever - today <= set(FORMER_HEADINGS), sorted(ever - today - set(FORMER_HEADINGS))


def test_every_readme_heading_today_is_a_former_one_or_short():
    """A section someone adds to the README later belongs in the docs too: the README keeps only these."""
    headings = re.findall(r"^#{2,} (.+)$", README.read_text(), re.M)
    assert set(headings) <= {"In Python", "On the command line", "What it does"}, headings


def test_the_readme_links_resolve():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README.read_text()):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), target
