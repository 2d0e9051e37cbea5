"""Triton kernels. Nothing here imports triton until a kernel is called."""

from __future__ import annotations

import functools


@functools.cache
def available() -> bool:
    """Whether triton can be imported (the CUDA paths fall back to PyTorch when it cannot)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
