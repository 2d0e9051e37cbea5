"""Loss, perplexity and greedy answers of several models at once: the base and any number of adapters
on one loaded model, their rows mixed in every batch (`lorafit.adapter_per_row`: one base matmul per
layer for the whole batch, each row's low-rank product on its own adapter).

Each model sees the held-out records as its training rendered them: an adapter in the prompt format
it recorded (`lorafit_prompt.json`), the base in the tokenizer's default. The loss of a model is the
mean next-token loss over the records' trained tokens (the answers: what `lorafit train` takes its
validation loss on), and its perplexity exp(loss).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lorafit.device import model_device, to_device
from lorafit.generate import generate_ids
from lorafit.lora.inject import adapter_per_row, lora_layers
from lorafit.prompt import PromptFormat, conversation_ids, default_format, prompt_ids, user_message
from lorafit.train.data import IGNORE, Record, Sample, collate, pad_id_for, tokenize_record


@dataclass
class Held:
    """The held-out set as one model sees it."""

    samples: list[Sample]
    prompts: list[list[int] | None]  # what generation starts from (None: a text record, loss only)


@dataclass
class Scores:
    """One model's numbers: loss sums and the answers it wrote."""

    loss_sum: float = 0.0
    n_tokens: int = 0
    answers: list[str | None] = field(default_factory=list)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.n_tokens, 1)


def reference(record: Record) -> str | None:
    """What the model should answer: the Alpaca output, the last assistant turn; None for plain text."""
    if record.shape == "alpaca":
        return record.fields["output"]
    if record.shape == "chat":
        return next(m["content"] for m in reversed(record.fields["messages"]) if m["role"] == "assistant")
    return None


def held_out(tokenizer, records: list[Record], fmt: PromptFormat | None) -> Held:
    """Samples (ids + trained labels) and generation prompts of `records` in the prompt format `fmt`
    (None: the tokenizer's default for the records' shape)."""
    fmt = fmt or default_format(tokenizer, records[0].shape)
    samples, prompts = [], []
    for r in records:
        samples.append(tokenize_record(tokenizer, r, fmt=fmt))
        f = r.fields
        if r.shape == "alpaca":
            prompts.append(prompt_ids(tokenizer, fmt, f["instruction"], f.get("input") or ""))
        elif r.shape == "chat":
            last = max(i for i, m in enumerate(f["messages"]) if m["role"] == "assistant")
            turns = [{"role": m["role"], "content": m["content"]} for m in f["messages"][:last]] or \
                [user_message("", "")]
            prompts.append(conversation_ids(tokenizer, fmt, turns, True, f"{r.source}: field 'messages'"))
        else:
            prompts.append(None)
    return Held(samples, prompts)


def row_routing(model: nn.Module, names: list[str | None]):
    """Per-row adapters for one batch (nothing to route on a model without adapters)."""
    if not any(True for _ in lora_layers(model)):
        return contextlib.nullcontext()
    return adapter_per_row(model, names)


def batches_by_length(rows: list[tuple], size: int, length) -> list[list[int]]:
    """Indices of `rows` ((adapter, ...) tuples) in batches of `size`, longest first (`length(row)`), each
    batch grouped by adapter (the layout the per-row kernel serves without a gather)."""
    order = sorted(range(len(rows)), key=lambda i: -length(rows[i]))
    chunks = [order[i:i + size] for i in range(0, len(order), size)]
    return [sorted(c, key=lambda i: (rows[i][0] is not None, rows[i][0] or "")) for c in chunks]


@torch.no_grad()
def mixed_losses(model: nn.Module, rows: list[tuple[str | None, Sample]], pad_id: int, batch_size: int,
                 desc: str = "loss") -> list[tuple[float, int]]:
    """(sum of next-token losses over the trained tokens, their number) of each (adapter, sample) row;
    rows of different adapters share batches. fp32 cross-entropy."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    out: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    try:
        for batch_rows in tqdm(batches_by_length(rows, batch_size, lambda row: len(row[1])), desc=desc, unit="batch", leave=False):
            batch = collate([rows[i][1] for i in batch_rows], pad_id)
            targets = batch["labels"][:, 1:]  # (B, T-1)
            counts = (targets != IGNORE).sum(-1).tolist()
            batch = to_device(batch, device)
            with row_routing(model, [rows[i][0] for i in batch_rows]):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               position_ids=batch["position_ids"]).logits[:, :-1]  # (B, T-1, V)
            labels = batch["labels"][:, 1:]
            for b, (i, n) in enumerate(zip(batch_rows, counts)):  # row by row: no (B, V, T) copy of the logits
                loss = F.cross_entropy(logits[b].float(), labels[b], ignore_index=IGNORE, reduction="sum")
                out[i] = (float(loss), n)
    finally:
        model.train(was_training)
    return out


def mixed_answers(model: nn.Module, tokenizer, rows: list[tuple[str | None, list[int]]], max_new_tokens: int,
                  batch_size: int) -> list[str]:
    """Greedy answers (decoded, stripped) of each (adapter, prompt ids) row; rows of different adapters
    share batches."""
    out: list[str] = [""] * len(rows)
    for batch_rows in tqdm(batches_by_length(rows, batch_size, lambda row: len(row[1])), desc="answers", unit="batch", leave=False):
        with row_routing(model, [rows[i][0] for i in batch_rows]):
            new = generate_ids(model, tokenizer, [rows[i][1] for i in batch_rows], max_new_tokens=max_new_tokens,
                               batch_size=len(batch_rows))
        for i, ids in zip(batch_rows, new):
            out[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    return out


def score_models(model: nn.Module, tokenizer, records: list[Record], formats: dict[str | None, PromptFormat | None],
                 *, generate: bool, max_new_tokens: int, batch_size: int) -> dict[str | None, Scores]:
    """Scores of each model in `formats` (adapter name, or None for the base -> its prompt format) on
    `records`: loss over every record, answers (when `generate`) for those with a reference."""
    held = {name: held_out(tokenizer, records, fmt) for name, fmt in formats.items()}
    rows = [(name, s) for name, h in held.items() for s in h.samples]
    losses = mixed_losses(model, rows, pad_id_for(tokenizer), batch_size)
    scores = {name: Scores() for name in formats}
    for (name, _), (loss, n) in zip(rows, losses):
        scores[name].loss_sum += loss
        scores[name].n_tokens += n
    if generate:
        asks = [(name, i) for name, h in held.items() for i, p in enumerate(h.prompts) if p is not None]
        answers = mixed_answers(model, tokenizer, [(name, held[name].prompts[i]) for name, i in asks],
                                max_new_tokens, batch_size)
        for name in scores:
            scores[name].answers = [None] * len(records)
        for (name, i), answer in zip(asks, answers):
            scores[name].answers[i] = answer
    return scores
