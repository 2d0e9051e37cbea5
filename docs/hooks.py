"""MkDocs hooks (mkdocs.yml `hooks:`): the pages that are generated, not written.

- reference/cli.md: `lorafit --help` and `lorafit <command> --help` of every subcommand, formatted by
  the CLI's own argparse parsers at HELP_COLUMNS columns (what a terminal that wide shows);
- results.md: the summary table at the top of bench/RESULTS.md, its links pointed at the full log;
- results-log.md: bench/RESULTS.md itself, the full log with date, machine and command per section.

tests/docs/ check the built pages against `lorafit <command> --help` and bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import re
from contextlib import contextmanager
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
RESULTS_LOG = "results-log.md"  # the page bench/RESULTS.md becomes
HELP_COLUMNS = 100
CLI_MARKER = "<!-- lorafit: every subcommand's --help -->"
SUMMARY_MARKER = "<!-- lorafit: the summary table of bench/RESULTS.md -->"
SUMMARY_START = "<!-- summary -->"  # bench/RESULTS.md: the summary table sits between these two lines
SUMMARY_END = "<!-- /summary -->"


@contextmanager
def columns(n: int):
    """argparse wraps help to $COLUMNS (shutil.get_terminal_size): fix it while formatting."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(n)
    try:
        yield
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def help_texts(width: int = HELP_COLUMNS) -> dict[str, str]:
    """{"lorafit": top-level help, "lorafit demo": its help, ...} from the CLI's parser, in its order."""
    from lorafit.cli import build_parser

    with columns(width):
        parser = build_parser()
        texts = {parser.prog: parser.format_help()}
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        for name, sub in action.choices.items():
            texts[f"{parser.prog} {name}"] = sub.format_help()
    return texts


def cli_reference() -> str:
    sections = []
    for command, text in help_texts().items():
        sections.append(f"## `{command}`\n\n```text\n{text.rstrip()}\n```\n")
    return "\n".join(sections)


def results_summary() -> str:
    """The summary table of bench/RESULTS.md, its in-page links pointed at the log page."""
    text = RESULTS.read_text()
    start, end = text.index(SUMMARY_START), text.index(SUMMARY_END)
    table = text[start + len(SUMMARY_START):end].strip()
    return re.sub(r"\]\(#", f"]({RESULTS_LOG}#", table)


def on_files(files, config):
    """bench/RESULTS.md as the page results-log.md (generated at build time, never a copy in docs/)."""
    files.append(File.generated(config, RESULTS_LOG, content=RESULTS.read_text()))
    return files


def on_page_markdown(markdown: str, page, config, files):
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    if SUMMARY_MARKER in markdown:
        markdown = markdown.replace(SUMMARY_MARKER, results_summary())
    return markdown
