"""The supervised training loss of a batch (lorafit.train.objectives.sft; validation: lorafit.train.evaluate).

Position t predicts token t+1; a target is a label that is not IGNORE. Losses are *sums* over
target tokens in fp32, so that the trainer can divide by the target tokens of a whole accumulated
(and, with several processes, all-reduced) batch: the mean loss of a step does not depend on how
it is cut into micro-batches or processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.device import model_device, to_device
from lorafit.ops.chunked_loss import causal_lm_loss
from lorafit.train.data import IGNORE
from lorafit.train.packing import model_inputs


def n_targets(batch: dict[str, torch.Tensor]) -> int:
    """Target tokens of a batch: labels[:, 1:] that are not IGNORE (position t predicts token t+1).
    Count them on the host batch: on a device batch `int()` would wait for the device."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def token_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of next-token losses over target tokens, number of target tokens) for one batch.

    The batch may be on the host: its targets are counted there and it is moved to the model's
    device. The loss is an fp32 scalar on that device whatever the model's dtype.
    """
    n_target = n_targets(batch)
    return loss_sum(model, to_device(batch, model_device(model))), n_target


def decoder(model: nn.Module) -> nn.Module | None:
    """The model without its output head (hidden states out), or None. Llama 4's causal LM names its
    base-model prefix after the multimodal model's, so `base_model` is the causal LM itself there."""
    body = getattr(model, "base_model", None)
    if body is model:
        body = getattr(model, "model", None)
    return body if isinstance(body, nn.Module) else None


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token losses over the target tokens of a batch already on the model's device (fp32).

    A batch of packed rows runs with each sample isolated (`lorafit.train.packing.model_inputs`).
    When the output head is a plain nn.Linear, the loss is computed from the last hidden states in
    chunks of tokens (lorafit.ops.chunked_loss), so the (B, T, V) fp32 logits never exist at once;
    otherwise from the model's logits, upcast to fp32 before the cross-entropy.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    body = decoder(model)
    plain_head = (isinstance(head, nn.Linear) and getattr(config, "final_logit_softcapping", None) is None
                  and getattr(config, "logit_scale", None) is None and getattr(config, "logits_scaling", 1.0) == 1.0
                  and body is not None)  # Granite divides its logits by logits_scaling
    inputs = model_inputs(model, batch)  # packed rows: each sample attends to itself only
    if plain_head:
        hidden = body(**inputs).last_hidden_state  # (B, T, H)
        return causal_lm_loss(hidden, head.weight, batch["labels"], bias=head.bias, reduction="sum",
                              ignore_index=IGNORE)  # fp32: the chunks' logits are upcast before the softmax
    logits = model(**inputs).logits  # (B, T, V)
    targets = batch["labels"][:, 1:]  # (B, T-1)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                           reduction="sum")
