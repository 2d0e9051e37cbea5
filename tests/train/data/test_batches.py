"""Samples -> rows: length limits, packing, padding and collation."""

import warnings
from types import SimpleNamespace

import pytest
import torch

from lorafit.errors import LorafitError
from lorafit.train.data import IGNORE, collate, fit_length, pack, pad_id_for
from tests.train.data.shared import make_samples, sample_of


def test_truncate_keeps_the_start_and_warns_once_with_a_count():
    samples = make_samples([5, 12, 20, 8])
    with pytest.warns(UserWarning) as record:
        kept = fit_length(samples, 10, "truncate", "d.jsonl")
    assert len(record) == 1 and "2 of 4 samples" in str(record[0].message)
    assert [len(s) for s in kept] == [5, 10, 10, 8]
    assert kept[2].input_ids == samples[2].input_ids[:10] and kept[2].labels == samples[2].labels[:10]


def test_truncation_drops_samples_left_with_nothing_to_train():
    samples = make_samples([8, 30], trained_from=5)
    samples[1].labels[:11] = [IGNORE] * 11  # a prompt of 11 tokens: nothing trained in the first 10
    with pytest.warns(UserWarning, match="1 of 2 samples .*; 1 of those had no trained tokens"):
        kept = fit_length(samples, 10, "truncate")
    assert [s.source for s in kept] == ["mem:1"]
    kept = fit_length(make_samples([4, 6]), 10, "truncate")  # nothing long: no warning, all kept
    assert len(kept) == 2


def test_skip_drops_long_samples_with_a_count():
    samples = make_samples([5, 12, 20, 8])
    with pytest.warns(UserWarning, match="2 of 4 samples .* skipped"):
        kept = fit_length(samples, 10, "skip")
    assert [s.source for s in kept] == ["mem:1", "mem:4"]


def test_packing_has_no_cross_sample_targets_and_restarts_positions():
    samples = make_samples([3, 4, 5, 2, 6, 1])
    rows = pack(samples, 8)
    assert all(len(r) <= 8 for r in rows)
    assert [t for r in rows for t in r.input_ids] == [t for s in samples for t in s.input_ids]  # order kept
    flat_labels = [lab for r in rows for lab in r.labels]
    flat_pos = [p for r in rows for p in r.position_ids]
    at = 0
    for s in samples:
        assert flat_pos[at : at + len(s)] == list(range(len(s)))
        # first token: its label would be predicted from the previous sample, so it is masked;
        # the rest are exactly the sample's own labels.
        assert flat_labels[at] == IGNORE and flat_labels[at + 1 : at + len(s)] == s.labels[1:]
        at += len(s)
    # Same trained targets as unpacked training (where label 0 is dropped by the shift anyway).
    assert sum(r.n_trained for r in rows) == sum(s.n_trained - (s.labels[0] != IGNORE) for s in samples)


def test_collate_right_pads_and_masks(tokenizer):
    samples = [sample_of(tokenizer, "text"), sample_of(tokenizer, "alpaca")]
    pad = pad_id_for(tokenizer)
    batch = collate(samples, pad)
    rows, width = batch["input_ids"].shape
    assert rows == 2 and width == max(len(s) for s in samples)
    for b, s in enumerate(samples):
        n = len(s)
        assert (
            batch["input_ids"][b, :n].tolist() == s.input_ids and batch["labels"][b, :n].tolist() == s.labels
        )
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (width - n)
        assert set(batch["input_ids"][b, n:].tolist()) <= {pad} and set(batch["labels"][b, n:].tolist()) <= {
            IGNORE
        }
        assert batch["position_ids"][b, :n].tolist() == list(range(n))
    packed = collate(pack(make_samples([3, 2]), 8), pad)
    assert packed["position_ids"][0].tolist() == [0, 1, 2, 0, 1]
    # packed rows: no 2-D mask (it would switch transformers' per-sample attention off); padding after a
    # row's last sample restarts at 0, a run of its own
    packed = collate(pack(make_samples([3, 2, 4]), 5), pad)
    assert "attention_mask" not in packed and "attention_mask" in batch
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert pad_id_for(SimpleNamespace(pad_token_id=None, eos_token_id=7)) == 7  # no pad token: pad with EOS


def test_collate_builds_host_tensors_whatever_the_default_device():
    """The trainer counts targets on the host batch, then moves it: collate never follows a default device."""
    with torch.device("meta"):
        batch = collate(make_samples([3, 5]), pad_id=0)
    assert {t.device.type for t in batch.values()} == {"cpu"}
    assert batch["labels"][0].tolist() == [10, 11, 12, IGNORE, IGNORE]


@pytest.mark.parametrize("on_long", ["truncate", "skip"])
def test_no_sample_left_after_the_length_limit_is_one_line_saying_why_and_what_to_raise(on_long):
    samples = make_samples([14, 12, 20], trained_from=11)  # prompts of 11 tokens fill a window of 10
    with pytest.raises(LorafitError) as err, warnings.catch_warnings():
        warnings.simplefilter("error")  # the error says it all: no warning before it
        fit_length(samples, 10, on_long, "d.jsonl", "validation")
    message = str(err.value)
    assert message.startswith("d.jsonl: no validation samples left: all 3 are longer than data.max_seq_length=10")
    assert message.endswith("the shortest has 12 tokens: raise data.max_seq_length to at least that")
    assert ("skipped" if on_long == "skip" else "kept no trained tokens once truncated") in message
