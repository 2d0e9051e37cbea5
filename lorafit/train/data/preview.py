"""A pre-flight look at the data: a sample rendered with its trained text marked, token counts."""

from __future__ import annotations

from lorafit.train.data.preference import PairSample, UnpairedSample, describe_pair
from lorafit.train.data.prompts import PromptSample
from lorafit.train.data.tokenize import IGNORE, Sample

TRAINED_OPEN, TRAINED_CLOSE = "«", "»"


def describe_sample(tokenizer, sample: Sample | PairSample | UnpairedSample) -> str:
    """Render a sample for a pre-flight look: text the model learns to produce is «in guillemets»,
    masked (prompt) text is plain. Packed rows show a divider between samples; a preference sample
    shows its prompt once and each completion marked."""
    if isinstance(sample, (PairSample, UnpairedSample)):
        return describe_pair(tokenizer, sample)
    if isinstance(sample, PromptSample):
        columns = ", ".join(f"{k}={v!r}" for k, v in sample.columns.items())
        return (f"{sample.source}: a {len(sample)}-token prompt; its completions are sampled during training"
                + (f" (columns for the rewards: {columns})" if columns else "") + "\n"
                + tokenizer.decode(sample.prompt_ids))
    n = len(sample)
    header = (
        f"{sample.source}: {n} tokens, {sample.n_trained} trained "
        f"({100 * sample.n_trained / max(n, 1):.0f}%); «trained», rest masked"
    )
    starts = {0}
    if sample.position_ids is not None:
        starts |= {t for t, p in enumerate(sample.position_ids) if p == 0}
    parts, t = [], 0
    while t < n:  # one run = consecutive tokens with the same trained/masked state in one sample
        trained = sample.labels[t] != IGNORE
        u = t + 1
        while u < n and (sample.labels[u] != IGNORE) == trained and u not in starts:
            u += 1
        if t in starts and t > 0:
            parts.append("\n----- next packed sample -----\n")
        text = tokenizer.decode(sample.input_ids[t:u], skip_special_tokens=False)
        parts.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained else text)
        t = u
    return header + "\n" + "".join(parts)


def n_tokens(samples: list[Sample] | list[PairSample] | list[UnpairedSample]) -> tuple[int, int]:
    """(total tokens, trained tokens) over samples, e.g. for a pre-flight summary."""
    return sum(len(s) for s in samples), sum(s.n_trained for s in samples)
