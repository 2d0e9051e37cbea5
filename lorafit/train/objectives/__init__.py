"""What the training loop optimizes: one objective per method, each a small piece in its own file.

The Trainer's loop (lorafit.train.trainer) is shared by every method: accumulation, clipping, the
schedule, checkpoints and resume, DDP / FSDP2, evaluation, early stopping, logging. What differs is
how samples become a batch and a batch becomes a loss, and that is all an objective says:

    sft.py          supervised fine-tuning (method lora / full): next-token loss on the trained tokens
    preference.py   pairs (method dpo / orpo / simpo): chosen and rejected in one forward
    kto.py          unpaired examples (method kto), with the KL estimate from mismatched completions
    losses.py       the preference losses as pure functions of log-prob tensors, formulas and papers
    grpo.py         reinforcement learning from prompts and rewards (method grpo): rollouts, advantages,
                    the clipped policy loss; grpo_loss.py its math, rollout.py its sampling (the serving
                    engine on the training model)
    logps.py        per-token log-probs through the chunked head; the reference policy context

An objective is any object with these members (a Protocol: nothing to inherit):

    name                    the method it trains
    metrics                 names of the metrics it logs besides "loss" (TRL's names)
    progress                (metric, label) the progress bar shows next to the loss, or None
    prepare(samples)        the samples as it trains on them (KTO pairs each with a mismatched completion)
    empty(sample)           a stand-in with the same shape and no weight (a process left without a sample
                            of a batch still runs forward and backward, contributing exactly 0)
    collate(samples, pad)   host tensors of one micro-batch
    batches(model, micro, pad)   the micro-batches of one optimizer step from its samples (one list per
                            micro-batch): collated, here; an objective that produces its training batch
                            with the model does it here (GRPO: rollouts of the step's prompts, rewards,
                            advantages; reusing them for num_iterations steps, it queues the prompts the
                            loop hands it meanwhile), and keeps what it buffers and its sampling RNG in
                            its state_dict, which checkpoints save
    count(batch)            what normalises the loss of an accumulated batch: its target tokens (SFT) or
                            its pairs / examples (preference, as TRL does), counted on the host
    loss(model, batch)      (sum of the per-item losses, {metric: tensor([sum, weight])}): the loop adds
                            sums and weights over micro-batches and processes, then divides
    finish(values, eval)    derived values from the averaged ones (SFT: perplexity on validation)
    reference_logps(model, batch)   (preference objectives) each sample's two reference log-probs (B, 2):
                            what `precompute_ref_log_probs` caches and the batch then carries as "ref"
    state_dict() / load_state_dict(state)   what a checkpoint must keep of it (empty for these; GRPO's
                            sampling RNG and unfinished generation batch; called on every process)

and, optionally (GRPO has them; the loop's defaults in brackets):

    group                   completion slots per sample: a micro-batch holds batch_size / group samples, and
                            the objective shares the slots among processes itself [1]
    iterations              optimizer passes over each drawn micro-batch (num_iterations) [1]
    draws(step, grad_accum) sample micro-batches optimizer step `step` consumes [grad_accum]
    tokens(batch)           tokens a micro-batch trains on, for tokens_per_s [the samples' lengths]
    evaluate(model, samples, step, out)   its own validation numbers instead of the loss of `loss`

The loop divides the summed loss of a step by the summed count, so k micro-batches of b items give the
gradient of one batch of k*b (the per-batch statistics that some losses take, e.g. the "sft" term's token
mean or "aot"'s sort, are per micro-batch, as in TRL).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from lorafit.errors import LorafitError
from lorafit.train.config import TrainConfig
from lorafit.train.data import PairSample, PromptSample, UnpairedSample


class Objective(Protocol):
    name: str
    metrics: tuple[str, ...]
    progress: tuple[str, str] | None

    def prepare(self, samples: list) -> list: ...

    def empty(self, sample: Any) -> Any: ...

    def collate(self, samples: list, pad_id: int) -> dict[str, torch.Tensor]: ...

    def batches(self, model: nn.Module, micro: list[list], pad_id: int) -> list[dict[str, torch.Tensor]]: ...

    def count(self, batch: dict[str, torch.Tensor]) -> int: ...

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def finish(self, values: dict[str, float], eval: bool) -> dict[str, float]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def make_objective(config: TrainConfig, reference_adapter: str | None = None, world=None,
                   tokenizer=None) -> Objective:
    """The objective of `config.method`; `reference_adapter`: the adapter slot of the reference policy
    (None: the base with adapters disabled); `world`: the processes (KTO's KL estimate spans them, GRPO
    gathers rewards over them); `tokenizer`: GRPO decodes its completions for the reward functions."""
    if config.method == "grpo":
        from lorafit.train.objectives.grpo import GRPO

        return GRPO(config, tokenizer, reference_adapter, world)
    if config.method in ("lora", "full"):
        from lorafit.train.objectives.sft import SFT

        return SFT()
    if config.method == "kto":
        from lorafit.train.objectives.kto import KTO

        return KTO(config.preference, config.batch_size, reference_adapter, world)
    from lorafit.train.objectives.preference import Pairwise

    return Pairwise(config.method, config.preference, reference_adapter)


def check_samples(method: str, samples: list) -> None:
    """Refuse, before anything changes, data the method cannot train on (one line naming the record)."""
    first = samples[0]
    kind = "pairs" if isinstance(first, PairSample) else "unpaired" if isinstance(first, UnpairedSample) else \
        "prompts" if isinstance(first, PromptSample) else "sft"
    want = {"lora": "sft", "full": "sft", "kto": "unpaired", "grpo": "prompts"}.get(method, "pairs")
    if kind == want:
        return
    described = {"sft": "supervised records (alpaca, chat or text)",
                 "pairs": "preference pairs ({prompt, chosen, rejected})",
                 "unpaired": "unpaired preference examples ({prompt, completion, label})",
                 "prompts": "prompt-only records ({prompt, ...})"}
    if want == "prompts":
        hint = "give it records with a prompt and the columns its reward functions read"
    elif kind == "prompts":
        hint = "use method grpo"
    elif want == "sft":
        hint = "use method dpo, orpo, simpo or kto"
    elif kind == "sft":
        hint = "give it records with chosen and rejected" if want == "pairs" else "give it records with a label"
    elif want == "pairs":
        hint = "use method kto"
    else:  # pairs for KTO: lorafit train unpairs them while loading
        hint = "load them with load_data(..., unpair=True), as lorafit train does for method kto"
    raise LorafitError(f"{first.source}: method {method} trains on {described[want]}, but the data holds "
                       f"{described[kind]}: {hint}")


def metric(total: torch.Tensor, weight: torch.Tensor | float) -> torch.Tensor:
    """A metric's (sum, weight) pair as one detached fp32 2-vector, as `loss` returns them."""
    total = total.detach().float()
    return torch.stack([total, torch.as_tensor(weight, dtype=torch.float32, device=total.device)])


__all__ = ["Objective", "check_samples", "make_objective", "metric"]
