"""The fingerprint a training run writes beside its adapter (lorafit.fingerprint), computed through the
run's DDP / FSDP wrapper so that every process takes part in the forward."""

from __future__ import annotations

import torch
from torch import nn

from lorafit.device import model_device
from lorafit.fingerprint import Fingerprint, choose_probes, make_fingerprint, probe_batch, probe_logprobs
from lorafit.train.data import IGNORE, Sample
from lorafit.train.distributed.strategy import quantization_of
from lorafit.train.distributed.wrap import Parallel


def first_sample(sample: Sample, field: str = "input_ids") -> list[int]:
    """`field` of the first sample of a row (the whole row unless it is packed)."""
    values = getattr(sample, field)
    if sample.position_ids is None:
        return values
    end = next((t for t, p in enumerate(sample.position_ids) if t and p == 0), len(values))
    return values[:end]


def probe_row(sample) -> tuple[list[int], list[int]]:
    """(ids, labels) of a sample's first row: an SFT sample's first packed sample; a preference sample's
    first row (the chosen completion, or KTO's completion) with IGNORE on its prompt."""
    if isinstance(sample, Sample):
        return first_sample(sample), first_sample(sample, "labels")
    ids, mask = sample.rows()[0]
    return ids, [t if m else IGNORE for t, m in zip(ids, mask)]


@torch.no_grad()
def training_fingerprint(parallel: Parallel, samples: list, pad_id: int, step: int,
                         validation: bool) -> Fingerprint | None:
    """Top-k next-token log-probs of the model on probes from the first `samples` (the validation ones
    when `validation`), in eval mode; None when no sample has a trained reply."""
    probes = choose_probes(probe_row(s) for s in samples)
    if not probes:
        return None
    model = parallel.model

    def logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return probe_logprobs(model, probes, pad_id)
    result = parallel.call(logprobs, probe_batch(probes, pad_id))
    parallel.after_eval()
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    meta = {"base": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
            "quantize": quantization_of(model), "dtype": str(dtype).removeprefix("torch."),
            "device": model_device(model).type, "step": step, "source": "validation" if validation else "training"}
    return make_fingerprint(result, probes, meta)
