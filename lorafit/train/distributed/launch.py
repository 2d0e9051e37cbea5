"""`lorafit train --nproc-per-node N`: start the run on N processes of this machine through torchrun.

What runs is torchrun itself, printed first so that it can be reused or extended:

    python -m torch.distributed.run --standalone --nproc-per-node N -m lorafit train [the same arguments]

`--standalone` lets torchrun pick a free port for its rendezvous on this machine. Several machines:
run torchrun on each of them with its own `--nnodes`, `--node-rank` / `--rdzv-endpoint` (docs/guides/distributed.md).
Everything that can be checked before the processes start is checked here (the config, the batch
against N, the GPUs), so a mistake is one line and exit status 2, not N tracebacks. On the CPU each
process gets an equal part of the cores (OMP_NUM_THREADS, unless set).

The exit status is torchrun's: 0, or non-zero when a process failed; torchrun then stops the others
and names the failed rank and its error.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

from lorafit.errors import LorafitError
from lorafit.train.distributed.share import check_batch
from lorafit.train.distributed.world import launched_size


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun command line running `lorafit <argv>` on `nproc` processes of this machine."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "lorafit", *argv]


def check_launch(nproc: int, batch_size: int, device: str, data_path: str | None) -> None:
    """The mistakes to refuse before starting any process (LorafitError, one line each)."""
    if nproc < 1:
        raise LorafitError(f"--nproc-per-node {nproc}: give a number of processes, at least 1")
    if launched_size() > 1:
        raise LorafitError("--nproc-per-node starts torchrun, but this already is one of torchrun's processes; "
                           "drop --nproc-per-node")
    check_batch(batch_size, nproc, "batch_size")
    import torch

    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        if ":" in device:
            raise LorafitError(f"device {device!r}: with --nproc-per-node each process uses its own GPU; use "
                               "--device cuda (or auto), and CUDA_VISIBLE_DEVICES to choose the GPUs")
        if nproc > torch.cuda.device_count():
            raise LorafitError(f"--nproc-per-node {nproc} on --device {device}: only {torch.cuda.device_count()} "
                               "GPU(s) are visible (one process per GPU)")
    if data_path is not None and not os.path.isfile(data_path):
        raise LorafitError(f"{data_path}: file not found: check the data path")


def launch(nproc: int, argv: list[str]) -> int:
    """Run torchrun for `lorafit <argv>` on `nproc` processes and return its exit status."""
    cmd = torchrun_command(nproc, argv)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    print(f"lorafit train: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # torchrun got the same Ctrl-C and stops its processes: wait for it
        return proc.wait()
