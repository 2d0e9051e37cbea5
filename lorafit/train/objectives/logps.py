"""Per-token log-probabilities of a batch under the model, and the reference policy's.

    token_logps(model, batch, scored)   log p(token j | tokens < j) at every scored position j (B, T),
                                        chunked through the output head (lorafit.ops.chunked_logps), so
                                        the (B, T, V) logits never exist; optionally TRL's statistics
    reference(model, adapter)           the reference policy inside the block: the base with adapters
                                        disabled (adapter None), or the frozen adapter slot `adapter`,
                                        in eval mode (no dropout), the trained adapter untouched

A position is scored when the batch's `scored` mask is 1 there (completion tokens); position 0 has no
prediction and is never scored. Values are aligned with the tokens (not shifted): row sums over a
completion mask are sequence log-probabilities.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.lora.inject import adapter_layers, disable_adapters, saved_modules
from lorafit.ops.chunked_logps import chunked_logps
from lorafit.train.loss import decoder


class TokenLogps(NamedTuple):
    """Per-token values at the scored positions, 0 elsewhere; statistics None unless asked for."""

    logp: torch.Tensor  # (B, T) fp32, differentiable
    mean_logit: torch.Tensor | None = None  # (B, T) mean over the vocabulary of the logits
    entropy: torch.Tensor | None = None  # (B, T)
    top1: torch.Tensor | None = None  # (B, T) bool: the token was the argmax


def output_head(model: nn.Module) -> tuple[nn.Linear, float, float | None] | None:
    """(head, logit scale, soft-cap) when the head is a plain Linear the chunked path can apply itself,
    else None (an adapted head, an unknown logit transform: the model's own logits are used)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    if not isinstance(head, nn.Linear) or decoder(model) is None or \
            getattr(config, "logits_scaling", 1.0) != 1.0:  # Granite divides its logits: its own logits path
        return None
    return head, float(getattr(config, "logit_scale", None) or 1.0), getattr(config, "final_logit_softcapping", None)


def token_logps(model: nn.Module, batch: dict[str, torch.Tensor], scored: torch.Tensor,
                stats: bool = False, temperature: float = 1.0) -> TokenLogps:
    """log p of each scored token of `batch` (input_ids, attention_mask, position_ids on the model's
    device) given the tokens before it; `scored` (B, T) marks the tokens (1 = scored, position 0 never).
    `temperature`: the logits are divided by it first (GRPO scores tokens under the distribution they
    were sampled from, as TRL does)."""
    ids = batch["input_ids"]  # (B, T)
    mask = scored[:, 1:].bool()  # (B, T-1): position t predicts token t + 1
    targets = ids[:, 1:][mask]  # (N,)
    head = output_head(model)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    if head is not None:
        linear, scale, softcap = head
        hidden = decoder(model)(**inputs).last_hidden_state  # (B, T, H)
        values = chunked_logps(hidden[:, :-1][mask], linear.weight, targets, bias=linear.bias, scale=scale,
                               softcap=softcap, stats=stats, temperature=temperature)  # each (N,)
    else:
        logits = model(**inputs).logits[:, :-1][mask].float() / temperature  # (N, V): only the scored rows
        logp_all = F.log_softmax(logits, dim=-1)
        logp = logp_all.gather(-1, targets[:, None]).squeeze(1)
        values = (logp, None, None, None)
        if stats:
            with torch.no_grad():
                values = (logp, logits.mean(-1), -(logp_all.exp() * logp_all).sum(-1), logits.argmax(-1) == targets)

    def place(x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        full = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_scatter(mask, x)  # (B, T-1)
        return F.pad(full, (1, 0))  # (B, T): aligned with the tokens

    return TokenLogps(*(place(v) for v in values))


@contextmanager
def reference(model: nn.Module, adapter: str | None) -> Iterator[nn.Module]:
    """The reference policy inside the block: `adapter` None -> the base with every adapter disabled;
    a name -> that adapter slot alone active (a frozen copy of the start adapter, or `ref_adapter`).
    Eval mode inside (no dropout: the reference is deterministic); requires_grad flags, the trained
    adapter's weights and the model's mode are as before afterwards."""
    was_training = model.training
    model.eval()
    try:
        if adapter is None:
            with disable_adapters(model):
                yield model
            return
        layers = [layer for _, layer in adapter_layers(model)]
        saved = [m for _, m in saved_modules(model)]
        before = [list(layer.active) for layer in layers], [m.active for m in saved]
        for layer in layers:
            layer.active = [adapter] if adapter in layer.adapter_names() else []
        for m in saved:
            m.active = adapter if adapter in m.copies else None
        try:
            yield model
        finally:
            for layer, active in zip(layers, before[0]):
                layer.active = active
            for m, active in zip(saved, before[1]):
                m.active = active
    finally:
        model.train(was_training)
