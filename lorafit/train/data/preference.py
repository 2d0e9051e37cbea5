"""Preference records -> samples, tokenized as TRL 1.16's DPOTrainer and KTOTrainer tokenize them, with
every rendering done by lorafit's one prompt renderer (`lorafit.prompt`).

    paired     {"prompt", "chosen", "rejected"}       -> PairSample(prompt_ids, chosen_ids, rejected_ids)
    unpaired   {"prompt", "completion", "label"}      -> UnpairedSample(prompt_ids, completion_ids, label)

The steps, in TRL's order (`_prepare_dataset`):

1. Implicit prompt: a pair without "prompt" has as prompt the common start of chosen and rejected (chat
   messages: the longest common run of turns; text: of characters, a space before the divergence
   left to the completions), TRL's `extract_prompt`.
2. Plain text: EOS appended to a completion that does not already end with it.
3. The prompt alone (chat: with the generation prompt) and prompt + completion are rendered and
   tokenized: chat messages by the chat template (or lorafit's instruction format for a tokenizer
   without one), text as raw text; BOS exactly once, as the tokenizer's convention has it.
4. The completion starts where the prompt's ids and the prompt + completion ids diverge (for a pair,
   the shorter of the two common prefixes): a prompt whose last token merges with the completion's
   first is cut there, and a warning says so once.
5. `max_length` (DataConfig.max_seq_length) with `truncation_mode`: keep_start keeps the first
   max_length tokens of prompt + completion, keep_end the last. With keep_start, a prompt that alone
   fills max_length leaves no completion token to learn from: those samples are dropped, with one
   warning counting them (keep_end keeps the completion's end, so nothing is dropped).

And lorafit's own checks: a pair whose chosen equals its rejected teaches nothing and is dropped, with
one warning counting them and naming the first; with `unpair` (KTO on paired data) each pair becomes
two unpaired samples, chosen desirable and rejected undesirable, in TRL's order (`unpair_preference_dataset`:
the chosen of up to 1000 pairs, then their rejected), so that a KL completion, taken from the previous
example, belongs to another prompt.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from lorafit.errors import LorafitError
from lorafit.prompt import TEXT, PromptFormat, conversation_ids, default_format, text_ids
from lorafit.train.data.records import Record

Row = tuple[list[int], list[int]]  # (ids, completion mask: 1 where the token is part of the completion)
TRUNCATION_MODES = ("keep_start", "keep_end")
UNPAIR_CHUNK = 1000  # pairs unpaired at a time: the chosen of 1000 pairs, then their rejected (datasets' map batch)


def truncate(prompt: list[int], completion: list[int], max_length: int | None, keep_end: bool) -> Row:
    """prompt + completion and its completion mask, cut to max_length (the start or the end kept)."""
    ids, mask = prompt + completion, [0] * len(prompt) + [1] * len(completion)
    if max_length is None or len(ids) <= max_length:
        return ids, mask
    sl = slice(-max_length, None) if keep_end else slice(None, max_length)
    return ids[sl], mask[sl]


@dataclass
class PairSample:
    """One preference pair: the prompt's ids and the two completions' ids (TRL's dataset columns)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: str  # "path:line"
    max_length: int | None = None
    keep_end: bool = False
    ref_logps: tuple[float, float] | None = None  # (chosen, rejected) under the reference, when precomputed
    weight: float = 1.0  # 0: a stand-in that contributes nothing (a process with no sample of a batch)
    train_on_prompt: bool = False  # ORPO / SimPO: their NLL term also covers the prompt (TRL's ORPO does)

    def rows(self) -> tuple[Row, Row]:
        """The chosen and the rejected row the model sees, truncated."""
        return (truncate(self.prompt_ids, self.chosen_ids, self.max_length, self.keep_end),
                truncate(self.prompt_ids, self.rejected_ids, self.max_length, self.keep_end))

    def __len__(self) -> int:
        return sum(len(ids) for ids, _ in self.rows())

    @property
    def n_trained(self) -> int:
        return sum(sum(mask) for _, mask in self.rows())


@dataclass
class UnpairedSample:
    """One KTO example: prompt, completion, whether it is desirable, and (set by the KTO objective) the
    mismatched completion its KL term is estimated with."""

    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    source: str
    max_length: int | None = None
    keep_end: bool = False
    kl_completion_ids: list[int] | None = None
    ref_logps: tuple[float, float] | None = None  # (completion, KL completion) under the reference
    weight: float = 1.0

    def rows(self) -> tuple[Row, ...]:
        """The completion's row and, once set, the KL completion's row, truncated."""
        rows = [truncate(self.prompt_ids, self.completion_ids, self.max_length, self.keep_end)]
        if self.kl_completion_ids is not None:
            rows.append(truncate(self.prompt_ids, self.kl_completion_ids, self.max_length, self.keep_end))
        return tuple(rows)

    def __len__(self) -> int:
        return len(self.rows()[0][0])

    @property
    def n_trained(self) -> int:
        return sum(self.rows()[0][1])


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def extract_prompt(chosen: str | list, rejected: str | list) -> tuple[str | list, str | list, str | list]:
    """(prompt, chosen, rejected) of an implicit-prompt pair: the common start of both, exactly as TRL's
    `extract_prompt` cuts it (including its index when one completion is a prefix of the other)."""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":  # a space before the divergence goes to the completions
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def record_format(tokenizer, record: Record) -> PromptFormat:
    """Raw text for string records, else the tokenizer's chat format (its template, or the instruction format)."""
    chat = isinstance(record.fields.get("chosen", record.fields.get("completion")), list)
    return default_format(tokenizer) if chat else PromptFormat(TEXT)


def _messages(value: list) -> list[dict]:
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _render(tokenizer, fmt: PromptFormat, prompt, completions: list, where: str) -> tuple[list[int], list[list[int]]]:
    """Ids of the prompt alone and of prompt + each completion (steps 2-3 of the module docstring)."""
    if isinstance(prompt, list):
        prompt = _messages(prompt)
        alone = conversation_ids(tokenizer, fmt, prompt, True, where)
        return alone, [conversation_ids(tokenizer, fmt, prompt + _messages(c), False, where) for c in completions]
    eos = tokenizer.eos_token or ""
    completions = [c if c.endswith(eos) else c + eos for c in completions]
    return text_ids(tokenizer, prompt), [text_ids(tokenizer, prompt + c) for c in completions]


def tokenize_pair(tokenizer, record: Record, fmt: PromptFormat | None = None,
                  merged: list[tuple[str, list[int]]] | None = None) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, chosen_ids, rejected_ids) of a paired record (steps 1-4); a prompt cut where it merges
    with its completions is added to `merged` as (source, the ids left out)."""
    f = record.fields
    chosen, rejected = f["chosen"], f["rejected"]
    prompt = f.get("prompt")
    if prompt is None:
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
    fmt = fmt or record_format(tokenizer, record)
    prompt_ids, (pc, pr) = _render(tokenizer, fmt, prompt, [chosen, rejected], f"{record.source}: field 'chosen'")
    n = min(common_prefix_length(prompt_ids, pc), common_prefix_length(prompt_ids, pr))
    if n < len(prompt_ids) and merged is not None:
        merged.append((record.source, prompt_ids[n:]))
    return prompt_ids[:n], pc[n:], pr[n:]


def tokenize_unpaired(tokenizer, record: Record, fmt: PromptFormat | None = None,
                      merged: list[tuple[str, list[int]]] | None = None) -> tuple[list[int], list[int]]:
    """(prompt_ids, completion_ids) of an unpaired record (steps 2-4); see `tokenize_pair` for `merged`."""
    fmt = fmt or record_format(tokenizer, record)
    f = record.fields
    prompt_ids, (pc,) = _render(tokenizer, fmt, f["prompt"], [f["completion"]], f"{record.source}: field 'completion'")
    n = common_prefix_length(prompt_ids, pc)
    if n < len(prompt_ids) and merged is not None:
        merged.append((record.source, prompt_ids[n:]))
    return prompt_ids[:n], pc[n:]


def _same(record: Record) -> bool:
    """Whether a paired record's two completions are equal (after extracting an implicit prompt)."""
    f = record.fields
    if f.get("prompt") is not None:
        return f["chosen"] == f["rejected"]
    _, chosen, rejected = extract_prompt(f["chosen"], f["rejected"])
    return chosen == rejected


