"""A run's metrics as they are written: strict-JSON records for metrics.jsonl (the curves: lorafit.train.curves)."""

from __future__ import annotations

import math


def json_record(record: dict) -> dict:
    """A metrics record as strict JSON takes it: a non-finite number becomes null, and the record
    says `"nonfinite": true`."""
    out = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    if any(v is None and record[k] is not None for k, v in out.items()):
        out["nonfinite"] = True
    return out

