"""Which samples each process trains on, so that N processes compute what one would.

`TrainConfig.batch_size` is the micro-batch of the whole run: the trainer's seeded order
(`EpochOrder`) picks the same batch_size samples whatever the number of processes, and rank r takes
the r-th contiguous part of them (`rank_share`). The loss of a step is the sum of the per-token
losses of all ranks' parts over the target tokens of the whole accumulated batch (the count is
all-reduced), and DDP / FSDP average the ranks' gradients, so each rank scales its loss by
world_size / n_target:

    grad = (1/N) * sum_r d/dθ [ N * L_r / n_target ] = d/dθ [ sum_r L_r / n_target ]

which is the gradient of one process holding the whole batch: N ranks x micro-batch b give the
losses and adapter gradients of 1 rank x micro-batch N*b (up to float summation order).

The last batch of an epoch may hold fewer samples than batch_size; when it holds fewer than N, a
rank with no sample runs one sample with every label masked (`masked`): its loss and gradients are
exactly zero, but it joins the collectives of the forward and backward passes as DDP and FSDP need.
"""

from __future__ import annotations

from collections.abc import Callable

from lorafit.errors import LorafitError
from lorafit.train.data import IGNORE, Sample


def check_batch(batch_size: int, world_size: int, where: str = "batch_size") -> None:
    """Refuse, before anything is loaded, a micro-batch the processes cannot share evenly."""
    if world_size <= 1:
        return
    if batch_size < world_size:
        raise LorafitError(f"{where} {batch_size} is smaller than the {world_size} processes: each process needs "
                           f"at least one sample of every micro-batch; use a {where} of at least {world_size} "
                           f"(a multiple of {world_size})")
    if batch_size % world_size:
        raise LorafitError(f"{where} {batch_size} cannot be split evenly over {world_size} processes: use a "
                           f"multiple of {world_size} (each process takes {where} / {world_size} samples of "
                           "every micro-batch), or another number of processes")


def rank_share(items: list, rank: int, size: int) -> list:
    """Rank `rank`'s contiguous part of `items` (parts differ in length by at most one, the first
    ones longer): 8 items over 2 ranks are [0:4] and [4:8]; 3 items are [0:2] and [2:3]."""
    q, r = divmod(len(items), size)
    start = rank * q + min(rank, r)
    return items[start:start + q + (rank < r)]


def masked(sample: Sample) -> Sample:
    """`sample` with no target token: it runs forward and backward and contributes exactly 0."""
    return Sample(list(sample.input_ids), [IGNORE] * len(sample.input_ids), sample.source,
                  None if sample.position_ids is None else list(sample.position_ids))


def local_samples(samples: list, rank: int, size: int, empty: Callable = masked) -> list:
    """This rank's samples of a global micro-batch; a stand-in that contributes nothing when its part is
    empty (`empty(sample)`: `masked` for supervised samples, a zero-weight copy for preference ones)."""
    mine = rank_share(samples, rank, size)
    return mine if mine else [empty(samples[0])]