def preference_samples(tokenizer, records: list[Record], max_length: int | None, truncation_mode: str,
                       path: str, unpair: bool = False, fmt: PromptFormat | None = None,
                       train_on_prompt: bool = False) -> list:
    """Tokenized, checked samples of preference records (see the module docstring); `unpair` turns
    pairs into KTO's unpaired samples; `train_on_prompt`: ORPO's and SimPO's NLL term covers the prompt too."""
    if truncation_mode not in TRUNCATION_MODES:
        raise LorafitError(f"truncation_mode {truncation_mode!r} is unknown: use keep_start or keep_end")
    keep_end = truncation_mode == "keep_end"
    given = len(records)
    same = [r for r in records if r.shape == "paired" and _same(r)]
    if same:
        records = [r for r in records if not (r.shape == "paired" and _same(r))]
        warnings.warn(f"{path}: {len(same)} of {len(records) + len(same)} pairs have chosen equal to rejected "
                      f"(first: {same[0].source}) and were dropped: a pair of equal completions teaches nothing",
                      stacklevel=2)
    samples: list = []
    merged: list[tuple[str, list[int]]] = []
    for start in range(0, len(records), UNPAIR_CHUNK):
        desirable, undesirable = [], []  # unpaired: each chunk's chosen, then its rejected (TRL's order)
        for r in records[start:start + UNPAIR_CHUNK]:
            if r.shape == "unpaired":
                prompt, completion = tokenize_unpaired(tokenizer, r, fmt, merged)
                samples.append(UnpairedSample(prompt, completion, r.fields["label"], r.source, max_length, keep_end))
                continue
            prompt, chosen, rejected = tokenize_pair(tokenizer, r, fmt, merged)
            if unpair:
                desirable.append(UnpairedSample(prompt, chosen, True, r.source, max_length, keep_end))
                undesirable.append(UnpairedSample(prompt, rejected, False, r.source, max_length, keep_end))
            else:
                samples.append(PairSample(prompt, chosen, rejected, r.source, max_length, keep_end,
                                          train_on_prompt=train_on_prompt))
        samples += desirable + undesirable
    if merged:
        warnings.warn(f"{path}: in {len(merged)} of {len(records)} records the tokenized prompt is not a token prefix "
                      "of prompt + completion (the template renders it differently, or tokens merge across the "
                      f"boundary); their completions start where the two diverge (first: {merged[0][0]}, leaving "
                      f"{tokenizer.decode(merged[0][1])!r} out of its prompt)", stacklevel=2)
    if max_length is not None and not keep_end:
        long = [s for s in samples if len(s.prompt_ids) >= max_length]
        if long:
            warnings.warn(f"{path}: {len(long)} of {len(samples)} samples have a prompt of max_seq_length="
                          f"{max_length} tokens or more (first: {long[0].source}) and were dropped: truncation "
                          "(keep_start) would leave nothing of their completions", stacklevel=2)
            samples = [s for s in samples if len(s.prompt_ids) < max_length]
    if given and not samples:
        raise LorafitError(f"{path}: no preference sample is left to train on (see the warnings above)")
    return samples


def describe_pair(tokenizer, sample: PairSample | UnpairedSample) -> str:
    """A preference sample for the pre-flight look: the prompt, then each completion «marked»."""
    prompt = tokenizer.decode(sample.prompt_ids, skip_special_tokens=False)
    if isinstance(sample, PairSample):
        completions = [("chosen", sample.chosen_ids), ("rejected", sample.rejected_ids)]
    else:
        completions = [("desirable" if sample.label else "undesirable", sample.completion_ids)]
    lines = [f"{sample.source}: {len(sample.prompt_ids)} prompt tokens; the completions are «marked»", prompt]
    for name, ids in completions:
        lines.append(f"----- {name} ({len(ids)} tokens): «{tokenizer.decode(ids, skip_special_tokens=False)}»")
    return "\n".join(lines)
