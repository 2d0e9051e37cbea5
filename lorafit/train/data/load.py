"""`load_data`: a JSONL file (and its validation part) -> tokenized, length-limited, packed `Splits`."""

from __future__ import annotations

from dataclasses import dataclass

from lorafit.prompt import PromptFormat, default_format
from lorafit.train.data.batches import fit_length, pack
from lorafit.train.data.config import DataConfig
from lorafit.train.data.records import Record, read_records, split_records
from lorafit.train.data.tokenize import Sample, tokenize_record


@dataclass
class Splits:
    train: list[Sample]
    val: list[Sample]
    prompt_format: PromptFormat | None = None
    """How the prompts were rendered (lorafit.prompt); the Trainer records it next to the adapter."""


def load_data(tokenizer, cfg: DataConfig) -> Splits:
    """Read, split, tokenize, length-limit and (optionally) pack the training and validation data."""
    records = read_records(cfg.path, cfg.format)
    val_records: list[Record] = []
    if cfg.val_path:
        val_records = read_records(cfg.val_path, cfg.format)
    elif cfg.val_fraction > 0:
        records, val_records = split_records(records, cfg.val_fraction, cfg.seed)

    fmt = default_format(tokenizer, records[0].shape)  # one format for the training and validation data

    def prepare(recs: list[Record], path: str, what: str) -> list[Sample]:
        samples = [tokenize_record(tokenizer, r, cfg.train_on_prompt, fmt) for r in recs]
        samples = fit_length(samples, cfg.max_seq_length, cfg.on_long, path, what)
        return pack(samples, cfg.max_seq_length) if cfg.packing else samples

    return Splits(prepare(records, cfg.path, "training"), prepare(val_records, cfg.val_path or cfg.path, "validation"),
                  fmt)
