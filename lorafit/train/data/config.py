"""`DataConfig`: where the data is and how it becomes training rows, each field with its docstring
(the CLI's help). The steps themselves live in `records` (read, validate, split), `tokenize` (ids and
labels) and `batches` (length, packing, collate); `lorafit.train.data.load_data` runs them in order.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorafit.errors import LorafitError
from lorafit.train.data.batches import ON_LONG
from lorafit.train.data.preference import TRUNCATION_MODES
from lorafit.train.data.records import FORMATS


@dataclass
class DataConfig:
    """Where the data is and how it becomes training rows."""

    path: str
    """JSONL training file, one record per line."""
    format: str = "auto"
    """'auto' detects the shape per file from its first record; or force 'alpaca', 'chat', 'text'."""
    max_seq_length: int = 1024
    """Longest sample in tokens (and the row length when packing); for preference data, TRL's
    `max_length` of prompt + completion."""
    on_long: str = "truncate"
    """Longer samples: 'truncate' keeps the start, 'skip' drops them. Both warn once with a count."""
    train_on_prompt: bool = False
    """Also train on prompt tokens (by default only the response is trained)."""
    truncation_mode: str = "keep_start"
    """Preference data longer than max_seq_length: "keep_start" keeps the first tokens (samples whose
    prompt alone fills max_seq_length are dropped, with a warning counting them), "keep_end" the last."""
    packing: bool = False
    """Concatenate short samples into rows of up to max_seq_length tokens (fewer pad tokens)."""
    val_path: str | None = None
    """Separate validation file; takes precedence over val_fraction."""
    val_fraction: float = 0.0
    """Share of the training records held out for validation when there is no val_path."""
    seed: int = 0
    """Seed of the validation split, so the same records are held out every run."""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise LorafitError(f"DataConfig.format {self.format!r} is unknown: use one of {', '.join(FORMATS)}")
        if self.truncation_mode not in TRUNCATION_MODES:
            raise LorafitError(f"truncation_mode={self.truncation_mode!r} is unknown: use 'keep_start' or 'keep_end'")
        if self.on_long not in ON_LONG:
            raise LorafitError(f"DataConfig.on_long {self.on_long!r} is unknown: use 'truncate' or 'skip'")
        if isinstance(self.max_seq_length, bool) or not isinstance(self.max_seq_length, int) or self.max_seq_length < 2:
            raise LorafitError(f"DataConfig.max_seq_length must be at least 2 tokens, got {self.max_seq_length!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise LorafitError(f"DataConfig.val_fraction must be in [0, 1) (e.g. 0.05), got {self.val_fraction!r}")
