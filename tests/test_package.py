"""`import lorafit` is light: public names load on first use, from the modules that define them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import lorafit

ROOT = Path(__file__).resolve().parent.parent


def test_every_public_name_resolves_to_its_module():
    assert sorted(lorafit.__all__) == sorted(lorafit._EXPORTS)
    for name in lorafit.__all__:
        assert getattr(lorafit, name).__module__ == lorafit._EXPORTS[name], name
    assert lorafit.io.save_adapter is lorafit.save_adapter  # submodules are attributes too
    assert set(lorafit.__all__) <= set(dir(lorafit))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lorafit.nope  # noqa: B018


def test_import_lorafit_does_not_import_torch():
    code = "import sys, lorafit; assert 'torch' not in sys.modules; lorafit.LorafitError; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_import_lorafit_prints_nothing_even_when_its_public_names_load():
    """Neither the import nor the first use of the public names (which imports torch, transformers and the
    layers) writes to stdout or stderr, with transformers' own logging at its default level."""
    code = "import lorafit; [getattr(lorafit, n) for n in lorafit.__all__]"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFORMERS_")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (result.stdout, result.stderr) == ("", "")


def test_no_merge_conflict_left_in_a_tracked_file():
    files = subprocess.run(["git", "ls-files", "-z"], capture_output=True, cwd=ROOT)
    if files.returncode != 0:
        pytest.skip("not a git checkout")
    markers = ("<<<<<<< ", ">>>>>>> ")
    left = [f"{name}:{i}" for name in files.stdout.decode().split("\0") if name and (ROOT / name).is_file()
            for i, line in enumerate((ROOT / name).read_bytes().decode("utf-8", "replace").splitlines(), 1)
            if line.startswith(markers)]
    assert not left, f"merge conflict markers at {', '.join(left[:10])}"
