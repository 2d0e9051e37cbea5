"""Where lorafit keeps files between runs, and how it writes a folder so that it is whole or absent.

`cache_dir`: one cache folder for converted models and built kernels, `$LORAFIT_CACHE`, default
`~/.cache/lorafit`. `write_folder`: build a folder beside its target and rename it into place (model
conversions, merged models, full fine-tunes, trainer checkpoints). This module imports nothing of
lorafit, so every room can use it without depending on another.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """The cache folder (not created here; each user makes the subfolder it writes)."""
    return Path(os.environ.get("LORAFIT_CACHE", Path.home() / ".cache" / "lorafit"))


def write_folder(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Fill a fresh temporary folder beside `target` with `write(tmp)`, then rename it onto `target`
    (replacing a folder or file there). An interrupted or failing write leaves `target` as it was and
    no temporary folder behind; the temporary name starts with a dot, so globs of finished folders
    (`step-*`) never see it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        write(tmp)
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after the rename
    return target
