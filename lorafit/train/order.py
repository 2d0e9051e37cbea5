"""Which samples each micro-batch of a run holds: a seeded shuffle per epoch, rebuilt exactly on resume."""

from __future__ import annotations

import math
import random


class EpochOrder:
    """Which samples micro-batch `index` of a run holds.

    Epoch e is the permutation `random.Random(seed + e).shuffle(range(n_samples))`, cut into batches of
    `batch_size` (the last one of an epoch may be shorter), so any position can be rebuilt on resume
    without replaying the ones before it. The permutation is computed once per epoch and kept (a
    micro-batch costs O(batch_size), not a shuffle of the whole data set).
    """

    def __init__(self, n_samples: int, batch_size: int, seed: int) -> None:
        self.n_samples, self.batch_size, self.seed = n_samples, batch_size, seed
        self.batches_per_epoch = math.ceil(n_samples / batch_size)
        self._epoch, self._order = -1, []

    def epoch(self, epoch: int) -> list[int]:
        """The order of all samples in epoch `epoch` (the cached list: do not modify it)."""
        if epoch != self._epoch:
            order = list(range(self.n_samples))
            random.Random(self.seed + epoch).shuffle(order)
            self._epoch, self._order = epoch, order
        return self._order

    def indices(self, index: int) -> list[int]:
        """Sample indices of micro-batch `index` (counted from the start of the run)."""
        epoch, pos = divmod(index, self.batches_per_epoch)
        return self.epoch(epoch)[pos * self.batch_size:(pos + 1) * self.batch_size]
