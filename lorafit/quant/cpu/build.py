"""Compile a C source into a shared library once per machine, cached, and load it with ctypes.

The library is built with the system C compiler on first use rather than shipped, because the fast
code paths are picked by `-march=native`: the cache key therefore covers the source, the compiler,
the flags and the CPU (model and feature flags), so a cache shared between machines stays correct.
Builds are written to a temporary file and renamed into place, so concurrent processes that race on
the first build each produce a complete file and the last rename wins.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from lorafit.paths import cache_dir

# -ffp-contract=off: no fused multiply-adds, so the kernels round exactly like the PyTorch reference.
# Threads are plain pthreads, not OpenMP: torch bundles its own OpenMP runtime and a second one would
# oversubscribe the cores.
BASE_FLAGS = ("-O3", "-ffp-contract=off", "-shared", "-fPIC", "-pthread")
NATIVE = "-march=native"


def compiler() -> str | None:
    """$CC, else `cc`, else `gcc` on PATH; None when there is none."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def cpu_id() -> str:
    """The CPU model and feature flags (what -march=native depends on)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        wanted = [ln for ln in lines if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(dict.fromkeys(wanted))  # the first core's lines; the others repeat them
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def build(source: Path, arch: str = NATIVE) -> Path:
    """Path of the compiled `source` in the cache, compiling it first if needed.

    Raises OSError when there is no compiler and subprocess.CalledProcessError when compiling fails.
    """
    cc = compiler()
    if cc is None:
        raise OSError("no C compiler found (set CC, or install cc/gcc)")
    flags = [arch, *BASE_FLAGS]
    key = hashlib.sha256("\0".join([source.read_text(), cc, *flags, cpu_id()]).encode()).hexdigest()[:16]
    target = cache_dir() / "ckernels" / f"{source.stem}-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".so")
    os.close(fd)
    try:
        subprocess.run([cc, *flags, "-o", tmp, str(source)], check=True, capture_output=True, text=True,
                       timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


def load(source: Path, arch: str = NATIVE) -> ctypes.CDLL:
    """`build` then `ctypes.CDLL`; raises as `build` does."""
    return ctypes.CDLL(str(build(source, arch)))
