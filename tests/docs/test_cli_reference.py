"""The command-line reference is `lorafit <command> --help`, for every subcommand: the built page's text
equals what the CLI prints at the same terminal width (the page is generated from the parsers at build
time by docs/hooks.py; this compares the outcome, not the code)."""

from __future__ import annotations

import html
import io
import os
import re
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from lorafit.cli import build_parser, main
from tests.docs.conftest import docs_hooks


def page_sections(site: Path) -> dict[str, str]:
    """{"lorafit train": the help text shown under that heading, ...} from the built CLI page."""
    page = (site / "reference" / "cli.html").read_text()
    found = re.findall(r'<h2 id="[^"]*"><code>([^<]+)</code>.*?</h2>\s*<div class="highlight"><pre>(.*?)</pre>',
                       page, re.S)
    return {name: html.unescape(re.sub(r"<[^>]+>", "", body)) for name, body in found}


def subcommands() -> list[str]:
    parser = build_parser()
    return list(next(a for a in parser._actions if a.dest == "command").choices)


def printed_help(argv: list[str], columns: int, monkeypatch) -> str:
    """What `lorafit ARGV` prints, by the console script's own function, at a terminal `columns` wide."""
    monkeypatch.setenv("COLUMNS", str(columns))
    out = io.StringIO()
    with redirect_stdout(out):
        try:
            status = main(argv)  # the console script's function: it returns the exit status
        except SystemExit as e:  # (or lets argparse's exit through)
            status = e.code
    assert status in (0, None)
    return out.getvalue()


def test_the_page_has_one_section_per_subcommand(site):
    assert list(page_sections(site)) == ["lorafit"] + [f"lorafit {c}" for c in subcommands()]
    assert len(subcommands()) >= 10


@pytest.mark.parametrize("command", ["", *subcommands()])
def test_each_section_equals_the_commands_help(site, command, monkeypatch):
    columns = docs_hooks().HELP_COLUMNS
    argv = [command, "--help"] if command else ["--help"]
    expected = printed_help(argv, columns, monkeypatch)
    shown = page_sections(site)[f"lorafit {command}".strip()]
    assert shown.rstrip() == expected.rstrip()
    assert len(shown.splitlines()) >= 4


def test_the_installed_lorafit_command_prints_the_same(site):
    """The real console script in a fresh process, for the largest subcommand (every flag of train)."""
    exe = Path(sys.executable).with_name("lorafit")
    env = {**os.environ, "COLUMNS": str(docs_hooks().HELP_COLUMNS)}
    out = subprocess.run([str(exe), "train", "--help"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert page_sections(site)["lorafit train"].rstrip() == out.stdout.rstrip()
    assert "--lora.r INT" in out.stdout
