"""Where lorafit keeps files between runs: one cache folder for converted models and built kernels.

`$LORAFIT_CACHE`, default `~/.cache/lorafit`. This module imports nothing of lorafit, so every room
(model loading, the CPU kernel builder) can use it without depending on another.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache folder (not created here; each user makes the subfolder it writes)."""
    return Path(os.environ.get("LORAFIT_CACHE", Path.home() / ".cache" / "lorafit"))
