"""Samples -> rows the model trains on: length limits, packing, padding into (B, T) tensors.

    fit_length   truncate (keep the start) or skip samples over max_seq_length, warn once with counts
    pack         concatenate short samples into rows, no loss across a sample boundary
    collate      right-pad a batch into host tensors: input_ids, labels, position_ids, and the padding
                 mask of unpacked rows (packed rows are isolated per sample: lorafit.train.packing)
"""

from __future__ import annotations

import warnings

import torch

from lorafit.errors import LorafitError
from lorafit.train.data.tokenize import IGNORE, Sample, eos_id

ON_LONG = ("truncate", "skip")


def fit_length(samples: list[Sample], max_len: int, on_long: str, path: str = "data",
               what: str = "training") -> list[Sample]:
    """Truncate (keep the start) or skip samples over `max_len`; warn once with the counts. When no
    sample is left, a LorafitError says how many were dropped, why, and the limit that keeps them."""
    kept, n_long, n_empty = [], 0, 0
    for s in samples:
        if len(s) > max_len:
            n_long += 1
            if on_long == "skip":
                continue
            s = Sample(s.input_ids[:max_len], s.labels[:max_len], s.source)
            if s.n_trained == 0:  # the prompt alone filled the window: nothing left to learn
                n_empty += 1
                continue
        kept.append(s)
    if samples and not kept:
        why = ("were skipped (on_long: skip)" if on_long == "skip" else
               "kept no trained tokens once truncated (their prompts alone fill the limit)")
        raise LorafitError(f"{path}: no {what} samples left: all {len(samples)} are longer than "
                           f"data.max_seq_length={max_len} tokens and {why}; the shortest has "
                           f"{min(len(s) for s in samples)} tokens: raise data.max_seq_length to at least that")
    if n_long:
        what = "skipped" if on_long == "skip" else "truncated to their first tokens"
        extra = f"; {n_empty} of those had no trained tokens left and were dropped" if n_empty else ""
        warnings.warn(
            f"{path}: {n_long} of {len(samples)} samples are longer than max_seq_length={max_len} "
            f"and were {what}{extra}",
            stacklevel=2,
        )
    return kept


def pack(samples: list[Sample], max_len: int) -> list[Sample]:
    """Greedily concatenate samples (in order) into rows of at most `max_len` tokens.

    No loss crosses a sample boundary: the label of each sample's first token (which the shifted
    loss would predict from the previous sample's last token) is set to IGNORE; unpacked, that
    label is never used either, so packed and unpacked losses see the same targets.
    `position_ids` restart at 0 per sample: that is how attention is cut at the boundaries too
    (`collate` gives packed rows no 2-D mask; `lorafit.train.packing.model_inputs` says what each
    attention implementation gets), so a packed sample's logits are its logits unpacked.
    """
    rows: list[Sample] = []
    row: Sample | None = None
    for s in samples:
        assert len(s) <= max_len, "fit_length() must run before pack()"
        if row is None or len(row) + len(s) > max_len:
            row = Sample([], [], s.source, [])
            rows.append(row)
        row.input_ids += s.input_ids
        row.labels += [IGNORE] + s.labels[1:]
        row.position_ids += list(range(len(s)))
    return rows


def pad_id_for(tokenizer) -> int:
    """The tokenizer's pad id, else EOS (padding is masked out of attention and loss anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id(tokenizer)


def collate(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest sample. Returns (B, T) long tensors: input_ids, labels
    (IGNORE on padding), position_ids and, unless the batch holds packed rows, attention_mask
    (1 = real token).

    Packed rows (samples with `position_ids`) get no attention_mask: the positions alone mark the
    samples (`lorafit.train.packing`), and the padding after a row's last sample restarts at 0, a run
    of its own that no real token attends to (it comes after them, and attention is causal).

    The tensors are host tensors, on the CPU whatever the default device is: the trainer counts
    target tokens on them, then moves them to the model's device (`lorafit.device.to_device`).
    Use with a DataLoader as `functools.partial(collate, pad_id=pad_id_for(tokenizer))`.
    """
    B, T = len(samples), max(len(s) for s in samples)
    host = torch.device("cpu")
    input_ids = torch.full((B, T), pad_id, dtype=torch.long, device=host)
    labels = torch.full((B, T), IGNORE, dtype=torch.long, device=host)
    attention_mask = torch.zeros((B, T), dtype=torch.long, device=host)
    position_ids = torch.arange(T, dtype=torch.long, device=host).repeat(B, 1)
    packed = any(s.position_ids is not None for s in samples)
    for b, s in enumerate(samples):
        n = len(s)
        input_ids[b, :n] = torch.tensor(s.input_ids, device=host)
        labels[b, :n] = torch.tensor(s.labels, device=host)
        attention_mask[b, :n] = 1
        if s.position_ids is not None:
            position_ids[b, :n] = torch.tensor(s.position_ids, device=host)
        if packed:
            position_ids[b, n:] = torch.arange(T - n, dtype=torch.long, device=host)  # the pad run: its own
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if not packed:
        batch["attention_mask"] = attention_mask
    return batch

