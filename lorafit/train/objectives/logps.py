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

Shared prompts (GRPO's G completions of one prompt): a batch of rows [prompt left-padded to `prompt_width` |
completion] whose prompts repeat runs each distinct prompt through the decoder once, with a KV cache, and
the completions after it, each row reading its prompt's keys and values (an index into the cache, so the
gradients of the copies add up on the one prompt forward). The values equal the plain forward's (the same
attention over the same keys); the work on the prompt tokens drops by the number of copies. Where it does
not apply (an adapted or transformed head, a layer whose cache is not a plain append, activation
checkpointing, every prompt distinct, a scored prompt token) the plain forward runs.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

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
                stats: bool = False, temperature: float = 1.0, prompt_width: int | None = None) -> TokenLogps:
    """log p of each scored token of `batch` (input_ids, attention_mask, position_ids on the model's
    device) given the tokens before it; `scored` (B, T) marks the tokens (1 = scored, position 0 never).
    `temperature`: the logits are divided by it first (GRPO scores tokens under the distribution they
    were sampled from, as TRL does). `prompt_width`: the rows' first `prompt_width` tokens are a prompt,
    left-padded, none of it scored; repeated prompts then run once (the module docstring)."""
    ids = batch["input_ids"]  # (B, T)
    mask = scored[:, 1:].bool()  # (B, T-1): position t predicts token t + 1
    targets = ids[:, 1:][mask]  # (N,)
    head = output_head(model)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    if head is not None:
        linear, scale, softcap = head
        hidden = shared_prompt_hidden(model, inputs, scored, prompt_width) if prompt_width else None
        if hidden is None:
            hidden = decoder(model)(**inputs).last_hidden_state[:, :-1]  # (B, T-1, H)
        values = chunked_logps(hidden[mask], linear.weight, targets, bias=linear.bias, scale=scale,
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


def shared_prompt_hidden(model: nn.Module, inputs: dict[str, torch.Tensor], scored: torch.Tensor,
                         width: int) -> torch.Tensor | None:
    """The decoder's hidden states at positions 0..T-2 (B, T-1, H) with each distinct prompt (the first
    `width` tokens of a row, with its mask) run once; None where sharing does not apply (then the caller
    runs the plain forward). Only the positions from width - 1 on are computed: the prompt's own positions
    are zeros (nothing there is scored)."""
    ids, attention, positions = inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"]
    body = decoder(model)
    if width < 1 or width >= ids.shape[1] or bool(scored[:, :width].any()) or \
            getattr(model, "is_gradient_checkpointing", False):
        return None
    prompts, inverse = torch.unique(torch.cat([ids[:, :width], attention[:, :width]], dim=1), dim=0,
                                    return_inverse=True)  # (U, 2 width), (B,)
    if prompts.shape[0] == ids.shape[0]:
        return None  # every prompt distinct: nothing to share
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    cache = DynamicCache(config=config)
    if not all(type(layer) is DynamicLayer for layer in cache.layers):
        return None  # sliding-window or recurrent layers keep what a plain append would not
    first = torch.zeros(prompts.shape[0], dtype=torch.long, device=ids.device).scatter_(
        0, inverse, torch.arange(ids.shape[0], device=ids.device))  # a row of each distinct prompt
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)
        head = body(input_ids=ids[first, :width], attention_mask=attention[first, :width],
                    position_ids=positions[first, :width], past_key_values=cache, use_cache=True)
        for layer in cache.layers:  # each row reads its prompt's keys and values (U -> B rows)
            layer.keys, layer.values = layer.keys[inverse], layer.values[inverse]
        tail = body(input_ids=ids[:, width:], attention_mask=attention, position_ids=positions[:, width:],
                    past_key_values=cache, use_cache=True).last_hidden_state  # (B, T - width, H)
    last = head.last_hidden_state[inverse, -1:]  # (B, 1, H): predicts the first completion token
    before = tail.new_zeros(tail.shape[0], width - 1, tail.shape[2])  # prompt positions: not scored
    return torch.cat([before, last, tail[:, :-1]], dim=1)  # (B, T-1, H)


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
