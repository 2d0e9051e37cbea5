"""The repository speaks of lorafit and its users only. Every tracked text file but this one is searched
for words about how the project is developed rather than used: borrowed or lent GPU machines and who had
one, development sessions and the people or tools running them, and the call syntax that carries folders
to a remote machine. The GPU check is documented for any CUDA machine (docs/guides/gpu.md)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.docs.conftest import ROOT

WORDS = {  # what the pattern finds -> the pattern (case-insensitive)
    "a lent or borrowed machine": r"\blent\b|\bborrow(?:ed|ing)?\s+(?:an?\s+|the\s+)?(?:gpus?|machines?|devices?|h100|h200)",
    "the device tool": r"\bdevice\s+tool\b",
    "calls that carry folders": r"\bcarry\s*=\s*\[|\brun\(\s*command\s*=|\bcarr(?:y|ies|ied)\s+(?:\.gpu|folders?)\b",
    "the tool's status fields": r"\bcan_start_another\b|\bbudget_left_s?\b|\bgive_back\b|\bidle_release\b|\bfiles_fetch\b",
    "development sessions": r"\b(?:this|that|these|those|both|other|first|second|next|earlier|later|previous|"
                            r"development|dev|coding)\s+sessions?\b(?!\s*(?:fixture|scope))|\bsession\s+\d\b",
    "the people building it": r"\b(?:other|fellow)\s+engineers?\b|\blead\s+engineer\b|(?<!\w)\(lead\)|\bhelper\s+run\b",
    "whether a task was drawn for a GPU": r"\bnot\s+drawn\b|\bdrawn\s+for\s+a\s+gpu\b",
    "the development machine's folders": r"/work/(?:wt|main|notes|shared)\b|\bworktrees?\b",
}
PATTERN = re.compile("|".join(f"(?P<w{i}>{p})" for i, p in enumerate(WORDS.values())), re.I)
NAMES = list(WORDS)


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    return [ROOT / name for name in out.decode().split("\0") if name]


def findings(text: str) -> list[tuple[int, str, str]]:
    """(line number, what, the words) for every match in text."""
    found = []
    for m in PATTERN.finditer(text):
        what = NAMES[int(next(k for k, v in m.groupdict().items() if v)[1:])]
        found.append((text.count("\n", 0, m.start()) + 1, what, m.group(0)))
    return found


def test_no_tracked_file_speaks_of_how_the_project_is_developed():
    this = Path(__file__).resolve()
    problems = []
    files = tracked_files()
    assert len(files) > 100
    for path in files:
        if path.resolve() == this or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary (PNG, ...)
        problems += [f"{path.relative_to(ROOT)}:{line}: {what} ({words!r})" for line, what, words in findings(text)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("text", [
    "bash bench/gpu_check.sh            on the lent H200",
    "The device tool's `status` said",
    '#   run(command="true", carry=[".gpu/a"])',
    "No GPU has been lent to this project's sessions yet; the first session that has one runs this",
    "Quiet-machine runs, 2026-11-23 session 2",
    "load average 8-10 (other engineers' tests)",
    "### Chunked loss (issue 6), helper run on the shared machine",
    "this task is not drawn for a GPU (`can_start_another: false`)",
    "(/work/wt-before, the last commit)",
    "borrowed a GPU machine",
    "kept both sides (lead) when merging",
])
def test_the_words_it_looks_for_are_found(text):
    assert findings(text)


@pytest.mark.parametrize("text", [
    '@pytest.fixture(scope="session")',
    "the session fixture other tests share",
    "a helper thread takes chunks from a shared counter",
    "AdamW states are sent to the device",
    "trained once per session (a pytest fixture)",
    "on any CUDA machine: bash bench/gpu_check.sh",
    "the engine's HTTP session",
    "header = lead[: len(lead) - len(user_before)]",
])
def test_ordinary_words_pass(text):
    assert not findings(text)
