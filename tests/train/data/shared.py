"""Records and samples shared by the data tests (plain values and helpers, no fixtures)."""

import json

from lorafit.train.data import IGNORE, Record, Sample, tokenize_record

ALPACA = {"instruction": "Convert the date to ISO format.", "input": "March 3rd 1998", "output": "1998-03-03"}
CHAT = {
    "messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
}
TEXT = {"text": "The quick brown fox jumps over the lazy dog."}
BY_SHAPE = {"alpaca": ALPACA, "chat": CHAT, "text": TEXT}


def write_lines(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def trained_runs(tok, sample):
    """Decoded text of each maximal run of trained labels."""
    runs, cur = [], []
    for tid, label in zip(sample.input_ids, sample.labels):
        if label != IGNORE:
            assert label == tid  # labels are the inputs themselves where trained (the model shifts)
            cur.append(tid)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def last_trained(sample):
    return [label for label in sample.labels if label != IGNORE][-1]


def sample_of(tok, shape, fields=None, **kw):
    return tokenize_record(tok, Record(shape, fields or BY_SHAPE[shape], "mem:1"), **kw)


def make_samples(lengths, trained_from=0):
    """Synthetic samples with distinct ids; tokens from `trained_from` on are trained."""
    out, next_id = [], 10
    for i, n in enumerate(lengths):
        ids = list(range(next_id, next_id + n))
        next_id += n
        labels = [IGNORE] * min(trained_from, n) + ids[trained_from:]
        out.append(Sample(ids, labels, f"mem:{i + 1}"))
    return out
