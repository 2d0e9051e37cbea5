"""Where lorafit keeps files between runs, and how it writes files and folders so that they are whole or absent.

`cache_dir`: one cache folder for converted models and built kernels, `$LORAFIT_CACHE`, default
`~/.cache/lorafit`. `write_folder`: build a folder beside its target and rename it into place (model
conversions, merged models, full fine-tunes, trainer checkpoints). `temporary_file`: the same for one
file (adapters, GGUF files). Both give what they create the permissions the process's umask gives a
new file or folder (0644 / 0755 under the usual 022), as `open` and `mkdir` would: `mkstemp` and
`mkdtemp` alone make them private (0600 / 0700), which another user, a container or a server process
could not read. This module imports nothing of lorafit, so every room can use it without depending on
another.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def cache_dir() -> Path:
    """The cache folder (not created here; each user makes the subfolder it writes)."""
    return Path(os.environ.get("LORAFIT_CACHE", Path.home() / ".cache" / "lorafit"))


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status: changing
    it, even for an instant, would race with files other threads create); elsewhere set and restored."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode(folder: bool = False) -> int:
    """The mode `open` (0o666) or `mkdir` (0o777) would give a new file or folder under the umask."""
    return (0o777 if folder else 0o666) & ~umask()


@contextlib.contextmanager
def temporary_file(target: str | Path) -> Iterator[Path]:
    """A fresh temporary path beside `target` (a dot name, so globs of finished files never see it)
    with the permissions of a new file; renamed onto `target` when the block ends without an error,
    deleted when it raises (an interrupt included)."""
    target = Path(target)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        os.close(fd)
        yield tmp
        tmp.chmod(new_file_mode())  # after the write: some writers (safetensors) make the file anew, private
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after the rename


def write_folder(target: str | Path, write: Callable[[Path], None]) -> Path:
    """Fill a fresh temporary folder beside `target` with `write(tmp)`, then rename it onto `target`
    (replacing a folder or file there). An interrupted or failing write leaves `target` as it was and
    no temporary folder behind; the temporary name starts with a dot, so globs of finished folders
    (`step-*`) never see it. The folder and everything in it get the permissions of a new folder or
    file (the umask's), whatever the writers did (safetensors makes its files 0600)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        write(tmp)
        for path in [tmp, *tmp.rglob("*")]:
            if not path.is_symlink():
                path.chmod(new_file_mode(folder=path.is_dir()))
        if target.is_dir():
            remove_folder(target)
        elif target.exists():
            target.unlink()
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after the rename
    return target


def remove_folder(folder: str | Path) -> None:
    """Delete a folder so that it is never seen half deleted under its name: it is renamed to a dot
    name first (`.NAME.deleting-*`, which a later `clean_leftovers` removes if this is interrupted)."""
    folder = Path(folder)
    doomed = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.deleting-"))
    os.replace(folder, doomed)  # onto the empty folder mkdtemp made: atomic
    shutil.rmtree(doomed, ignore_errors=True)


def clean_leftovers(folder: str | Path) -> list[Path]:
    """Remove what an interrupted `write_folder`, `temporary_file` or `remove_folder` left directly in
    `folder` (their dot names); returns what was removed."""
    removed = []
    for p in Path(folder).glob(".*"):
        if ".tmp-" in p.name or ".deleting-" in p.name or (p.name.endswith(".tmp") and p.is_file()):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed
