"""Training data: JSONL records -> token ids + loss labels -> padded batches.

Record shapes, one per file (detected from the first record, or forced with `format=`):

    alpaca    {"instruction": str, "input": str (optional), "output": str}
    chat      {"messages": [{"role": str, "content": str}, ...]}
    text      {"text": str}
    paired    {"prompt", "chosen", "rejected"} (or an implicit prompt), strings or chat messages
    unpaired  {"prompt", "completion", "label": bool}
    prompt    {"prompt", ...}: prompt-only (GRPO), the other fields are the reward functions' columns

Each record becomes a `Sample` of `input_ids` and `labels` (same length; -100 = no loss there).
By default the loss is only on what the model should *produce*: the Alpaca output, the chat
assistant turns (content plus their end-of-turn token), or all of a plain text. Every sample's
last trained label is the EOS / end-of-turn token, so the model learns where to stop.

One module per step, in the order `load_data` runs them:

    config     DataConfig: the settings, one docstring per field
    records    read and validate JSONL (one-line errors naming file:line and field), hold-out split
    tokenize   chat templates / the Alpaca prompt -> ids, response-only labels found on token ids
    preference preference pairs and KTO examples -> ids as TRL 1.16 tokenizes them
    prompts    prompt-only records (GRPO) -> prompt ids, the other fields kept for the reward functions
    batches    length limits, packing, pad id, collate into (B, T) host tensors
    preview    describe_sample / n_tokens: what the model will see, before training
    load       load_data: all of the above, for the training and validation files

Everything public is importable from here (`from lorafit.train.data import DataConfig, load_data`).
"""

from lorafit.train.data.batches import ON_LONG, collate, fit_length, pack, pad_id_for
from lorafit.train.data.config import DataConfig
from lorafit.train.data.load import Splits, load_data
from lorafit.train.data.preference import (
    TRUNCATION_MODES,
    PairSample,
    UnpairedSample,
    preference_samples,
    tokenize_pair,
    tokenize_unpaired,
    truncate,
)
from lorafit.train.data.preview import TRAINED_CLOSE, TRAINED_OPEN, describe_sample, n_tokens
from lorafit.train.data.prompts import PromptSample, prompt_samples
from lorafit.train.data.records import (
    FORMATS,
    PREFERENCE_SHAPES,
    ROLES,
    SHAPES,
    Record,
    read_records,
    split_records,
)
from lorafit.train.data.tokenize import (
    ALPACA_PROMPT,
    IGNORE,
    Sample,
    alpaca_user_text,
    eos_id,
    tokenize_record,
)

__all__ = [
    "ALPACA_PROMPT",
    "FORMATS",
    "IGNORE",
    "ON_LONG",
    "PREFERENCE_SHAPES",
    "ROLES",
    "SHAPES",
    "TRUNCATION_MODES",
    "TRAINED_CLOSE",
    "TRAINED_OPEN",
    "DataConfig",
    "PairSample",
    "PromptSample",
    "Record",
    "Sample",
    "Splits",
    "UnpairedSample",
    "alpaca_user_text",
    "collate",
    "describe_sample",
    "eos_id",
    "fit_length",
    "load_data",
    "n_tokens",
    "pack",
    "pad_id_for",
    "preference_samples",
    "prompt_samples",
    "read_records",
    "split_records",
    "tokenize_pair",
    "tokenize_record",
    "tokenize_unpaired",
    "truncate",
]
