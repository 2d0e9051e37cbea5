"""The documentation site, built once per test run with `mkdocs build --strict` (what `make docs` runs)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def docs_hooks():
    """docs/hooks.py (mkdocs.yml's hook module: the generated pages), imported as the build imports it."""
    spec = importlib.util.spec_from_file_location("lorafit_docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def built_site(tmp_path_factory) -> tuple[Path, str]:
    """(the built site's folder, the build's log). The build must pass --strict: any warning (a broken link
    or anchor, a page left out of the nav, an API target mkdocstrings cannot resolve) fails it."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{log}"
    return out, log


@pytest.fixture(scope="session")
def site(built_site) -> Path:
    return built_site[0]
