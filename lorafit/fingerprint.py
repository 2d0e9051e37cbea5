"""An adapter's fingerprint: what the trained model predicted on a few fixed prompts, saved beside it.

When training saves an adapter it also writes `lorafit_fingerprint.json`: for a few samples of the
validation data (the training data when there is none), the top-k next-token log-probabilities at the
first positions of the trained reply, teacher-forced:

    probe i:  ids = the sample's prompt and the first `positions` tokens of its reply
              at each recorded position t, the k most likely next tokens and their log-probs

Anything that claims to compute this model (the adapter loaded again, PEFT, a merge, a GGUF in
llama.cpp, a server) is compared against it by `lorafit verify`: a file changed after training, a wrong
base or a lossy conversion shows up as a different distribution. `meta` records how the fingerprint was
computed (base, quantization, dtype, device), which sets how closely a later computation can match.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.errors import AdapterError

FINGERPRINT_NAME = "lorafit_fingerprint.json"
VERSION = 1
IGNORE = -100
N_PROBES, N_POSITIONS, TOP_K = 4, 4, 10


@dataclass
class Probe:
    """Token ids and the positions t whose next-token distribution (the logits at t) is recorded."""

    ids: list[int]
    positions: list[int]


@dataclass
class Fingerprint:
    probes: list[Probe]
    top: list[list[list[tuple[int, float]]]]  # [probe][position] -> k (token, log-prob), most likely first
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"version": VERSION, "meta": self.meta,
                "probes": [{"ids": p.ids, "positions": p.positions,
                            "top": [[[t, round(lp, 6)] for t, lp in pos] for pos in tops]}
                           for p, tops in zip(self.probes, self.top)]}


def choose_probes(samples: Iterable[tuple[list[int], list[int]]], n: int = N_PROBES,
                  positions: int = N_POSITIONS) -> list[Probe]:
    """Probes from (input_ids, labels) pairs: the first `n` samples with a trained reply, each cut after
    its prompt and `positions` reply tokens; the recorded positions predict those reply tokens."""
    probes = []
    for ids, labels in samples:
        first = next((t for t, label in enumerate(labels) if label != IGNORE and t > 0), None)
        if first is None:
            continue
        end = min(first + positions - 1, len(ids) - 1)  # logits at t predict token t + 1, a reply token
        probes.append(Probe(list(ids[:end]), list(range(first - 1, end))))
        if len(probes) == n:
            break
    return probes


def probe_batch(probes: list[Probe], pad_id: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The probes right-padded into one batch: input_ids, attention_mask (B, T)."""
    width = max(len(p.ids) for p in probes)
    ids = torch.full((len(probes), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(probes), width), dtype=torch.long)
    for i, p in enumerate(probes):
        ids[i, :len(p.ids)] = torch.tensor(p.ids)
        mask[i, :len(p.ids)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


@torch.no_grad()
def probe_logprobs(model: nn.Module, probes: list[Probe], pad_id: int = 0) -> list[torch.Tensor]:
    """Per probe, the (positions, vocab) fp32 next-token log-probs of `model` (its own device and dtype;
    padding masked, so each probe computes as if alone)."""
    device = next(model.parameters()).device
    batch = probe_batch(probes, pad_id, device)
    logits = model(**batch, use_cache=False).logits.float()  # (B, T, V)
    return [F.log_softmax(logits[i, p.positions], dim=-1).cpu() for i, p in enumerate(probes)]


def top_k(logprobs: list[torch.Tensor], k: int = TOP_K) -> list[list[list[tuple[int, float]]]]:
    """The k most likely tokens and their log-probs at each position of each probe."""
    out = []
    for lp in logprobs:
        values, ids = lp.topk(min(k, lp.shape[-1]), dim=-1)  # (positions, k)
        out.append([list(zip(i.tolist(), v.tolist())) for i, v in zip(ids, values)])
    return out


def make_fingerprint(logprobs: list[torch.Tensor], probes: list[Probe], meta: dict[str, Any],
                     k: int = TOP_K) -> Fingerprint:
    return Fingerprint(probes, top_k(logprobs, k), {**meta, "top_k": k})


def write_fingerprint(directory: str | os.PathLike, fingerprint: Fingerprint) -> Path:
    """`lorafit_fingerprint.json` in the adapter folder (written to a temporary name, then renamed)."""
    path = Path(directory) / FINGERPRINT_NAME
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(fingerprint.to_dict()) + "\n")
    os.replace(tmp, path)
    return path


def read_fingerprint(directory: str | os.PathLike) -> Fingerprint | None:
    """The adapter's fingerprint, or None when it has none; a malformed file is a one-line AdapterError."""
    path = Path(directory) / FINGERPRINT_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        probes = [Probe([int(t) for t in p["ids"]], [int(t) for t in p["positions"]]) for p in data["probes"]]
        top = [[[(int(t), float(lp)) for t, lp in pos] for pos in p["top"]] for p in data["probes"]]
        meta = dict(data.get("meta") or {})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise AdapterError(f"{path}: not a readable fingerprint ({type(e).__name__}: {e}); delete it, or train "
                           "again to write a new one") from None
    if any(len(t) != len(p.positions) or max(p.positions, default=0) >= len(p.ids) for p, t in zip(probes, top)):
        raise AdapterError(f"{path}: its probes and their distributions do not match; delete it, or train again")
    return Fingerprint(probes, top, meta)
