"""What a `lorafit` command shows on the terminal, apart from its results.

`Parser`: argparse whose own errors (a missing or malformed argument) are one line, exit status 2.
`Help`: every option's help ends with its default. `TrainHelp`: `lorafit train --help` keeps its
description (the commented run file) as written. `one_line_warnings`: a warning is one line, with no
Python source location. `pipeable`: a reader that stops early (`lorafit estimate | head -1`) ends the
command quietly, with status 141 as for other tools killed by SIGPIPE.

argparse and the standard library only; no lorafit imports.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Callable


class Parser(argparse.ArgumentParser):
    """argparse, with its own errors (a missing or malformed argument) on one line, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default (argparse's "(default: X)"), where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == [] \
                or action.default is argparse.SUPPRESS \
                or action.help is None or "default:" in action.help:
            return action.help
        return super()._get_help_string(action)


class TrainHelp(argparse.RawDescriptionHelpFormatter):
    """`lorafit train --help`: the description and the example run file as written."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=36)


def one_line_warnings(command: str) -> None:
    """Warnings as one line each: lorafit's own as `lorafit CMD: warning: ...`, others' with their
    category (no Python source line: the user did not write it)."""
    def show(message, category, filename, lineno, file=None, line=None):
        own = "/lorafit/" in filename.replace(os.sep, "/")
        text = str(message).replace("\n", " ")
        out = file if file is not None else sys.stderr
        with contextlib.suppress(OSError, ValueError):  # stderr closed or gone
            out.write(f"lorafit {command}: warning: {text}\n" if own else f"{category.__name__}: {text}\n")
    warnings.showwarning = show


def pipeable(main: Callable[[], int]) -> int:
    """`main()`'s exit status; 141 and nothing on stderr when stdout's reader has gone (head, grep -m)."""
    try:
        try:
            status = main()
        except SystemExit as e:  # argparse's --help, --version and usage errors: flushed below as well
            status = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        sys.stdout.flush()  # a reader that stopped early shows here, not at exit
    except BrokenPipeError:
        # end quietly, as other tools killed by SIGPIPE do; stdout goes to /dev/null so that Python's
        # own flush at exit does not fail once more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return status
