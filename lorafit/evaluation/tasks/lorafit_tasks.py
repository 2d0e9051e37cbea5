"""The shipped lm-eval tasks' data: JSONL files beside this module, read with no hub and no network
(lm-eval calls these through `custom_dataset: !function lorafit_tasks.<name>` in the YAMLs)."""

import json
from pathlib import Path

HERE = Path(__file__).parent


def _read(name: str) -> list[dict]:
    return [json.loads(line) for line in (HERE / name).read_text().splitlines() if line.strip()]


def dates(**kwargs):
    """30 held-out dates in words -> ISO (the demo's task, another seed), with 3 wrong choices each."""
    from datasets import Dataset

    return {"test": Dataset.from_list(_read("dates.jsonl"))}


def text(**kwargs):
    """Eight short English paragraphs, for loglikelihood_rolling perplexity."""
    from datasets import Dataset

    return {"test": Dataset.from_list(_read("text.jsonl"))}
