"""`load_data`: a JSONL file (and its validation part) -> tokenized, length-limited, packed `Splits`."""

from __future__ import annotations

from dataclasses import dataclass

from lorafit.errors import LorafitError
from lorafit.prompt import PromptFormat, default_format
from lorafit.train.data.batches import fit_length, pack
from lorafit.train.data.config import DataConfig
from lorafit.train.data.preference import PairSample, UnpairedSample, preference_samples, record_format
from lorafit.train.data.prompts import PromptSample, prompt_format, prompt_samples
from lorafit.train.data.records import PREFERENCE_SHAPES, Record, read_records, split_records
from lorafit.train.data.tokenize import Sample, tokenize_record


@dataclass
class Splits:
    train: list[Sample] | list[PairSample] | list[UnpairedSample] | list[PromptSample]
    val: list[Sample] | list[PairSample] | list[UnpairedSample] | list[PromptSample]
    prompt_format: PromptFormat | None = None
    """How the prompts were rendered (lorafit.prompt); the Trainer records it next to the adapter."""


def load_data(tokenizer, cfg: DataConfig, unpair: bool = False) -> Splits:
    """Read, split, tokenize, length-limit and (optionally) pack the training and validation data.

    Preference data (paired or unpaired records) becomes `PairSample`s / `UnpairedSample`s
    (lorafit.train.data.preference); `unpair` turns pairs into two unpaired samples each (KTO)."""
    records = read_records(cfg.path, cfg.format)
    val_records: list[Record] = []
    if cfg.val_path:
        val_records = read_records(cfg.val_path, cfg.format)
    elif cfg.val_fraction > 0:
        records, val_records = split_records(records, cfg.val_fraction, cfg.seed)
    preference = records[0].shape in PREFERENCE_SHAPES
    kinds = {"prompt" if r[0].shape == "prompt" else r[0].shape in PREFERENCE_SHAPES for r in (records, val_records) if r}
    if len(kinds) > 1:  # (supervised, preference and prompt-only data train different methods)
        raise LorafitError(f"{val_records[0].source}: the validation data is {val_records[0].shape!r} records but "
                           f"the training data is {records[0].shape!r}: use the same kind of data for both")
    if records[0].shape == "prompt":  # prompt-only (GRPO): nothing to truncate or pack
        fmt = prompt_format(tokenizer, records[0])
        return Splits(prompt_samples(tokenizer, records, fmt), prompt_samples(tokenizer, val_records, fmt), fmt)
    if preference:
        if cfg.packing:
            raise LorafitError(f"{cfg.path}: packing applies to supervised data; preference pairs are not packed "
                               "(set data.packing: false)")
        fmt = record_format(tokenizer, records[0])

        def pairs(recs: list[Record], path: str) -> list:
            return preference_samples(tokenizer, recs, cfg.max_seq_length, cfg.truncation_mode, path, unpair, fmt,
                                      cfg.train_on_prompt)

        return Splits(pairs(records, cfg.path), pairs(val_records, cfg.val_path or cfg.path) if val_records else [], fmt)

    fmt = default_format(tokenizer, records[0].shape)  # one format for the training and validation data

    def prepare(recs: list[Record], path: str, what: str) -> list[Sample]:
        samples = [tokenize_record(tokenizer, r, cfg.train_on_prompt, fmt) for r in recs]
        samples = fit_length(samples, cfg.max_seq_length, cfg.on_long, path, what)
        return pack(samples, cfg.max_seq_length) if cfg.packing else samples

    return Splits(prepare(records, cfg.path, "training"), prepare(val_records, cfg.val_path or cfg.path, "validation"),
                  fmt)
