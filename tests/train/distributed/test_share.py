"""Which samples each rank takes, and the batch sizes refused before training."""

from __future__ import annotations

import pytest

from lorafit.errors import LorafitError
from lorafit.train.data import IGNORE, Sample, collate
from lorafit.train.distributed.share import check_batch, local_samples, masked, rank_share
from lorafit.train.loss import n_targets


def test_ranks_take_disjoint_contiguous_parts_that_cover_the_batch():
    for n in range(0, 11):
        for size in (1, 2, 3, 4):
            parts = [rank_share(list(range(n)), r, size) for r in range(size)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert [rank_share(list(range(8)), r, 2) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_a_rank_without_samples_runs_a_masked_one():
    """The last batch of an epoch may hold fewer samples than ranks: the rank left without one still
    runs forward and backward (DDP and FSDP need every rank there), with no target token."""
    samples = [Sample([1, 2, 3], [IGNORE, 2, 3], "a:1")]
    assert local_samples(samples, 0, 2) == samples
    stand_in = local_samples(samples, 1, 2)
    assert len(stand_in) == 1 and stand_in[0].input_ids == [1, 2, 3] and n_targets(collate(stand_in, 0)) == 0
    assert masked(samples[0]).labels == [IGNORE] * 3 and samples[0].labels == [IGNORE, 2, 3]


def test_a_batch_the_ranks_cannot_share_is_refused():
    check_batch(4, 2)
    check_batch(3, 1)
    with pytest.raises(LorafitError, match="batch_size 6 cannot be split evenly over 4 processes: use a multiple of 4"):
        check_batch(6, 4)
    with pytest.raises(LorafitError, match="batch_size 2 is smaller than the 4 processes"):
        check_batch(2, 4)


def test_the_trainer_refuses_them_on_every_rank_before_training(two_ranks):
    for rank in two_ranks.ranks:
        first, second, adalora = rank["refused"]
        assert first.startswith("batch_size 3 cannot be split evenly over 2 processes")
        assert second.startswith("batch_size 1 is smaller than the 2 processes")
        assert adalora.startswith("lora: AdaLoRA trains in one process") and rank["refused_untouched"]
