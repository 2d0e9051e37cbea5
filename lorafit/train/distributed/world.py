"""The processes of a run: which one this is, how they talk to each other, how they fail together.

torchrun (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT) starts
N copies of one program. `init_world(device, timeout)` joins them in torch.distributed's default
process group:

    backend   NCCL when the run is on CUDA (rank r drives cuda:LOCAL_RANK), gloo on the CPU
    timeout   every collective (all-reduce, all-gather, broadcast) raises after `timeout` seconds
              instead of waiting for ever, so when a rank dies or hangs the others stop with an
              error rather than hang (under torchrun the agent also stops them as soon as one rank
              exits non-zero, and reports that rank's error as the root cause)

One process (no WORLD_SIZE, or 1) is the `World` of size 1: nothing is initialized and every
collective below returns its input, so the trainer has one code path for 1 and N processes.

Collectives here carry a few numbers or small Python objects (target-token counts, losses, RNG
states, a checkpoint's path); tensors of the model travel through DDP / FSDP (lorafit.train.distributed.wrap).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lorafit.errors import LorafitError

DEFAULT_TIMEOUT = 600.0  # seconds; NCCL's own default


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank in [0, size), its device, and the collectives."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints, writes files and reads checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over all ranks (float64, so integer counts stay exact)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def max(self, values: list[float]) -> list[float]:
        """Element-wise maximum of `values` over all ranks (float64)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (a small picklable object)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._object_device())
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """[obj of rank 0, obj of rank 1, ...] on rank 0, None elsewhere."""
        if not self.distributed:
            return [obj]
        out = [None] * self.size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def scatter(self, objs: list[Any] | None) -> Any:
        """Rank r gets objs[r] of rank 0's list (the other ranks pass None)."""
        if not self.distributed:
            return objs[0]
        box = [None]
        dist.scatter_object_list(box, objs if self.is_main else None, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def _object_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


SINGLE = World()


def launched_size() -> int:
    """How many processes the launcher started (WORLD_SIZE; 1 when not under torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise LorafitError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes") from None


def rank_device(device: torch.device | str | None) -> torch.device:
    """The device of this rank for a run on `device`: "cuda" (or "auto" with a GPU) -> cuda:LOCAL_RANK,
    "cpu" -> cpu. An explicit "cuda:N" is refused under torchrun (each rank takes its own GPU)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device in (None, "auto") else torch.device(device)
    if device.type != "cuda":
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if launched_size() > 1 and device.index is not None:
        raise LorafitError(f"device {str(device)!r}: with several processes each one uses cuda:LOCAL_RANK; "
                           "use --device cuda (or auto), and CUDA_VISIBLE_DEVICES to choose the GPUs")
    if local >= torch.cuda.device_count():
        raise LorafitError(f"local rank {local} has no GPU: only {torch.cuda.device_count()} are visible; "
                           "start at most that many processes per machine")
    return torch.device("cuda", local)


def init_world(device: torch.device | str | None = None, timeout: float = DEFAULT_TIMEOUT) -> World:
    """Join the launcher's process group (once; later calls return the same World), or the World of one
    process when there is no launcher. `device`: where the run computes (see `rank_device`)."""
    if dist.is_available() and dist.is_initialized():
        return current_world()
    if launched_size() <= 1:
        return SINGLE
    if not dist.is_available():
        raise LorafitError("this PyTorch build has no torch.distributed: run one process, or install a build with it")
    device = rank_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout)}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)
    return current_world()


def current_world() -> World:
    """The World of the process group already initialized (by `init_world` or by the user), else SINGLE."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return SINGLE
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local, device=device)


def shutdown_world() -> None:
    """Leave the process group (at the end of a run; a no-op for one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
